"""The package's Adamas attention against the plain loop of hf_adamas.naive (the paper's rule)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_config
from helpers import assert_close
from transformers import AutoModelForCausalLM

from hf_adamas import AdamasConfig, apply_adamas, naive
from hf_adamas.attention import adamas_attention_forward

THRESHOLDS = [-1.0, 0.0, 1.0]  # every code value occurs for N(0, 1) inputs (the paper's ±10 rarely fires)


def test_sylvester_matrix_is_orthonormal_and_rejects_other_sizes() -> None:
    h = naive.sylvester_hadamard(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        naive.sylvester_hadamard(24)


def test_selection_keeps_forced_then_nearest_with_ties_to_recent() -> None:
    distance = torch.tensor([6, 0, 1, 1, 4, 6])
    # sink 0 and the current token 5 are forced; then distance 0 (pos 1), then the tie 2/3 -> 3 first.
    assert naive.selected_positions(distance, 4, sink_tokens=1, recent_tokens=0) == [0, 5, 1, 3]


@pytest.mark.parametrize("rescore_candidates", [0, 20, 128])  # no second stage, a real one, every key
@pytest.mark.parametrize("selector", ["adamas", "adamas_asymmetric"])
@pytest.mark.parametrize(
    ("sink_tokens", "recent_tokens", "budget", "length"), [(0, 0, 8, 40), (2, 3, 12, 33), (1, 0, 5, 6)]
)
def test_attention_forward_equals_the_naive_loop(
    selector, sink_tokens, recent_tokens, budget, length, rescore_candidates
) -> None:
    torch.manual_seed(length)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama", head_dim=32)).eval()
    centroids = torch.randn(2, 4).sort(dim=-1).values  # [kv heads, codes], any increasing values
    settings = AdamasConfig(
        selector=selector,
        centroids=[centroids.tolist()] * 4 if selector == "adamas_asymmetric" else None,
        token_budget=budget,
        dense_layers=1,
        thresholds=THRESHOLDS,
        sink_tokens=sink_tokens,
        recent_tokens=recent_tokens,
        rescore_candidates=rescore_candidates,
    )
    apply_adamas(model, settings)
    module = model.model.layers[1].self_attn
    query = torch.randn(1, 4, 1, 32)
    key, value = torch.randn(1, 2, length, 32), torch.randn(1, 2, length, 32)
    out, _ = adamas_attention_forward(module, query, key, value, None, scaling=module.scaling)
    expected = naive.adamas_decode_attention(
        query[0, :, 0],
        key[0],
        value[0],
        torch.tensor(THRESHOLDS),
        budget,
        module.scaling,
        sink_tokens,
        recent_tokens,
        centroids if selector == "adamas_asymmetric" else None,
        settings.candidate_pool,
    )
    assert_close("adamas vs naive", expected, out[0, 0], 1e-5)
