"""MKL-packed linear layers against ``F.linear``: outputs, fallbacks, model outputs, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_config
from torch import nn
from transformers import AutoModelForCausalLM

from hf_common.packed_linear import (
    PackedLinear,
    pack_linear_weights,
    packed_weights_enabled,
    unpack_linear_weights,
)

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="needs a torch build with MKL")
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize(
    ("in_features", "out_features", "bias", "shape"),
    [
        (37, 53, True, (5, 37)),
        (64, 1000, False, (1, 5, 64)),
        (576, 192, True, (5, 1, 576)),
        (3, 1, True, (5, 3)),
    ],
)
def test_packed_rows_match_linear_and_other_rows_are_linear(in_features, out_features, bias, shape) -> None:
    torch.manual_seed(in_features)
    layer = nn.Linear(in_features, out_features, bias=bias)
    plain = nn.Linear(in_features, out_features, bias=bias)
    plain.load_state_dict(layer.state_dict())
    assert pack_linear_weights(layer, rows=5) == 1 and isinstance(layer, PackedLinear)
    inputs = torch.randn(shape)
    torch.testing.assert_close(layer(inputs), plain(inputs), **TOLERANCE)
    layer.packed_weight = torch.ops.mkl._mkl_reorder_linear_weight(torch.zeros_like(layer.weight), 5)
    assert not torch.allclose(layer(inputs), plain(inputs)), "that width reads the packed copy"
    layer.packed_weight = torch.ops.mkl._mkl_reorder_linear_weight(layer.weight.detach(), 5)
    for rows in (1, 3, 4, 6, 16):  # not the packed width: F.linear itself, bit for bit
        other = torch.randn(rows, in_features)
        assert torch.equal(layer(other), plain(other))
    assert layer.state_dict().keys() == plain.state_dict().keys()


def test_a_weight_changed_in_place_falls_back_to_linear() -> None:
    layer = nn.Linear(8, 4)
    pack_linear_weights(layer, rows=2)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    inputs = torch.randn(2, 8)
    assert torch.equal(layer(inputs), nn.functional.linear(inputs, layer.weight, layer.bias))


def test_model_outputs_match_and_unpack_restores_plain_layers() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama", 16, num_hidden_layers=2)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        expected = model(ids).logits
        layers = pack_linear_weights(model, rows=5)
        assert layers == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer, then the LM head
        torch.testing.assert_close(model(ids).logits, expected, **TOLERANCE)
        with packed_weights_enabled(model, False):
            assert torch.equal(model(ids).logits, expected)
        assert all(module.packed_enabled for module in model.modules() if isinstance(module, PackedLinear))
        assert unpack_linear_weights(model) == layers
        assert not any(isinstance(module, PackedLinear) for module in model.modules())
        assert torch.equal(model(ids).logits, expected)


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="rows must be >= 1"):
        pack_linear_weights(nn.Linear(4, 4), rows=0)
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).double())
    with pytest.raises(ValueError, match=r"float32 CPU layers, got torch\.float64"):
        pack_linear_weights(mixed, rows=2)
    assert not any(isinstance(module, PackedLinear) for module in mixed.modules()), "nothing half-packed"
