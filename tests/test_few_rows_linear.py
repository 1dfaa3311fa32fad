"""The few-rows CPU linear kernel against ``F.linear``: odd shapes, row ranges, fallbacks, whole models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_config
from torch import nn
from transformers import AutoModelForCausalLM

from hf_common import few_rows_linear as frl

pytestmark = pytest.mark.skipif(not frl.few_rows_linear_available(), reason="the kernel cannot run here")
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize(
    ("in_features", "out_features", "bias", "shape"),
    [
        (37, 53, True, (5, 37)),  # K not a multiple of 8, N odd
        (64, 1000, False, (1, 7, 64)),  # 7 rows: a full tile of 6 and one more
        (576, 192, True, (12, 1, 576)),
        (3, 1, True, (2, 3)),  # shorter than one AVX2 vector, one output
        (576, 1536, False, (16, 576)),
        (8, 17, False, (40, 8)),  # more rows than the layers use it for: still correct
    ],
)
def test_the_kernel_matches_linear(in_features, out_features, bias, shape) -> None:
    torch.manual_seed(in_features + out_features)
    layer = nn.Linear(in_features, out_features, bias=bias)
    inputs = torch.randn(shape)
    got = frl.few_rows_linear(
        inputs, layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    )
    torch.testing.assert_close(
        got, nn.functional.linear(inputs, layer.weight, layer.bias).detach(), **TOLERANCE
    )


def test_the_block_switches_only_its_rows_and_restores_plain_layers() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    calls = []
    original = frl._kernel
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frl, "_kernel", lambda ext, x, *a: calls.append(x.shape) or original(ext, x, *a))
        with torch.no_grad(), frl.few_rows_linear_layers(layer, min_rows=2, max_rows=4) as switched:
            assert switched == 1 and isinstance(layer, frl.FewRowsLinear)
            for rows in (1, 2, 4, 5):
                inputs = torch.randn(rows, 24)
                torch.testing.assert_close(
                    layer(inputs), nn.functional.linear(inputs, layer.weight, layer.bias)
                )
    assert calls == [(2, 24), (4, 24)], "1 and 5 rows are outside [2, 4]: F.linear"
    assert type(layer) is nn.Linear and not hasattr(layer, "min_rows")
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_gradients_and_other_dtypes_use_linear() -> None:
    layer, half = nn.Linear(8, 4), nn.Linear(8, 4).to(torch.bfloat16)
    with frl.few_rows_linear_layers(layer, half) as switched:
        assert switched == 1 and type(half) is nn.Linear, "a bfloat16 layer is left alone"
        inputs = torch.randn(3, 8, requires_grad=True)
        layer(inputs).sum().backward()  # the kernel has no backward: F.linear
    assert inputs.grad is not None and layer.weight.grad is not None


def test_a_tiny_model_decodes_the_same_inside_the_block() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama", 16, num_hidden_layers=2)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
        with frl.few_rows_linear_layers(model, model) as switched:  # a model twice: each layer once
            assert switched == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer, then the LM head
            with frl.few_rows_linear_layers(model, min_rows=1) as inner:
                assert inner == 0, "already switched by the enclosing block"
            torch.testing.assert_close(model(ids).logits, expected, **TOLERANCE)
        assert not any(isinstance(module, frl.FewRowsLinear) for module in model.modules())
        assert torch.equal(model(ids).logits, expected)


def test_bad_inputs_are_clear_errors(monkeypatch) -> None:
    with (
        pytest.raises(ValueError, match="need 1 <= min_rows <= max_rows"),
        frl.few_rows_linear_layers(nn.Linear(4, 4), min_rows=3, max_rows=2),
    ):
        pass
    with pytest.raises(ValueError, match=r"float32 CPU tensors, got inputs torch\.float64"):
        frl.few_rows_linear(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4))
    monkeypatch.setattr(frl, "_extension", lambda: None)  # no toolchain, or no AVX2: F.linear everywhere
    layer = nn.Linear(4, 4)
    with frl.few_rows_linear_layers(layer) as switched:
        assert switched == 0 and type(layer) is nn.Linear
    with pytest.raises(RuntimeError, match="not available here"):
        frl.few_rows_linear(torch.randn(2, 4), torch.randn(3, 4))
