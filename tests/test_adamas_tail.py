"""The tail estimate (``AdamasConfig(value_code_bits=...)``): value codes, the reference softmax over the
whole cache, its decomposed production path, the cache's value codes, and the model path."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from conftest import load_script
from helpers import assert_close
from transformers import AutoModelForCausalLM, StaticCache

from hf_adamas import AdamasConfig, AdamasLayer, apply_adamas, ops
from hf_adamas.bench.evaluation import Method, attention_method, decode_step, prefill
from hf_adamas.codebook import code_book
from hf_adamas.ops import cpu, reference, tail
from hf_common.compat import cache_kwargs
from hf_common.outputs import OutputPathError


def _random_codes(shape: tuple[int, ...], bits: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (*shape[:-1], shape[-1] * bits // 8), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("bits", [2, 4])
def test_code_values_are_each_codes_centroid(bits) -> None:
    generator = torch.Generator().manual_seed(0)
    codes = _random_codes((2, 3, 7, 32), bits, generator)
    centroids = torch.randn(3, 2**bits, generator=generator)
    unpacked = reference.unpack_codes(codes, bits).long()
    expected = torch.stack([centroids[h][unpacked[:, h]] for h in range(3)], dim=1)
    assert torch.equal(reference.code_values(codes, centroids, bits), expected)


@pytest.mark.parametrize("bits", [1, 2])
def test_quantized_scores_are_within_half_a_grid_step_per_nibble_of_the_exact_ones(bits) -> None:
    """`reference.quantized_centroid_scores` (the C++ op's estimates): per query head, every nibble's
    terms rounded onto one grid of the widest nibble range / 255, so a key's score moves by at most
    half a step per nibble; the grid recomputed here from the nibble terms one by one."""
    generator = torch.Generator().manual_seed(bits)
    query = 3 * torch.randn(2, 6, 32, generator=generator)
    codes = _random_codes((2, 3, 50, 32), bits, generator)
    centroids = torch.randn(3, 2**bits, generator=generator)
    exact = reference.centroid_scores(query, codes, centroids, bits, shared_per_kv_group=False)
    quantized = reference.quantized_centroid_scores(query, codes, centroids, bits)
    q_hat, half = reference.hadamard_values(query).double(), 4 // bits
    for b in range(2):
        for head in range(6):
            ranges = []
            for start in range(0, 32, half):
                terms = [
                    sum(q_hat[b, head, start + m] * centroids[head // 2, (v >> (bits * m)) & (2**bits - 1)]
                        for m in range(half))
                    for v in range(16)
                ]  # fmt: skip
                ranges.append(max(terms) - min(terms))
            step, nibbles = max(ranges) / 255, len(ranges)
            error = (quantized[b, head] - exact[b, head]).abs().max()
            assert 0 < error <= nibbles * step / 2 + 1e-4, (b, head)


def _inputs(
    bsz: int, q_heads: int, kv_heads: int, length: int, budget: int, bits: int, shared: bool, seed: int = 0
) -> dict:
    """Random decode inputs whose keys and values are exactly what their codes stand for, so that the tail
    estimate is exact attention over every valid position (see `_noisy` for inexact codes)."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = 32
    hadamard = reference.hadamard_matrix(head_dim)
    key_codes = reference.PackedCodes(
        _random_codes((bsz, kv_heads, length, head_dim), 2, generator),
        torch.randn(kv_heads, 4, generator=generator),
        2,
    )
    value_codes = reference.PackedCodes(
        _random_codes((bsz, kv_heads, length, head_dim), bits, generator),
        torch.randn(kv_heads, 2**bits, generator=generator),
        bits,
    )
    rows = kv_heads if shared else q_heads
    indices = torch.stack([torch.randperm(length, generator=generator)[:budget] for _ in range(bsz * rows)])
    indices = indices.view(bsz, rows, budget)
    indices[:, :, -1] = -1  # a skipped slot
    valid = torch.ones(bsz, length, dtype=torch.bool)
    valid[0, :3] = False  # left padding on the first row
    indices = torch.where(valid.gather(1, indices.clamp(min=0).flatten(1)).view_as(indices), indices, -1)
    return {
        "query": torch.randn(bsz, q_heads, head_dim, generator=generator),
        "key": reference.code_values(*key_codes) @ hadamard,
        "value": reference.code_values(*value_codes) @ hadamard,
        "indices": indices,
        "scaling": head_dim**-0.5,
        "key_codes": key_codes,
        "value_codes": value_codes,
        "valid": valid,
    }


def _noisy(inputs: dict, seed: int = 1) -> dict:
    """The same inputs with keys and values off their codes, so the estimates are inexact."""
    generator = torch.Generator().manual_seed(seed)
    key, value = inputs["key"], inputs["value"]
    return dict(
        inputs,
        key=key + 0.3 * torch.randn(key.shape, generator=generator),
        value=value + 0.3 * torch.randn(value.shape, generator=generator),
    )


def _dense(inputs: dict) -> torch.Tensor:
    group = inputs["query"].shape[1] // inputs["key"].shape[1]
    key, value = (inputs[name].repeat_interleave(group, 1) for name in ("key", "value"))
    logits = torch.einsum("bhd,bhsd->bhs", inputs["query"], key) * inputs["scaling"]
    weights = logits.masked_fill(~inputs["valid"][:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhs,bhsd->bhd", weights, value)


def _sparse(inputs: dict) -> torch.Tensor:
    return reference.sparse_decode_attention(
        *(inputs[k] for k in ("query", "key", "value", "indices", "scaling"))
    )


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_reference_with_exact_codes_is_dense_attention(shared, bits) -> None:
    """Keys and values that their codes represent exactly: every position counts with its true weight,
    whatever the selection, so the result is dense attention over the valid positions."""
    inputs = _inputs(2, 6, 2, 37, 5, bits, shared)
    assert_close("tail (exact codes)", _dense(inputs), reference.tail_decode_attention(**inputs), 1e-5)


def test_reference_with_everything_selected_is_sparse_attention() -> None:
    inputs = _noisy(_inputs(1, 4, 2, 9, 9, 2, shared=False))
    inputs["indices"] = torch.arange(9).expand(1, 4, 9).clone()
    inputs["valid"] = None
    assert_close("tail (all selected)", _sparse(inputs), reference.tail_decode_attention(**inputs), 1e-6)


def test_inexact_codes_still_move_the_output_toward_dense() -> None:
    inputs = _noisy(_inputs(1, 4, 2, 64, 8, 4, shared=False))
    inputs["valid"] = torch.ones(1, 64, dtype=torch.bool)
    inputs["indices"] = inputs["indices"].clamp(min=0)
    dense, estimated = _dense(inputs), reference.tail_decode_attention(**inputs)
    assert not torch.allclose(estimated, dense, atol=1e-4)  # the estimate is used, and it is inexact
    assert (estimated - dense).norm() < (_sparse(inputs) - dense).norm()


def _production_paths() -> dict:
    """The tail estimate's production paths that run here: PyTorch, and the one C++ call if it builds."""
    paths = {"pytorch": tail.tail_decode_attention}
    if cpu.cpu_extension() is not None:
        paths["cpp"] = cpu.tail_decode_attention_cpu
        paths["cpp-portable"] = partial(cpu.tail_decode_attention_cpu, portable=True)
    return paths


PATHS = _production_paths()
SPECS = {  # each path's oracle: the reference with the estimates it computes (the C++ op fast-scans them)
    path: partial(reference.tail_decode_attention, quantized_estimates=path.startswith("cpp"))
    for path in PATHS
}

SHAPES = [
    (1, 1, 1, 1, 1, 2, False),
    (1, 6, 2, 1100, 9, 2, False),  # three chunks of the C++ op, merged
    (2, 8, 1, 700, 4, 2, True),  # eight query heads per KV head: two lanes of four
    (2, 6, 2, 37, 5, 2, False),
    (2, 6, 3, 50, 7, 4, True),
    (1, 9, 3, 130, 16, 4, False),
    (3, 4, 4, 17, 17, 2, False),
    (1, 17, 1, 40, 3, 2, False),  # seventeen query heads per KV head: two scans of the codes
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("bsz", "q_heads", "kv_heads", "length", "budget", "bits", "shared"), SHAPES)
def test_production_paths_match_the_reference(
    bsz, q_heads, kv_heads, length, budget, bits, shared, path
) -> None:
    """The PyTorch and the C++ paths against the reference in float32; bf16 through the dispatch."""
    inputs = _noisy(_inputs(bsz, q_heads, kv_heads, length, budget, bits, shared, seed=length))
    assert_close(f"tail ({path})", SPECS[path](**inputs), PATHS[path](**inputs), 1e-5)
    half = dict(inputs, **{name: inputs[name].bfloat16() for name in ("query", "key", "value")})
    got = ops.tail_decode_attention(**half)
    assert got.dtype == torch.bfloat16
    assert_close("tail (bf16)", reference.tail_decode_attention(**half), got, 1e-2)


def test_the_dispatch_runs_float32_cpu_caches_through_the_cpp_op(monkeypatch) -> None:
    if "cpp" not in PATHS:
        pytest.skip("the C++ extension cannot be built here")
    calls = []
    monkeypatch.setattr(ops, "tail_decode_attention_cpu", lambda *args: calls.append(args) or args[0])
    inputs = _noisy(_inputs(1, 2, 1, 20, 3, 2, shared=False))
    ops.tail_decode_attention(**inputs)
    assert len(calls) == 1
    ops.tail_decode_attention(**dict(inputs, key=inputs["key"].bfloat16(), value=inputs["value"].bfloat16()))
    assert len(calls) == 1  # bf16 caches: the PyTorch path


def test_chunks_whose_maxima_lie_far_apart_merge_exactly() -> None:
    """The C++ op's chunks (512 positions) each keep their own maximum: one chunk's logits far above the
    others' must not wipe out their weights, nor theirs overflow it."""
    if "cpp" not in PATHS:
        pytest.skip("the C++ extension cannot be built here")
    inputs = _noisy(_inputs(1, 2, 1, 1200, 3, 2, shared=False))
    inputs["key"][:, :, 600:700] *= 6.0  # the second chunk's exact logits far larger
    inputs["query"] = inputs["query"] * 3
    inputs["indices"] = torch.tensor([[[610, 650, -1], [5, 1100, 620]]])
    assert_close("far-apart chunks", SPECS["cpp"](**inputs), PATHS["cpp"](**inputs), 1e-5)


def test_nothing_selected_and_very_negative_logits_still_average_the_rest() -> None:
    """A row whose selection is empty: the tail alone is the softmax, even when every estimated logit is
    far below zero (no weight may be dropped against a made-up maximum)."""
    inputs = _inputs(1, 2, 1, 8, 3, 2, shared=False)
    inputs.update(indices=torch.full_like(inputs["indices"], -1), valid=None, scaling=1.0)
    inputs["query"] = inputs["query"] * 0 - 200.0  # logits about -200 * sum of key values
    assert reference.tail_decode_attention(**inputs).abs().sum() > 0
    for path, implementation in PATHS.items():
        assert_close(f"empty selection ({path})", SPECS[path](**inputs), implementation(**inputs), 1e-5)


def test_codes_and_keys_read_in_place_from_larger_buffers() -> None:
    """Views of preallocated buffers (the cache's layout: longer than the filled part) give the same result."""
    inputs = _noisy(_inputs(2, 6, 3, 30, 5, 4, shared=False))
    views = dict(inputs)
    for name in ("key", "value"):
        room = torch.zeros(2, 3, 50, 32)
        room[:, :, :30] = inputs[name]
        views[name] = room[:, :, :30]
    for name in ("key_codes", "value_codes"):
        codes = inputs[name].codes
        room = torch.zeros(2, 3, 50, codes.shape[-1], dtype=torch.uint8)
        room[:, :, :30] = codes
        views[name] = inputs[name]._replace(codes=room[:, :, :30])
    for path, implementation in PATHS.items():
        assert_close(f"in place ({path})", SPECS[path](**inputs), implementation(**views), 1e-5)


def test_the_cpp_op_refuses_a_head_dim_it_cannot_sum() -> None:
    if "cpp" not in PATHS:
        pytest.skip("the C++ extension cannot be built here")
    codes = reference.PackedCodes(torch.zeros(1, 1, 4, 2, dtype=torch.uint8), torch.randn(1, 4), 2)
    key = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="power of two >= 16"):
        cpu.tail_decode_attention_cpu(
            torch.randn(1, 1, 8), key, key, torch.zeros(1, 1, 1, dtype=torch.int64), 1.0, codes, codes, None
        )


def test_code_books_that_do_not_match_the_codes_are_refused() -> None:
    """Key centroids of the wrong shape: the quantized scores and the C++ op say so before any work;
    value centroids of a width the value codes were not made with: the C++ op refuses them."""
    inputs = _inputs(1, 2, 1, 8, 3, 2, shared=False)
    key_codes = inputs["key_codes"]
    with pytest.raises(ValueError, match="centroids must be"):
        reference.quantized_centroid_scores(inputs["query"], key_codes.codes, torch.randn(2, 4), 2)
    if "cpp" not in PATHS:
        pytest.skip("the C++ extension cannot be built here")
    with pytest.raises(ValueError, match="centroids must be"):
        cpu.tail_decode_attention_cpu(
            **dict(inputs, key_codes=key_codes._replace(centroids=torch.randn(1, 2)))
        )
    wrong_width = inputs["value_codes"]._replace(centroids=torch.randn(1, 16), bits=4)
    with pytest.raises(RuntimeError, match="codes and head_dim disagree"):
        cpu.tail_decode_attention_cpu(**dict(inputs, value_codes=wrong_width))


def test_a_row_with_nothing_valid_is_zeros_on_every_path() -> None:
    inputs = _inputs(1, 2, 1, 8, 3, 2, shared=False)
    inputs["valid"] = torch.zeros(1, 8, dtype=torch.bool)
    inputs["indices"] = torch.full_like(inputs["indices"], -1)
    for implementation in (reference.tail_decode_attention, *PATHS.values()):
        assert torch.equal(implementation(**inputs), torch.zeros(1, 2, 32))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"value_code_bits": 3}, "value_code_bits must be one of"),
        ({"value_code_bits": True}, "value_code_bits must be an integer"),
        ({"value_code_bits": 4, "selector": "adamas"}, "only selector='adamas_asymmetric'"),
        ({"value_code_bits": 2, "selector": "oracle"}, "only selector='adamas_asymmetric'"),
    ],
)
def test_bad_value_code_settings_are_refused(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        AdamasConfig(**settings)


def test_value_codes_use_the_prompts_code_book_and_follow_the_cache() -> None:
    layer = AdamasLayer([-1.0, 0.0, 1.0], bits=2)
    prompt = torch.randn(2, 3, 40, 32)
    layer.update(prompt, prompt * 2)
    assert layer.code_buffers() == []  # nothing built before it is asked for
    codes, centroids = layer.value_codes(4)
    thresholds, expected_centroids = code_book(prompt * 2, 4)
    assert torch.equal(codes, reference.hadamard_codes(prompt * 2, thresholds, 4))
    assert torch.equal(centroids, expected_centroids)
    step = torch.randn(2, 3, 1, 32) * 50  # far outside the prompt: encoded with the prompt's book
    layer.update(step, step)
    codes, centroids_after = layer.value_codes(4)
    assert torch.equal(centroids_after, expected_centroids)
    assert torch.equal(codes[:, :, -1:], reference.hadamard_codes(step, thresholds, 4))
    assert len(layer.code_buffers()) == 1  # value codes only: no key codes were asked for
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.value_codes(4)[0], reference.hadamard_codes(layer.values, thresholds, 4))
    layer.crop(-layer.get_seq_length())
    layer.update(prompt[:1], prompt[:1])  # a reused cache: its next prompt's book
    assert torch.equal(layer.value_codes(4)[1], code_book(prompt[:1], 4)[1])
    codes, centroids = layer.value_codes(2)  # another width: a new code book of that width
    assert codes.shape[-1] == 8 and centroids.shape == (3, 4)
    layer.crop(-10)
    layer.update(step[:1].expand(1, 3, 2, 32), step[:1].expand(1, 3, 2, 32))  # re-append after a partial crop
    thresholds, _ = code_book(prompt[:1], 2)
    assert torch.equal(layer.value_codes(2)[0], reference.hadamard_codes(layer.values, thresholds, 2))


