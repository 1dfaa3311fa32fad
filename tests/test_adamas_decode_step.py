"""The fused CPU decode step (`ops.cpu.asymmetric_decode_step_cpu`) against its PyTorch twin
`reference.asymmetric_decode_step`: the codes it writes, the selection index for index, the output to
float tolerance; and the attention function taking it for the default rule."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_config
from helpers import assert_close
from test_adamas_cpu_select import needs_extension
from transformers import AutoModelForCausalLM

import hf_adamas.attention
from hf_adamas import AdamasConfig, AdamasLayer, apply_adamas
from hf_adamas.ops import cpu, reference

THRESHOLDS = {1: torch.tensor([0.0]), 2: torch.tensor([-0.6, 0.0, 0.6])}


def _step_case(batch, kv_heads, group, seq_len, head_dim, bits, with_valid, seed=0):
    """A preallocated cache (rows strided), its code buffer, the forced and valid masks."""
    generator = torch.Generator().manual_seed(seed)
    capacity = seq_len + 11
    key = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator)[:, :, :seq_len]
    value = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator)[:, :, :seq_len]
    query = torch.randn(batch, kv_heads * group, head_dim, generator=generator)
    centroids = torch.randn(kv_heads, 2**bits, generator=generator).sort(-1).values
    buffer = torch.zeros(batch, kv_heads, capacity, head_dim * bits // 8, dtype=torch.uint8)
    forced = torch.zeros(batch, seq_len, dtype=torch.bool)
    forced[:, -2:] = True
    forced[:, :1] = True
    valid = None
    if with_valid:  # left padding of different widths per row
        valid = torch.arange(seq_len)[None] >= torch.arange(batch)[:, None] * 4
    return query, key, value, centroids, buffer, forced, valid


@needs_extension
@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "seq_len", "head_dim", "budget", "pool"),
    [
        (1, 3, 3, 300, 64, 32, 32),
        (1, 3, 3, 300, 64, 16, 64),  # rescored: the pool narrowed to the budget by exact scores
        (2, 2, 4, 129, 32, 7, 7),
        (1, 1, 1, 5, 16, 8, 8),  # budget above the sequence: -1 fill
        (3, 2, 2, 77, 128, 20, 40),
        (1, 2, 5, 150, 64, 9, 9),  # a group size read at run time
    ],
)
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("coded_fraction", [0.0, 0.6, 1.0])
def test_fused_step_equals_the_reference(
    batch, kv_heads, group, seq_len, head_dim, budget, pool, bits, shared, with_valid, coded_fraction
) -> None:
    query, key, value, centroids, buffer, forced, valid = _step_case(
        batch, kv_heads, group, seq_len, head_dim, bits, with_valid, seed=seq_len + bits
    )
    thresholds = THRESHOLDS[bits]
    expected_codes = reference.hadamard_codes(key, thresholds, bits)
    coded = int(coded_fraction * seq_len)
    buffer[:, :, :coded] = expected_codes[:, :, :coded]
    scaling = head_dim**-0.5
    got, got_indices = cpu.asymmetric_decode_step_cpu(
        query, key, value, buffer[:, :, :seq_len], coded, thresholds, centroids, bits, shared, budget, pool,
        valid, forced, scaling,
    )  # fmt: skip
    assert torch.equal(buffer[:, :, :seq_len], expected_codes)
    assert not buffer[:, :, seq_len:].any()  # the reserved rows past the cache are left alone
    expected, indices = reference.asymmetric_decode_step(
        query, key, value, expected_codes, centroids, bits, shared, budget, pool, valid, forced, scaling
    )
    assert torch.equal(got_indices, indices)
    assert_close("fused decode step", expected, got, 1e-5)


@needs_extension
def test_fused_step_reads_the_written_codes_as_they_are() -> None:
    """Rows before ``coded`` are the cache's: read, never rewritten (a step encodes only its new keys)."""
    query, key, value, centroids, buffer, forced, _ = _step_case(1, 2, 2, 64, 32, 2, False)
    thresholds = THRESHOLDS[2]
    codes = buffer[:, :, :64]
    codes[:, :, :63] = 0xAB  # stand-ins the op must keep
    cpu.asymmetric_decode_step_cpu(
        query, key, value, codes, 63, thresholds, centroids, 2, False, 8, 8, None, forced, 0.2
    )
    assert (codes[:, :, :63] == 0xAB).all()
    assert torch.equal(codes[:, :, 63], reference.hadamard_codes(key[:, :, 63], thresholds, 2))


@needs_extension
def test_fused_step_rejects_bad_input() -> None:
    query, key, value, centroids, buffer, forced, _ = _step_case(1, 2, 2, 40, 32, 2, False)
    thresholds = THRESHOLDS[2]

    def step(codes=buffer[:, :, :40], coded=0, thresholds=thresholds, value=value):
        return cpu.asymmetric_decode_step_cpu(
            query, key, value, codes, coded, thresholds, centroids, 2, False, 8, 8, None, forced, 0.2
        )

    with pytest.raises(ValueError, match="disagree"):
        step(codes=buffer[:, :, :39])
    with pytest.raises(ValueError, match="disagree"):
        step(value=value[:, :, :39])
    with pytest.raises(ValueError, match="code buffer itself"):
        step(codes=buffer[:, :, :40].transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(RuntimeError, match="coded must be in"):
        step(coded=41)
    with pytest.raises(ValueError, match="strictly increasing"):
        step(thresholds=torch.tensor([0.5, 0.0, 0.6]))


def _tiny_model(family: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_tiny_config(family)).eval()


@needs_extension
@pytest.mark.parametrize("settings", [{}, {"rescore_factor": 2}, {"gqa_selection": "shared_per_kv_group"}])
def test_generate_takes_the_fused_step_and_equals_the_unfused_path(settings, monkeypatch) -> None:
    """The default rule's decode steps run as one C++ call per layer, with the tokens, logits and
    cached codes of the step-by-step path (selection, then attention, codes encoded by the cache)."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 128, (2, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # left padding: the valid mask reaches the op

    def run(fused: bool):
        model = _tiny_model()
        apply_adamas(model, AdamasConfig(token_budget=8, dense_layers=1, rescore_candidates=0, **settings))
        calls = []
        original = hf_adamas.attention.asymmetric_decode_step_cpu
        with monkeypatch.context() as patch:
            patch.setattr(
                hf_adamas.attention, "asymmetric_decode_step_cpu", lambda *a: calls.append(1) or original(*a)
            )
            if not fused:
                patch.setattr(hf_adamas.attention, "_fused_step_layer", lambda *a: None)
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        layer = out.past_key_values.layers[2]
        assert isinstance(layer, AdamasLayer)
        return out, layer, len(calls)

    fused, fused_layer, fused_calls = run(True)
    plain, plain_layer, plain_calls = run(False)
    assert fused_calls == 3 * 5 and plain_calls == 0  # 3 sparse layers, 5 decode steps
    assert torch.equal(fused.sequences, plain.sequences)
    for got, expected in zip(fused.logits, plain.logits, strict=True):
        assert_close("logits", expected, got, 1e-5)
    assert torch.equal(fused_layer.key_codes, plain_layer.key_codes)
    assert torch.equal(
        fused_layer.key_codes, reference.hadamard_codes(fused_layer.keys, fused_layer.thresholds, 2)
    )
