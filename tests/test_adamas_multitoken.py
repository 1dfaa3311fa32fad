"""Multi-token forwards (speculative verification, tree masks included) under Adamas run dense and equal sdpa."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_config
from transformers import AutoModelForCausalLM, DynamicCache

from hf_adamas import AdamasConfig, AdamasLayer, apply_adamas
from hf_common.compat import cache_kwargs

PREFIX = 48


def _tree_mask(parents: list[int]) -> torch.Tensor:
    """``[1, 1, T, PREFIX + T]`` bool: every node sees the prefix, itself and its ancestors."""
    nodes = len(parents)
    mask = torch.zeros(nodes, PREFIX + nodes, dtype=torch.bool)
    mask[:, :PREFIX] = True
    for node in range(nodes):
        ancestor = node
        while ancestor >= 0:
            mask[node, PREFIX + ancestor] = True
            ancestor = parents[ancestor]
    return mask[None, None]


def _depths(parents: list[int]) -> list[int]:
    depths = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return depths


# A 6-node draft tree (two branches of a root, the first forking again) and a 64-token chain.
TREES = {"tree": [-1, 0, 0, 1, 1, 2], "chain64": [-1, *range(63)]}


@pytest.mark.parametrize("shape", list(TREES))
def test_tree_verification_forward_equals_sdpa(shape: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama")).eval()
    apply_adamas(model, AdamasConfig(token_budget=8, dense_layers=0))
    parents = TREES[shape]
    prompt = torch.randint(3, 128, (1, PREFIX))
    tree_ids = torch.randint(3, 128, (1, len(parents)))
    positions = torch.tensor([[PREFIX + depth for depth in _depths(parents)]])
    mask = _tree_mask(parents)

    logits, caches = {}, {}
    with torch.no_grad():
        for attention in ("sdpa", "adamas"):
            model.set_attn_implementation(attention)
            cache = DynamicCache(config=model.config)
            model(prompt, **cache_kwargs(cache))
            out = model(tree_ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache))
            logits[attention], caches[attention] = out.logits, cache
    assert all(
        isinstance(layer, AdamasLayer) for layer in caches["adamas"].layers
    )  # the sparse machinery is on
    assert torch.equal(logits["adamas"], logits["sdpa"])

    # The next one-token step, after the last node's branch was accepted, does run sparse: it is not sdpa.
    step_mask = torch.cat([mask[:, :, -1:], torch.ones(1, 1, 1, 1, dtype=torch.bool)], dim=-1)
    next_token, step_logits = torch.tensor([[5]]), {}
    with torch.no_grad():
        for attention in ("sdpa", "adamas"):
            model.set_attn_implementation(attention)
            step_logits[attention] = model(
                next_token,
                attention_mask=step_mask,
                position_ids=positions[:, -1:] + 1,
                **cache_kwargs(copy.deepcopy(caches[attention])),
            ).logits
    assert torch.isfinite(step_logits["adamas"]).all()
    assert not torch.equal(step_logits["adamas"], step_logits["sdpa"])