def _decode_logits(model, input_ids: torch.Tensor, method: Method) -> torch.Tensor:
    cache, logits = prefill(model, input_ids[:, :-4])
    with attention_method(model, method):
        for position in range(input_ids.shape[1] - 4, input_ids.shape[1]):
            logits = decode_step(model, cache, input_ids[:, position : position + 1])
    return logits


def test_the_tail_brings_a_small_budget_closer_to_dense(tiny_config) -> None:
    """On a tiny model, budget 4 of 60 positions: with the tail estimate (its production path, on cache
    views) the last logits are closer to dense attention's than without, and the sparse layers ran it."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config).eval()
    input_ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(2))
    dense = _decode_logits(model, input_ids, Method("dense"))
    calls, production = [], ops.tail_decode_attention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "tail_decode_attention", lambda *a: calls.append(1) or production(*a))
        with_tail = _decode_logits(
            model, input_ids, Method("tail", AdamasConfig(token_budget=4, dense_layers=1, value_code_bits=4))
        )
    without = _decode_logits(model, input_ids, Method("drop", AdamasConfig(token_budget=4, dense_layers=1)))
    assert len(calls) == 4 * (tiny_config.num_hidden_layers - 1)
    assert (with_tail - dense).norm() < 0.5 * (without - dense).norm()


def test_a_cache_without_value_codes_encodes_the_values_at_hand(tiny_config) -> None:
    """A static cache stores no codes: the step still runs (values coded on the fly, with a warning)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config).eval()
    apply_adamas(model, AdamasConfig(token_budget=4, dense_layers=1, value_code_bits=2))
    input_ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.inference_mode():
        model(input_ids=input_ids, use_cache=True, **cache_kwargs(cache))
        logits = model(input_ids=input_ids[:, -1:], use_cache=True, **cache_kwargs(cache)).logits
    assert torch.isfinite(logits).all()


