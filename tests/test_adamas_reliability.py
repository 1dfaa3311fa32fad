"""Adamas bad input and silent fallbacks (issues 15 and 16): each reproduction is a test.

The table in docs/reliability-adamas.md lists every case with the name of its test here.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_config
from transformers import AutoModelForCausalLM, DynamicCache

from hf_adamas import AdamasCache, AdamasConfig, AdamasLayer, apply_adamas, cli, ops
from hf_adamas.cache import GROWTH
from hf_adamas.codebook import subsample_rows
from hf_common.compat import cache_kwargs, output_cache

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_warning_once() -> None:
    """transformers' ``warning_once`` remembers messages per process; each test sees its own."""
    logging.Logger.warning_once.cache_clear()


def _model(family: str = "llama", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_tiny_config(family, **overrides)).eval()


def _generate(model, input_ids: torch.Tensor, new_tokens: int = 6, **kwargs):
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **kwargs,
    )


def _prompt(length: int = 40) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- settings (issue 16 item 8)


def test_editing_adamas_config_in_place_takes_effect() -> None:
    model = _model()
    expected = _generate(model, _prompt())
    apply_adamas(model, AdamasConfig(token_budget=4, dense_layers=0))
    assert not torch.equal(_generate(model, _prompt()), expected)  # sparse at budget 4
    model.config.adamas_config["token_budget"] = 256  # covers the sequence: exact again
    assert torch.equal(_generate(model, _prompt()), expected)


def test_dense_layers_covering_every_layer_is_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="dense_layers=4 makes every layer of LlamaForCausalLM"):
        apply_adamas(model, AdamasConfig(dense_layers=4))
    apply_adamas(model, AdamasConfig(dense_layers=1))
    model.config.adamas_config["dense_layers"] = 9  # an in-place edit is checked at the next forward
    with pytest.raises(ValueError, match="dense_layers=9 makes every layer"):
        _generate(model, _prompt())


