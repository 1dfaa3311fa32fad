"""The Adamas decode step as the paper states it: a plain loop, the oracle the fast paths are tested against.

For one decode query and a cache of ``S`` keys, each query head ``h`` (reading KV head ``h // group``):

1. Hadamard-transform the post-RoPE query and keys: ``q̂ = q H``, ``k̂ = k H`` (``H`` Sylvester, orthonormal).
2. Bucket every coordinate into a 2-bit code: the number of thresholds strictly below it.
3. Score each key by the Manhattan distance between its code vector and the query's (the paper's
   rule, ``selector="adamas"``), or, with ``centroids`` (``selector="adamas_asymmetric"``), by the
   dot product of the full-precision ``q̂`` with the key's dequantized codes ``centroids[code]``.
4. Keep ``token_budget`` keys: the current token, ``sink_tokens`` first and ``recent_tokens`` last ones
   always, then the best scores (smallest distance, largest dot product; ties to the more recent key).
   With a ``candidate_pool`` above the budget (``AdamasConfig.candidate_pool``, not in the paper), keep
   that many this way, then the budget best of them by the exact ``q · k`` (forced ones first).
5. Exact softmax attention of ``q`` over the kept keys and values.

Nothing here is fast: no packing, no lookup tables, one head at a time.
"""

from __future__ import annotations

import math

import torch


def sylvester_hadamard(dim: int) -> torch.Tensor:
    """The orthonormal ``dim x dim`` Sylvester-Hadamard matrix (``dim`` a power of two), float64."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two dimension, got {dim}")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < dim:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / math.sqrt(dim)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` in float64."""
    return x.double() @ sylvester_hadamard(x.shape[-1])


def codes(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Per coordinate of ``x @ H``, the number of ``thresholds`` strictly below it (int64, same shape)."""
    return (hadamard(x).unsqueeze(-1) > thresholds.double()).sum(-1)


def selected_positions(
    distance: torch.Tensor, token_budget: int, sink_tokens: int, recent_tokens: int
) -> list[int]:
    """Positions one head attends to: forced ones first, then the smallest ``distance [S]``."""
    length = distance.shape[0]
    forced = {p for p in range(length) if p < sink_tokens or p >= length - 1 - recent_tokens}
    if len(forced) > token_budget:
        raise ValueError(f"{len(forced)} forced positions exceed the token budget {token_budget}")
    ranked = sorted(set(range(length)) - forced, key=lambda p: (float(distance[p]), -p))
    return sorted(forced) + ranked[: token_budget - len(forced)]


def adamas_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    thresholds: torch.Tensor,
    token_budget: int,
    scaling: float,
    sink_tokens: int = 0,
    recent_tokens: int = 0,
    centroids: torch.Tensor | None = None,
    candidate_pool: int = 0,
) -> torch.Tensor:
    """One decode step of Adamas attention for one sequence.

    Args:
        query: ``[Hq, D]`` post-RoPE query of the new token.
        key, value: ``[Hkv, S, D]`` the cache, the new token last (``Hq`` a multiple of ``Hkv``).
        thresholds: the bucket boundaries (3 for 2-bit codes).
        token_budget: keys kept per query head.
        scaling: softmax scale, normally ``D ** -0.5``.
        centroids: ``[Hkv, 2**bits]`` value of each code per KV head: score by ``q̂ · centroids[codes]``
            instead of the L1 code distance.
        candidate_pool: keys the code score proposes for an exact second stage (step 4); at or below
            ``token_budget`` there is none.

    Returns:
        ``[Hq, D]`` float32 attention output.
    """
    group = query.shape[0] // key.shape[0]
    out = torch.empty(query.shape, dtype=torch.float32)
    for head in range(query.shape[0]):
        head_keys, head_values = key[head // group].float(), value[head // group].float()
        key_codes = codes(head_keys, thresholds)
        if centroids is None:
            distance = (key_codes - codes(query[head], thresholds)).abs().sum(-1)
        else:
            distance = -(hadamard(query[head]) * centroids[head // group].double()[key_codes]).sum(-1)
        kept = selected_positions(distance, max(token_budget, candidate_pool), sink_tokens, recent_tokens)
        if candidate_pool > token_budget:
            exact = torch.full_like(distance, math.inf, dtype=torch.float64)
            exact[kept] = -(head_keys[kept].double() @ query[head].double())
            kept = selected_positions(exact, token_budget, sink_tokens, recent_tokens)
        weights = torch.softmax(head_keys[kept] @ query[head].float() * scaling, dim=0)
        out[head] = weights @ head_values[kept]
    return out