def test_exact_positions_make_their_logits_exact() -> None:
    """Keys off their codes, values on theirs: with every position's logit exact, the estimate is dense
    attention; with some, both production paths still match the reference."""
    inputs = _inputs(2, 6, 2, 37, 5, 4, shared=False)
    generator = torch.Generator().manual_seed(5)
    inputs["key"] = inputs["key"] + 0.5 * torch.randn(inputs["key"].shape, generator=generator)
    everything = torch.arange(37).expand(2, 6, 37).clone()
    assert_close(
        "all exact",
        _dense(inputs),
        reference.tail_decode_attention(**inputs, exact_positions=everything),
        1e-5,
    )
    some = torch.stack([torch.randperm(37, generator=generator)[:9] for _ in range(2 * 2)]).view(2, 2, 9)
    some[:, :, 0] = -1
    expected = reference.tail_decode_attention(**inputs, exact_positions=some)  # one list per KV group
    assert not torch.allclose(expected, reference.tail_decode_attention(**inputs), atol=1e-5)
    for path, implementation in PATHS.items():
        got = implementation(**inputs, exact_positions=some)
        assert_close(f"exact positions ({path})", SPECS[path](**inputs, exact_positions=some), got, 1e-5)


def test_the_tail_diagnosis_variants_agree_with_the_spec() -> None:
    """``scripts/diagnose_adamas_tail.py``'s variants: ``sampled-shift`` is the spec, ``dropped`` the
    sparse attention, ``exact-logits`` the spec with every logit exact; the mass shifts (and so the spec
    and ``plain``) agree where the estimate is exact (keys on their codes) and differ where it is not."""
    diagnosis = load_script("diagnose_adamas_tail")
    exact_keys = _inputs(2, 6, 2, 200, 5, 2, shared=False)  # a sample of every 3rd position
    inputs = _noisy(exact_keys)
    generator = torch.Generator().manual_seed(3)
    candidates = torch.stack([torch.randperm(200, generator=generator)[:9] for _ in range(2 * 2)]).view(
        2, 2, 9
    )
    candidates[:, :, 0] = -1

    def variant(name: str, arguments: dict) -> tuple[torch.Tensor, list]:
        gaps = [0, 0.0, 0.0]
        output = diagnosis.variant_tail_attention(name, gaps)(**arguments, exact_positions=candidates)
        return output, gaps

    spec = reference.tail_decode_attention(**inputs, exact_positions=candidates)
    sampled, gaps = variant("sampled-shift", inputs)
    assert_close("sampled-shift", spec, sampled, 1e-5)
    assert gaps[0] == 2 * 6 and gaps[1] != 0.0  # one gap per head, the estimate off
    assert_close("dropped", _sparse(inputs), variant("dropped", inputs)[0], 1e-5)
    everything = torch.arange(200).expand(2, 6, 200)
    assert_close(
        "exact-logits",
        reference.tail_decode_attention(**inputs, exact_positions=everything),
        variant("exact-logits", inputs)[0],
        1e-5,
    )
    on_codes = reference.tail_decode_attention(**exact_keys, exact_positions=candidates)
    for name in ("plain", "mass-oracle", "candidate-shift"):
        assert_close(f"{name}, exact estimate", on_codes, variant(name, exact_keys)[0], 1e-5)
        assert not torch.allclose(variant(name, inputs)[0], spec, atol=1e-4), name