# ---------------------------------------------------------------- bad input (issue 15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selector": "adamas", "token_budget": 4, "recent_tokens": 4}, "= 5 exceeds token_budget=4"),
        ({"selector": "streaming_llm", "token_budget": 4, "sink_tokens": 4}, "= 5 exceeds token_budget=4"),
        ({"selector": "quest", "token_budget": 4, "recent_tokens": 4}, "= 5 exceeds token_budget=4"),
        ({"selector": "quest", "token_budget": 8}, "keeps the current page: .* = 16 exceeds token_budget=8"),
    ],
)
def test_budget_below_the_forced_tokens_is_refused_for_every_selector(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AdamasConfig(**kwargs)


def test_per_layer_thresholds_must_match_the_layer_count_of_a_user_cache() -> None:
    with pytest.raises(ValueError, match="per-layer thresholds for 2 layers, but LlamaConfig has 4"):
        AdamasCache(make_tiny_config("llama"), AdamasConfig(thresholds=[[-1.0, 0.0, 1.0]] * 2))


@pytest.mark.parametrize("kind", ["static", "sliding"])
def test_cache_without_codes_warns_once(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """Static and sliding-window layers hold no codes: the whole cache is re-encoded per step, said once."""
    model = _model("mistral", sliding_window=24) if kind == "sliding" else _model()
    apply_adamas(model, AdamasConfig(token_budget=8))
    with caplog.at_level(logging.WARNING, logger="hf_adamas"):
        if kind == "static":
            _generate(model, _prompt(), cache_implementation="static")
        else:
            _generate(model, _prompt(), **cache_kwargs(DynamicCache(config=model.config)))
    warnings = [r for r in caplog.records if "stores no key codes" in r.getMessage()]
    layer_type = "StaticLayer" if kind == "static" else "DynamicSlidingWindowLayer"
    assert len(warnings) == 1 and layer_type in warnings[0].getMessage()


def test_a_cache_prefilled_under_sdpa_gets_codes_on_the_first_adamas_step(caplog) -> None:
    """Prefill dense, then `apply_adamas`: the first decode step already finds and converts its cache."""
    model = _model()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_prompt(), use_cache=True, **cache_kwargs(cache))
        config = AdamasConfig(token_budget=8, dense_layers=1)
        apply_adamas(model, config)
        with caplog.at_level(logging.WARNING, logger="hf_adamas"):
            model(torch.tensor([[5]]), use_cache=True, **cache_kwargs(cache))
    assert not [r for r in caplog.records if "stores no key codes" in r.getMessage()]
    assert [isinstance(layer, AdamasLayer) for layer in cache.layers] == [False, True, True, True]


def test_reload_without_adamas_says_the_saved_settings_are_unused(
    tiny_target_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers reloads a model saved with adamas_config as sdpa; the package loader says so."""
    from transformers import AutoTokenizer

    from hf_common import load_model_and_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    apply_adamas(model, AdamasConfig(token_budget=16, dense_layers=1))
    model.save_pretrained(tmp_path / "saved")
    AutoTokenizer.from_pretrained(tiny_target_dir).save_pretrained(tmp_path / "saved")
    with caplog.at_level(logging.WARNING):
        loaded, _ = load_model_and_tokenizer(tmp_path / "saved")
        assert loaded.config._attn_implementation != "adamas"
        load_model_and_tokenizer(tmp_path / "saved", attn_implementation="adamas")
    messages = [r.getMessage() for r in caplog.records if "adamas_config" in r.getMessage()]
    assert len(messages) == 1 and "pass attn_implementation='adamas'" in messages[0]


def test_triton_missing_on_cuda_warns_once(monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ops, "_kernels", lambda: None)
    monkeypatch.setattr(ops, "_force_reference", False)
    cuda_tensor = SimpleNamespace(is_cuda=True)
    with caplog.at_level(logging.WARNING, logger="hf_adamas"):
        assert not ops._use_triton(cuda_tensor)
        assert not ops._use_triton(cuda_tensor)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "Triton cannot be imported" in messages[0]


# ---------------------------------------------------------------- memory (issue 15 item 3)


def test_generate_reserves_the_announced_length_once() -> None:
    model = _model()
    apply_adamas(model, AdamasConfig(token_budget=8, dense_layers=1))
    output = _generate(model, _prompt(300), new_tokens=20, return_dict_in_generate=True)
    for layer in output_cache(output).layers[1:]:
        assert isinstance(layer, AdamasLayer)
        assert layer.key_codes.untyped_storage().nbytes() == layer.key_codes.numel()  # no spare room
        assert layer.get_seq_length() == 300 + 20 - 1


def test_codes_are_built_when_first_read_not_at_prefill() -> None:
    """A prefill stores keys and values only, so the code buffer is not part of the prefill's peak."""
    layer = AdamasLayer([-1.0, 0.0, 1.0], bits=2)
    keys = torch.randn(1, 2, 300, 64)
    layer.update(keys, keys)
    assert layer.code_buffers() == []
    assert torch.equal(layer.key_codes, ops.hadamard_codes(keys, layer.thresholds, 2))
    step = torch.randn(1, 2, 1, 64)
    layer.update(step, step)  # grows the key buffer: the codes follow on the next read
    assert torch.equal(layer.key_codes, ops.hadamard_codes(torch.cat([keys, step], 2), layer.thresholds, 2))
    layer.crop(-10)
    other = torch.randn(1, 2, 4, 64)
    layer.update(other, other)  # overwrites cropped positions, whose codes must be rebuilt
    assert torch.equal(layer.key_codes, ops.hadamard_codes(layer.keys, layer.thresholds, 2))


def test_an_announced_length_is_reserved_at_the_first_decoded_token() -> None:
    """The prefill is stored exactly (the generation's memory peak stays sdpa's), then the rest is reserved."""
    layer = AdamasLayer([-1.0, 0.0, 1.0], bits=2, capacity=1100)
    keys = torch.randn(1, 2, 1000, 64)
    layer.update(keys, keys)
    assert layer._buffers[0].shape[2] == 1000
    layer.update(keys[:, :, :1], keys[:, :, :1])
    assert layer._buffers[0].shape[2] == 1100
    assert torch.equal(layer.keys[:, :, :1000], keys)


def test_unannounced_code_cache_grows_by_a_quarter() -> None:
    layer = AdamasLayer([-1.0, 0.0, 1.0], bits=2)
    keys = torch.randn(1, 2, 1000, 64)
    layer.update(keys, keys)
    assert layer._buffers[0].shape[2] == 1000  # the prefill is stored exactly
    layer.update(keys[:, :, :1], keys[:, :, :1])
    assert layer._buffers[0].shape[2] == int(1000 * GROWTH)
    assert torch.equal(layer.keys[:, :, :1000], keys)


# ---------------------------------------------------------------- kernels and calibration (items 17, 18)

_OFFSET_CHECK = textwrap.dedent(
    """
    import os, sys, torch
    from hf_adamas.ops.kernels import code_distance_triton, sparse_decode_attention_triton
    from hf_adamas.ops.reference import code_distance, sparse_decode_attention

    def huge_view(path, dtype, shape, head_stride):
        # A sparse file: the view spans > 2^31 elements but only the touched pages exist.
        count = (shape[1] - 1) * head_stride + shape[2] * shape[3]
        with open(path, "wb") as handle:
            handle.truncate(count * torch.empty(0, dtype=dtype).element_size())
        storage = torch.from_file(path, shared=True, size=count, dtype=dtype)
        return storage.as_strided(shape, (0, head_stride, shape[3], 1))

    gen = torch.Generator().manual_seed(0)
    folder = sys.argv[1]
    key = huge_view(os.path.join(folder, "kv.bin"), torch.float16, (1, 3, 8, 16), 2**30 + 64)
    for head in range(3):
        key[0, head].copy_(torch.randn(8, 16, generator=gen).half())
    query = torch.randn(1, 3, 16, generator=gen).half()
    idx = torch.tensor([[[0, 3, 7]] * 3])
    out = sparse_decode_attention_triton(query, key, key, idx, 0.25)
    torch.testing.assert_close(out, sparse_decode_attention(query, key, key, idx, 0.25), rtol=0, atol=0)

    codes = huge_view(os.path.join(folder, "codes.bin"), torch.uint8, (1, 2, 8, 16), 2**32 + 64)
    for head in range(2):
        codes[0, head].copy_(torch.randint(0, 256, (8, 16), generator=gen, dtype=torch.uint8))
    q_codes = torch.randint(0, 256, (1, 2, 16), generator=gen, dtype=torch.uint8)
    assert torch.equal(code_distance_triton(q_codes, codes, 2, False), code_distance(q_codes, codes, 2, False))
    print("ok")
    """
)


def test_kernels_address_heads_past_2_to_the_31_elements(tmp_path: Path) -> None:
    """K/V and code views whose last head starts past 2^31 elements (int32 offsets wrapped, or crashed)."""
    pytest.importorskip("triton")
    env = {"TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", _OFFSET_CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_calibration_subsample_draws_every_coordinate_equally() -> None:
    """A stride over the flattened keys (30 here, sharing the factor 2 with D = 64) kept even coordinates only."""
    coordinate = torch.arange(64.0).expand(1, 3, 1000, 64)
    flat_stride = coordinate.flatten()[:: coordinate.numel() // 6400]
    assert torch.unique(flat_stride).numel() == 32  # the old sampling: half the coordinates
    counts = torch.bincount(subsample_rows(coordinate, limit=6400).flatten().long(), minlength=64)
    assert counts.min() == counts.max() > 0


# ---------------------------------------------------------------- the hf-adamas commands (items 3, 9, 13, 16)


@pytest.fixture
def no_model_load(monkeypatch) -> None:
    """Argument errors must come before the model loads: loading fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model_and_tokenizer", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["ppl", "--context", "64", "--decode-tokens", "100"],
            "--decode-tokens must be at least 1 and below",
        ),
        (["ppl", "--decode-tokens", "0"], "--decode-tokens must be at least 1"),
        (
            ["ppl", "--context", "128", "--decode-tokens", "16", "--budgets", "256"],
            "cover the whole --context",
        ),
        (["bench", "--steps", "0"], "--steps and --rounds must be >= 1"),
        (["bench", "--rounds", "0"], "--steps and --rounds must be >= 1"),
        (["calibrate", "--num-tokens", "0"], "--num-tokens must be >= 16"),
        (
            ["passkey", "--depths", "1.5"],
            "--depths are fractions of the haystack in \\[0, 1\\], got \\[1.5\\]",
        ),
        (["passkey", "--depths", "-1"], "got \\[-1.0\\]"),
        (["passkey", "--lengths", "256", "--budgets", "512"], "cover the whole shortest passkey prompt"),
        (["passkey", "--methods", "quest", "--budgets", "8"], "keeps the current page"),
        (
            ["passkey", "--methods", "asymmetric-online", "--rescore-candidates", "-1"],
            "rescore_candidates must be an integer >= 0, got -1",
        ),
        (["ppl", "--text", "no/such.txt"], "text file no/such.txt not found"),
    ],
)
def test_bad_arguments_are_refused_before_the_model_loads(
    argv, message, no_model_load, tmp_path, capsys
) -> None:
    assert cli.main([*argv, *(["--output-dir", str(tmp_path)] if argv[0] != "calibrate" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf-adamas {argv[0]}: error: ")
    assert re.search(message, err), err


def test_bench_without_the_linear_kernel_is_refused_before_the_model_loads(
    no_model_load, monkeypatch, tmp_path, capsys
) -> None:
    monkeypatch.setattr(cli, "few_rows_linear_available", lambda: False)
    out = tmp_path / "out"
    assert cli.main(["bench", "--few-rows-linear", "both", "--output-dir", str(out)]) == 2
    assert "needs hf_common.few_rows_linear's C++ kernel" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["passkey", "ppl", "bench"])
def test_existing_results_are_kept_without_overwrite(command, no_model_load, tmp_path, capsys) -> None:
    stem = {"passkey": "passkey_varied", "ppl": "perplexity", "bench": "decode_speed"}[command]
    (tmp_path / f"{stem}.json").write_text("{}")
    assert cli.main([command, "--output-dir", str(tmp_path)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / f"{stem}.json").read_text() == "{}"


def test_calibrate_keeps_an_existing_output(no_model_load, tmp_path, capsys) -> None:
    target = tmp_path / "thresholds.json"
    target.write_text("{}")
    assert cli.main(["calibrate", "--output", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err and target.read_text() == "{}"


def test_default_outputs_are_under_runs() -> None:
    from hf_common.cli import build_parser

    parser = build_parser("hf-adamas", cli.DESCRIPTION, cli.COMMANDS)
    for command in ("passkey", "ppl", "bench"):
        assert parser.parse_args([command]).output_dir == Path("runs/adamas")
    assert parser.parse_args(["calibrate"]).output == Path("runs/adamas/thresholds.json")
