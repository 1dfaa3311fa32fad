"""Which keys each head attends to in a sparse decode step: Adamas, its asymmetric variant, two baselines, an exact bound.

Every selector returns ``int64`` indices ``[batch, heads, token_budget]`` (``heads`` is the number
of query heads, or of KV heads when a KV group shares one selection), sorted by position, ``-1``
where fewer valid positions than the budget exist. All rank positions with an integer
"distance" under the same deterministic top-k rules (`ops.select_topk`; on CPU the two Adamas rules
run it fused with their scores, `ops.select_by_code_distance` / `ops.select_by_centroid_scores`), so
they differ only in the ranking (and all keep the same forced tokens):

- ``adamas``: Manhattan distance between the 2-bit Hadamard codes of the query and of each key
  (the paper's rule);
- ``adamas_asymmetric``: the query's full-precision Hadamard values dotted with each key code's
  bucket centroids (`ops.centroid_scores`), largest first: the same key codes and code cache, but
  the query is not quantized, so the score estimates ``q · k`` instead of comparing two codes. Its
  per-byte lookup table has 256 float entries per query head, as the L1 table has integer ones;
- ``streaming_llm``: recency, with ``sink_tokens`` leading tokens forced (StreamingLLM);
- ``oracle``: the exact ``q · k`` over the full keys, largest first: the best any top-k selection
  can do at the budget, the bound the estimators are measured against (it reads every key);
- ``quest``: pages of ``quest_page_size`` tokens ranked by the upper bound
  ``sum_i max(q_i * min_i, q_i * max_i)`` over the page's per-channel key min/max (Quest), the
  current page forced. Page statistics are computed from the keys each step: the baseline is for
  accuracy comparisons, not speed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_adamas import ops
from hf_adamas.calibration import OnlineCalibratedLayer
from hf_adamas.codebook import code_book, threshold_centroids
from hf_adamas.config import AdamasConfig
from hf_adamas.ops.reference import largest_first

KeyCodes = Callable[[torch.Tensor], torch.Tensor]

CACHE_LAYER_ATTRIBUTE = "_adamas_cache_layer"
"""Attribute of an attention module holding its cache layer for the current call (set by a pre-hook)."""


def forced_positions(
    settings: AdamasConfig, valid: torch.Tensor | None, batch: int, length: int, device
) -> torch.Tensor:
    """``[batch, length]`` bool: the current token, the first ``sink_tokens`` valid tokens, the recent window.

    Read-only: the part that does not depend on padding is cached, so that every sparse layer of a
    decode step gets the same tensor.
    """
    if valid is None:
        return _fixed_forced_positions(settings.sink_tokens, settings.recent_tokens, batch, length, device)
    forced = _fixed_forced_positions(0, settings.recent_tokens, batch, length, device)
    if settings.sink_tokens:
        forced = forced | (valid & (valid.long().cumsum(-1) <= settings.sink_tokens))
    return forced


@functools.lru_cache(maxsize=4)
def _fixed_forced_positions(
    sink_tokens: int, recent_tokens: int, batch: int, length: int, device
) -> torch.Tensor:
    """The current token, the recent window and the first ``sink_tokens`` positions, ``[batch, length]``."""
    forced = torch.zeros(batch, length, dtype=torch.bool, device=device)
    forced[:, max(0, length - 1 - recent_tokens) :] = True
    forced[:, :sink_tokens] = True
    return forced


def thresholds_tensor(settings: AdamasConfig, layer_idx: int) -> torch.Tensor:
    """This layer's thresholds as a CPU tensor (the kernels read them as scalars), built once."""
    cache = settings.__dict__.setdefault("_threshold_tensors", {})
    if layer_idx not in cache:
        cache[layer_idx] = torch.tensor(settings.thresholds_for_layer(layer_idx), dtype=torch.float32)
    return cache[layer_idx]