@pytest.mark.parametrize("length", [40, 300])  # a calibration sample of every position / every 4th
def test_the_level_shift_removes_an_estimate_excess_common_to_all_keys(length) -> None:
    """Keys moved off their codes so that every estimated logit is the exact one plus 0.7: the level
    shift takes the 0.7 off, so every path gives the tail estimate with every logit exact."""
    inputs = _inputs(2, 3, 3, length, 7, 2, shared=False)  # one query head per KV head
    query, scaling = inputs["query"], inputs["scaling"]
    offset = -0.7 / scaling * query / query.square().sum(-1, keepdim=True)  # q · offset = -0.7 / scaling
    inputs["key"] = inputs["key"] + offset[:, :, None, :]
    everything = torch.arange(length).expand(2, 3, length)
    expected = reference.tail_decode_attention(**inputs, exact_positions=everything)
    assert_close("reference", expected, reference.tail_decode_attention(**inputs), 1e-5)
    for path, implementation in PATHS.items():
        assert_close(path, SPECS[path](**inputs), implementation(**inputs), 1e-5)
    # The quantized estimates' level is calibrated the same way: within their rounding of the exact one.
    assert_close(
        "quantized", expected, reference.tail_decode_attention(**inputs, quantized_estimates=True), 1e-2
    )


