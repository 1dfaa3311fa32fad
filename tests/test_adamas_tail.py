"""The tail estimate (``AdamasConfig(value_code_bits=...)``): value codes, the reference softmax over the
whole cache, its decomposed production path, the cache's value codes, and the model path."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from transformers import AutoModelForCausalLM, StaticCache

from hf_adamas import AdamasConfig, AdamasLayer, apply_adamas, ops
from hf_adamas.bench.evaluation import Method, attention_method, decode_step, prefill
from hf_adamas.codebook import code_book
from hf_adamas.ops import reference, tail
from hf_common.compat import cache_kwargs


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


def _inputs(
    bsz: int, q_heads: int, kv_heads: int, length: int, budget: int, bits: int, shared: bool, seed: int = 0
) -> dict:
    """Random decode inputs whose value codes decode to the values exactly and whose tail scores are exact,
    so the tail estimate is then exact attention over every valid position."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = 32
    codes = _random_codes((bsz, kv_heads, length, head_dim), bits, generator)
    centroids = torch.randn(kv_heads, 2**bits, generator=generator)
    value = reference.code_values(codes, centroids, bits) @ reference.hadamard_matrix(head_dim)
    key = torch.randn(bsz, kv_heads, length, head_dim, generator=generator)
    query = torch.randn(bsz, q_heads, head_dim, generator=generator)
    rows = kv_heads if shared else q_heads
    indices = torch.stack(
        [torch.randperm(length, generator=generator)[:budget] for _ in range(bsz * rows)]
    ).view(bsz, rows, budget)
    indices[:, :, -1] = -1  # a skipped slot
    valid = torch.ones(bsz, length, dtype=torch.bool)
    valid[0, :3] = False  # left padding on the first row
    indices = torch.where(valid.gather(1, indices.clamp(min=0).flatten(1)).view_as(indices), indices, -1)
    exact = torch.einsum("bhd,bhsd->bhs", query, key.repeat_interleave(q_heads // kv_heads, 1))
    return {
        "query": query,
        "key": key,
        "value": value,
        "indices": indices,
        "scaling": head_dim**-0.5,
        "tail_scores": exact,
        "value_codes": codes,
        "value_centroids": centroids,
        "value_bits": bits,
        "valid": valid,
    }


def _dense(inputs: dict) -> torch.Tensor:
    group = inputs["query"].shape[1] // inputs["key"].shape[1]
    logits = inputs["tail_scores"] * inputs["scaling"]
    weights = logits.masked_fill(~inputs["valid"][:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhs,bhsd->bhd", weights, inputs["value"].repeat_interleave(group, 1))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_reference_with_exact_estimates_is_dense_attention(shared, bits) -> None:
    """With exact tail scores and values that their codes represent exactly, every position counts with its
    true weight, whatever the selection: the result is dense attention over the valid positions."""
    inputs = _inputs(2, 6, 2, 37, 5, bits, shared)
    assert_close("tail (exact estimates)", _dense(inputs), reference.tail_decode_attention(**inputs), 1e-5)


def test_reference_with_everything_selected_is_sparse_attention() -> None:
    inputs = _inputs(1, 4, 2, 9, 9, 2, shared=False)
    inputs["indices"] = torch.arange(9).expand(1, 4, 9).clone()
    inputs["valid"] = None
    inputs["tail_scores"] = torch.full_like(inputs["tail_scores"], 1e4)  # would dominate if it were used
    expected = reference.sparse_decode_attention(
        inputs["query"], inputs["key"], inputs["value"], inputs["indices"], inputs["scaling"]
    )
    assert_close("tail (all selected)", expected, reference.tail_decode_attention(**inputs), 1e-6)


def test_estimated_tail_moves_the_output_toward_dense() -> None:
    """Wrong estimates change the result (the tail is used), and the reference is not dense then."""
    inputs = _inputs(1, 4, 2, 64, 8, 4, shared=False)
    dense = _dense(inputs)
    noisy = dict(inputs, tail_scores=inputs["tail_scores"] + torch.randn_like(inputs["tail_scores"]))
    dropped = reference.sparse_decode_attention(
        inputs["query"], inputs["key"], inputs["value"], inputs["indices"], inputs["scaling"]
    )
    estimated = reference.tail_decode_attention(**noisy)
    assert not torch.allclose(estimated, dense, atol=1e-4)
    assert (estimated - dense).norm() < (dropped - dense).norm()


@pytest.mark.parametrize(
    ("bsz", "q_heads", "kv_heads", "length", "budget", "bits", "shared"),
    [
        (1, 1, 1, 1, 1, 2, False),
        (2, 6, 2, 37, 5, 2, False),
        (2, 6, 3, 50, 7, 4, True),
        (1, 9, 3, 130, 16, 4, False),
        (3, 4, 4, 17, 17, 2, False),
    ],
)
def test_decomposed_path_matches_the_reference(bsz, q_heads, kv_heads, length, budget, bits, shared) -> None:
    inputs = _inputs(bsz, q_heads, kv_heads, length, budget, bits, shared, seed=length)
    inputs["tail_scores"] = inputs["tail_scores"] + torch.randn_like(inputs["tail_scores"])
    expected = reference.tail_decode_attention(**inputs)
    assert_close("tail (decomposed)", expected, tail.tail_decode_attention(**inputs), 1e-5)
    half = dict(
        inputs,
        query=inputs["query"].bfloat16(),
        key=inputs["key"].bfloat16(),
        value=inputs["value"].bfloat16(),
    )
    got = tail.tail_decode_attention(**half)
    assert got.dtype == torch.bfloat16
    assert_close("tail (decomposed, bf16)", reference.tail_decode_attention(**half), got, 1e-2)


def test_a_row_with_nothing_valid_is_zeros_on_both_paths() -> None:
    inputs = _inputs(1, 2, 1, 8, 3, 2, shared=False)
    inputs["valid"] = torch.zeros(1, 8, dtype=torch.bool)
    inputs["indices"] = torch.full_like(inputs["indices"], -1)
    for implementation in (reference.tail_decode_attention, tail.tail_decode_attention):
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


def _decode_logits(model, input_ids: torch.Tensor, method: Method) -> torch.Tensor:
    cache, logits = prefill(model, input_ids[:, :-4])
    with attention_method(model, method):
        for position in range(input_ids.shape[1] - 4, input_ids.shape[1]):
            logits = decode_step(model, cache, input_ids[:, position : position + 1])
    return logits


def test_the_tail_brings_a_small_budget_closer_to_dense(tiny_config) -> None:
    """On a tiny model, budget 4 of 60 positions: with the tail estimate the last logits are closer to
    dense attention's than without, and the op is what the sparse layers ran."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config).eval()
    input_ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(2))
    dense = _decode_logits(model, input_ids, Method("dense"))
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            ops,
            "tail_decode_attention",
            lambda *a: calls.append(1) or ops.reference.tail_decode_attention(*a),
        )
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