def _estimate_then_rescore(
    settings: AdamasConfig,
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor | None,
    estimate: Callable[[int, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``estimate(budget, forced)``'s selection, or when `AdamasConfig.candidate_pool` exceeds the
    budget, that many candidates narrowed to the budget by the exact scores (`ops.rescore_selection`);
    with those candidates (None without rescoring)."""
    forced = forced_positions(settings, valid, key.shape[0], key.shape[2], key.device)
    pool = settings.candidate_pool
    if pool <= settings.token_budget:
        return estimate(settings.token_budget, forced), None
    candidates = estimate(pool, forced)
    return ops.rescore_selection(query, key, candidates, settings.token_budget, forced), candidates


def select_adamas(
    settings: AdamasConfig,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor | None,
    key_codes: KeyCodes,
) -> torch.Tensor:
    thresholds = thresholds_tensor(settings, module.layer_idx)
    shared = settings.gqa_selection == "shared_per_kv_group"
    q_codes = ops.hadamard_codes(query, thresholds, settings.bits)
    codes = key_codes(thresholds)
    indices, _ = _estimate_then_rescore(
        settings,
        query,
        key,
        valid,
        lambda budget, forced: ops.select_by_code_distance(
            q_codes, codes, settings.bits, shared, budget, valid, forced
        ),
    )
    return indices


def code_book_for(
    settings: AdamasConfig, module: torch.nn.Module, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """This layer's thresholds (CPU) and centroids ``[kv_heads, 2**bits]``.

    ``calibration="online"``: those of the layer's `OnlineCalibratedLayer` (its prompt's prefill),
    or, without a code cache (e.g. a static cache), the statistics of the keys at hand.
    ``"fixed"``: the configured thresholds with the configured centroids, or those the thresholds imply.
    """
    if settings.calibration == "online":
        layer = getattr(module, CACHE_LAYER_ATTRIBUTE, None)
        if isinstance(layer, OnlineCalibratedLayer) and layer.centroids is not None:
            return layer.thresholds, layer.centroids
        return code_book(key, settings.bits)
    thresholds = thresholds_tensor(settings, module.layer_idx)
    cache = settings.__dict__.setdefault("_centroid_tensors", {})
    if (module.layer_idx, key.device) not in cache:
        if settings.centroids is None:
            centroids = threshold_centroids(thresholds, key.shape[1])
        else:
            centroids = torch.tensor(settings.centroids[module.layer_idx], dtype=torch.float32)
        cache[module.layer_idx, key.device] = centroids.to(key.device)
    return thresholds, cache[module.layer_idx, key.device]


def select_adamas_asymmetric(
    settings: AdamasConfig,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor | None,
    key_codes: KeyCodes,
) -> torch.Tensor:
    return select_asymmetric_with_candidates(settings, module, query, key, valid, key_codes)[0]


def select_asymmetric_with_candidates(
    settings: AdamasConfig,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor | None,
    key_codes: KeyCodes,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`select_adamas_asymmetric`'s selection and, when it rescores, the estimate's candidates
    it was rescored from (their keys were read exactly; the tail estimate keeps their logits)."""
    thresholds, centroids = code_book_for(settings, module, key)
    shared = settings.gqa_selection == "shared_per_kv_group"
    codes = key_codes(thresholds)
    return _estimate_then_rescore(
        settings,
        query,
        key,
        valid,
        lambda budget, forced: ops.select_by_centroid_scores(
            query, codes, centroids, settings.bits, shared, budget, valid, forced
        ),
    )


def select_oracle(
    settings: AdamasConfig,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor | None,
    key_codes: KeyCodes,
) -> torch.Tensor:
    batch, q_heads, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    grouped = query.float().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    scores = grouped @ key.float().transpose(2, 3)  # [B, Hkv, G, S]
    if settings.gqa_selection == "shared_per_kv_group":
        scores = scores.sum(2, keepdim=True)
    forced = forced_positions(settings, valid, batch, length, key.device)
    return ops.select_topk(
        largest_first(scores.reshape(batch, -1, length)), settings.token_budget, valid, forced
    )


def select_streaming_llm(
    settings: AdamasConfig,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor | None,
    key_codes: KeyCodes,
) -> torch.Tensor:
    batch, kv_heads, length, _ = key.shape
    recency = torch.arange(length - 1, -1, -1, dtype=torch.int32, device=key.device)
    distance = recency.expand(batch, kv_heads, length)
    forced = forced_positions(settings, valid, batch, length, key.device)
    return ops.select_topk(distance, settings.token_budget, valid, forced)


def select_quest(
    settings: AdamasConfig,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor | None,
    key_codes: KeyCodes,
) -> torch.Tensor:
    batch, q_heads, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    page = settings.quest_page_size
    pages = -(-length // page)
    lows = highs = key.float()
    if valid is not None:  # padding must not widen a page's min/max
        lows = lows.masked_fill(~valid[:, None, :, None], float("inf"))
        highs = highs.masked_fill(~valid[:, None, :, None], float("-inf"))
    tail = pages * page - length
    page_min = F.pad(lows, (0, 0, 0, tail), value=float("inf")).view(batch, kv_heads, pages, page, -1).amin(3)
    page_max = (
        F.pad(highs, (0, 0, 0, tail), value=float("-inf")).view(batch, kv_heads, pages, page, -1).amax(3)
    )
    q = query.float().view(batch, kv_heads, -1, 1, head_dim)
    bound = torch.maximum(q * page_min[:, :, None], q * page_max[:, :, None]).sum(-1)  # [B, Hkv, G, pages]
    empty_page = torch.isinf(page_min[..., 0])[:, :, None]
    bound = bound.masked_fill(empty_page, float("-inf")).view(batch, q_heads, pages)
    page_rank = bound.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1).to(torch.int32)
    distance = page_rank.repeat_interleave(page, dim=-1)[..., :length]
    current_page = torch.arange(length, device=key.device) >= (length - 1) // page * page
    forced = forced_positions(settings, valid, batch, length, key.device) | current_page
    return ops.select_topk(distance, settings.token_budget, valid, forced)


SELECTORS: dict[str, Callable[..., torch.Tensor]] = {
    "adamas": select_adamas,
    "adamas_asymmetric": select_adamas_asymmetric,
    "streaming_llm": select_streaming_llm,
    "quest": select_quest,
    "oracle": select_oracle,
}