def test_the_tail_diagnosis_refuses_bad_settings_and_foreign_summaries(tmp_path, capsys) -> None:
    """Before the model loads: a scored span as long as the window is refused, and a summary already in
    ``--output-dir`` without this script's records is neither replaced nor resumed without ``--overwrite``."""
    diagnosis = load_script("diagnose_adamas_tail")
    with pytest.raises(SystemExit) as refused:
        diagnosis.main(["ppl", "--context", "600", "--decode-tokens", "600", "--output-dir", str(tmp_path)])
    assert refused.value.code == 2
    assert "--decode-tokens must be below --context" in capsys.readouterr().err
    summary = tmp_path / "ppl.md"
    summary.write_text("someone else's")
    assert diagnosis.main(["ppl", "--output-dir", str(tmp_path)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert summary.read_text() == "someone else's"


def test_the_tail_op_benchmark_writes_its_report_and_keeps_an_existing_one(tmp_path, capsys) -> None:
    script = load_script("bench_adamas_tail_op")
    argv = ["--contexts", "40", "70", "--budget", "4", "--candidates", "6", "--head-dim", "16",
            "--repeats", "2", "--threads", "1", "--output-dir", str(tmp_path)]  # fmt: skip
    assert script.main(argv) == 0
    payload = json.loads((tmp_path / "tail_op.json").read_text())
    names = {record["implementation"] for record in payload["records"]}
    assert {"spec", "pytorch", "sdpa"} <= names
    assert all(
        record["max_relative_deviation_from_spec"] < 1e-4
        for record in payload["records"]
        if record["implementation"] != "sdpa"
    )
    assert (tmp_path / "tail_op.png").stat().st_size > 0
    before = (tmp_path / "tail_op.md").read_text()
    with pytest.raises(OutputPathError):
        script.main(argv)
    assert (tmp_path / "tail_op.md").read_text() == before
    with pytest.raises(SystemExit):
        script.main(["--q-heads", "4", "--kv-heads", "3"])
    assert "not a multiple" in capsys.readouterr().err
