"""Plain-PyTorch Adamas ops: the specification the Triton kernels are tested against, and the CPU path.

Adamas (arXiv 2510.18413) ranks past tokens for one decode query by comparing short codes of the
Walsh-Hadamard-transformed query and keys, then attends exactly over the best ``budget`` tokens:

1. ``x̂ = x @ H_D / sqrt(D)`` (orthonormal Sylvester Hadamard, no random signs; ``(qH)(kH)ᵀ = qkᵀ``).
2. Per dimension, ``c = Σ_j [x̂ > t_j]`` with increasing thresholds ``t`` (3 for 2-bit codes, 1 for 1-bit).
3. Relevance is the exact Manhattan distance ``Σ_i |c_q,i - c_k,i|`` (not the popcount approximation of the
   official CUDA kernel, which scores the code pair (1, 2) as 3).
4. Keep the ``budget`` keys with the smallest distance; softmax attention over just those.

``centroid_scores`` is the asymmetric alternative to step 3 (selector ``"adamas_asymmetric"``): the
full-precision ``q̂`` against each key code's bucket centroid, ranked by the largest score.

Packed code layout (shared by every op and the key-code cache): ``8 // bits`` codes per byte, little end
first. Dimension ``i`` lives in byte ``i // (8 // bits)`` at bits ``[bits * (i % (8 // bits)), bits * (i %
(8 // bits)) + bits)``. With ``bits=2`` and ``D=64`` a token costs 16 bytes per head: 1/8 of a bf16 key,
1/16 of bf16 K+V.

All math runs in float32; inputs may be any float dtype. The functions are vectorised over batch, heads
and tokens so they double as the production path on CPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from hf_adamas._validation import (
    PACKED_CODE_WIDTHS,
    check_attention_inputs,
    check_bits,
    check_centroid_score_inputs,
    check_code_distance_inputs,
    check_head_dim,
    check_thresholds,
    codes_per_byte,
)

__all__ = [
    "PackedCodes",
    "asymmetric_decode_step",
    "byte_centroids",
    "byte_codes",
    "byte_table_sum",
    "centroid_scores",
    "centroid_table",
    "code_distance",
    "code_values",
    "distance_table",
    "gather_positions",
    "hadamard_codes",
    "hadamard_matrix",
    "largest_first",
    "log_mass",
    "pack_codes",
    "quantized_centroid_scores",
    "select_by_table",
    "select_topk",
    "selected_attention_partials",
    "selected_mask",
    "sparse_decode_attention",
    "tail_calibration_stride",
    "tail_decode_attention",
    "unpack_codes",
]


def hadamard_matrix(dim: int, device: torch.device | str | None = None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix ``H_dim / sqrt(dim)`` (symmetric, its own inverse).

    Cached per ``(dim, device, dtype)``; treat the result as read-only.
    """
    check_head_dim(dim)
    return _hadamard_matrix(dim, torch.device(device if device is not None else "cpu"), dtype)


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)  # cached: an inference tensor would break later autograd-tracked forwards
def _hadamard_matrix(dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return (h / dim**0.5).to(device=device, dtype=dtype)


def hadamard_values(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` in the orthonormal Hadamard basis, float32: what codes and scores are made of."""
    return x.float() @ hadamard_matrix(x.shape[-1], x.device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., D]`` (values below ``2**bits``) into uint8 ``[..., D * bits // 8]``."""
    per_byte = codes_per_byte(bits)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    grouped = codes.to(torch.int32).unflatten(-1, (-1, per_byte))
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack uint8 ``[..., P]`` into codes uint8 ``[..., P * 8 // bits]`` (inverse of :func:`pack_codes`)."""
    check_bits(bits, PACKED_CODE_WIDTHS)
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


def hadamard_codes(x: torch.Tensor, thresholds: torch.Tensor, bits: int) -> torch.Tensor:
    """Hadamard-transform ``x [..., D]`` and bucketize it into packed codes uint8 ``[..., D * bits // 8]``.

    ``thresholds`` holds ``2**bits - 1`` strictly increasing values; the code of a dimension is the number of
    thresholds its transformed value is strictly greater than. Keep ``thresholds`` on the CPU: it is read
    back for validation.
    """
    check_thresholds(thresholds, bits)
    check_head_dim(x.shape[-1])
    x_hat = hadamard_values(x)
    t = thresholds.to(device=x.device, dtype=torch.float32)
    return pack_codes((x_hat.unsqueeze(-1) > t).sum(-1), bits)


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)  # cached, as the Hadamard matrix
def byte_codes(bits: int, device: torch.device) -> torch.Tensor:
    """The codes packed in each byte value, as float32 ``[256, 8 // bits]``."""
    return unpack_codes(torch.arange(256, dtype=torch.uint8, device=device).unsqueeze(-1), bits).float()


def byte_centroids(centroids: torch.Tensor, bits: int, device: torch.device) -> torch.Tensor:
    """float32 ``[H, 256, 8 // bits]``: the centroids ``[H, 2**bits]`` that the codes of each byte value stand for."""
    return centroids.float().to(device)[:, byte_codes(bits, device).long()]


def code_distance(
    q_codes: torch.Tensor, k_codes: torch.Tensor, bits: int, shared_per_kv_group: bool
) -> torch.Tensor:
    """Exact Manhattan distance between one query token's codes and every key's codes.

    Args:
        q_codes: packed uint8 ``[B, Hq, P]``.
        k_codes: packed uint8 ``[B, Hkv, S, P]``; query head ``h`` uses KV head ``h // (Hq // Hkv)``.
        bits: code width the codes were packed with (1 or 2).
        shared_per_kv_group: if True, return one row per KV head, the sum of its G query heads' distances.

    Returns:
        int32 ``[B, Hq, S]``, or ``[B, Hkv, S]`` when ``shared_per_kv_group``.

    A byte of key codes contributes ``Σ_m |c_q,m - c_k,m|`` over its ``8 // bits`` dimensions, which
    depends only on the byte's value and position. So the query is turned into a table
    ``[P, 256]`` of those contributions (one column per query head of the group) and each key's
    distance is the sum of ``P`` table rows picked by its bytes: one ``embedding_bag`` that reads
    the packed codes as they are, without unpacking them. Exact: every partial sum is a small integer.
    """
    return byte_table_sum(distance_table(q_codes, k_codes, bits), k_codes, shared_per_kv_group).int()


def distance_table(q_codes: torch.Tensor, k_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The query's L1 lookup table ``[B, Hkv, G, P, 256]`` of :func:`code_distance`.

    Entry ``[b, h, g, p, v]`` is ``Σ_m |c_q,m - c_v,m|`` over the ``8 // bits`` codes of query head
    ``h * G + g`` at byte position ``p`` and those packed in byte value ``v`` (a small integer).
    """
    group = check_code_distance_inputs(q_codes, k_codes)
    check_bits(bits)
    bsz, num_kv_heads, _, packed = k_codes.shape
    query = unpack_codes(q_codes, bits).long().view(bsz, num_kv_heads, group, packed, 8 // bits)
    one_hot = torch.nn.functional.one_hot(query, 2**bits).float()  # [B, Hkv, G, P, 8 // bits, 2**bits]
    return torch.einsum("bhgpma,mav->bhgpv", one_hot, _code_gaps(bits, k_codes.device))


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)  # cached, as the Hadamard matrix
def _code_gaps(bits: int, device: torch.device) -> torch.Tensor:
    """``|a - c|`` for query code ``a`` and code ``c`` at slot ``m`` of byte value ``v``: ``[8 // bits, 2**bits, 256]``."""
    codes = torch.arange(2**bits, device=device, dtype=torch.float32)
    return (codes[None, :, None] - byte_codes(bits, device).T[:, None, :]).abs()


def centroid_scores(
    query: torch.Tensor, k_codes: torch.Tensor, centroids: torch.Tensor, bits: int, shared_per_kv_group: bool
) -> torch.Tensor:
    """Asymmetric scores: the query's Hadamard values dotted with each key's dequantized codes.

    ``score(q, k_j) = Σ_i q̂_i · centroids[h, c_kj,i]``, with ``q̂ = q @ H_D / sqrt(D)`` in full
    precision and ``c_kj,i`` the 2-bit (or 1-bit) code of key ``j`` in dimension ``i``: an estimate
    of ``q · k_j`` from the key codes alone (larger = more relevant).

    Args:
        query: ``[B, Hq, D]``, one decode token, any float dtype.
        k_codes: packed uint8 ``[B, Hkv, S, D * bits // 8]``; query head ``h`` uses KV head ``h // G``.
        centroids: ``[Hkv, 2**bits]``, the value each code stands for, per KV head.
        bits: code width the codes were packed with (1 or 2).
        shared_per_kv_group: if True, one row per KV head, the sum over its G query heads.

    Returns:
        float32 ``[B, Hq, S]``, or ``[B, Hkv, S]`` when ``shared_per_kv_group``.

    As in :func:`code_distance`, a byte of key codes contributes an amount that depends only on the
    byte's value and position, so the query becomes a table ``[P, 256]`` per query head (a float
    lookup table of the same shape as the L1 one) summed with one ``embedding_bag``.
    """
    return byte_table_sum(centroid_table(query, k_codes, centroids, bits), k_codes, shared_per_kv_group)


def centroid_table(
    query: torch.Tensor, k_codes: torch.Tensor, centroids: torch.Tensor, bits: int
) -> torch.Tensor:
    """The query's float lookup table ``[B, Hkv, G, P, 256]`` of :func:`centroid_scores`.

    Entry ``[b, h, g, p, v]`` is ``Σ_m q̂[b, h * G + g, p * (8 // bits) + m] · centroids[h, code m of v]``:
    what a key byte of value ``v`` at byte position ``p`` adds to the score.
    """
    group = check_centroid_score_inputs(query, k_codes, centroids, bits)
    bsz, num_kv_heads, _, packed = k_codes.shape
    q_hat = hadamard_values(query)
    q_hat = q_hat.view(bsz, num_kv_heads, group, packed, 8 // bits)
    byte_values = byte_centroids(centroids, bits, k_codes.device)
    # Summed in float64 and rounded once, so that the fused CPU op, which sums in another order, gets
    # the same float32 entries (but for a tie within 1e-16).
    table = torch.einsum(
        "bhgpm,hvm->bhgpv", q_hat.double(), byte_values.double()
    )  # byte_values: [Hkv, 256, 8 // bits]
    return table.float()


def quantized_centroid_scores(
    query: torch.Tensor, k_codes: torch.Tensor, centroids: torch.Tensor, bits: int
) -> torch.Tensor:
    """:func:`centroid_scores` per query head as the CPU fast scan computes them: float32 ``[B, Hq, S]``.

    A key's score is a sum over its ``2 P`` code nibbles (4 bits each) of a term the query fixes. Per
    query head, each nibble's 16 terms (summed in float64) minus their lowest are rounded, ties to
    even, onto one grid of ``step = widest range / 255``: uint8 entries whose per-key sums are exact
    integers (what AVX2 byte shuffles add, 32 keys at a time). The score is ``Σ lowest + step *
    Σ entries``, within ``P * step`` of :func:`centroid_scores` (half a step per nibble).
    """
    group = check_centroid_score_inputs(query, k_codes, centroids, bits)
    bsz, num_kv_heads, _, packed = k_codes.shape
    half = codes_per_byte(bits) // 2
    q_hat = hadamard_values(query).double().view(bsz, num_kv_heads, group, 2 * packed, half)
    nibble_codes = byte_codes(bits, k_codes.device)[:16, :half].long()  # the codes of nibble value v
    nibble_values = centroids.double().to(k_codes.device)[:, nibble_codes]  # [Hkv, 16, half]
    terms = torch.einsum("bhgnm,hvm->bhgnv", q_hat, nibble_values)  # [B, Hkv, G, 2P, 16]
    lowest = terms.amin(-1, keepdim=True)
    widest = (terms.amax(-1, keepdim=True) - lowest).amax(-2, keepdim=True)
    scale = torch.where(widest > 0, 255.0 / widest, 0.0)
    entries = torch.round((terms - lowest) * scale).clamp(max=255)  # exact small integers
    low, high = entries[..., 0::2, :], entries[..., 1::2, :]  # [B, Hkv, G, P, 16] per byte's nibbles
    byte_entries = (high[..., :, None] + low[..., None, :]).flatten(-2)  # byte v = 16 * high + low
    estimates = byte_table_sum(byte_entries.float(), k_codes, shared_per_kv_group=False)  # exact integers
    step = (widest / 255.0).float().view(bsz, -1, 1)
    offset = lowest.sum(-2).float().view(bsz, -1, 1)
    return offset + step * estimates


def byte_table_sum(table: torch.Tensor, k_codes: torch.Tensor, shared_per_kv_group: bool) -> torch.Tensor:
    """``Σ_p table[b, h, g, p, k_codes[b, h, s, p]]`` as float32 ``[B, Hkv * G, S]`` (or ``[B, Hkv, S]``).

    ``table`` is ``[B, Hkv, G, P, 256]``: per query head ``g`` of KV head ``h``, what byte value ``v``
    at byte position ``p`` of a key contributes. With ``shared_per_kv_group`` the G tables are summed
    first (the sum of the group's rows). One ``embedding_bag`` reads the packed codes as they are.
    """
    bsz, num_kv_heads, seq_len, packed = k_codes.shape
    if shared_per_kv_group:
        table = table.sum(2, keepdim=True)
    columns = table.shape[2]
    weight = table.permute(0, 1, 3, 4, 2).reshape(-1, columns)  # row ((b * Hkv + h) * P + j) * 256 + byte
    first_row = torch.arange(bsz * num_kv_heads * packed, device=k_codes.device).view(-1, 1, packed) * 256
    rows = k_codes.reshape(bsz * num_kv_heads, seq_len, packed).long() + first_row
    if columns == 1:  # embedding_bag is ~6x slower than a plain gather-and-sum for one column on CPU
        total = weight[:, 0][rows.view(-1, packed)].sum(-1, keepdim=True)
    else:
        total = torch.nn.functional.embedding_bag(rows.view(-1, packed), weight, mode="sum")
    return total.view(bsz, num_kv_heads, seq_len, columns).transpose(2, 3).reshape(bsz, -1, seq_len)


def largest_first(scores: torch.Tensor) -> torch.Tensor:
    """Non-negative int64 "distances" ranking float32 ``scores`` largest first, exactly.

    The float32 bit pattern, read as an integer and reflected for negative values, orders like the
    float; subtracting it from ``2**31 - 1`` reverses the order and keeps every value >= 0, which
    :func:`select_topk` needs to rank forced positions (negative keys) first.
    """
    bits = scores.float().contiguous().view(torch.int32).long()
    ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # in (-2**31, 2**31)
    return (2**31 - 1) - ordered


def select_by_table(
    table: torch.Tensor,
    k_codes: torch.Tensor,
    budget: int,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
    largest: bool,
) -> torch.Tensor:
    """Score every key with a byte table and keep the ``budget`` best: the CPU selection of both rules.

    ``table`` is ``[B, Hkv, C, P, 256]`` (:func:`distance_table` or :func:`centroid_table`, ``C`` = G,
    or 1 when a KV group shares one selection); ``largest`` ranks the scores largest first (centroid
    scores) instead of smallest first (integer L1 distances). Returns :func:`select_topk`'s indices
    ``[B, Hkv * C, budget]``. The fused C++ op of :mod:`hf_adamas.ops.cpu` computes the same indices.
    """
    scores = byte_table_sum(table, k_codes, shared_per_kv_group=False)
    distance = largest_first(scores) if largest else scores.int()
    return select_topk(distance, budget, valid, forced)


def select_topk(
    distance: torch.Tensor, budget: int, valid: torch.Tensor | None, forced: torch.Tensor | None
) -> torch.Tensor:
    """Pick, per row, the ``budget`` positions with the smallest distance.

    Args:
        distance: int32 ``[B, H, S]``.
        budget: number of positions to keep per row.
        valid: bool ``[B, S]``, False for padding (never selected), or None.
        forced: bool ``[B, S]`` of positions always selected (current token, sinks, recent window), or None.
            Forced positions rank before all others, the more recent first.

    Returns:
        int64 ``[B, H, budget]``: selected positions in ascending order, followed by ``-1`` in slots that
        no valid position can fill. Ties go to the more recent (larger) position, so the result is
        deterministic.
    """
    if budget < 1:
        raise ValueError(f"budget must be a positive number of tokens, got {budget}")
    if distance.dim() != 3:
        raise ValueError(f"distance must be [B, H, S], got shape {tuple(distance.shape)}")
    bsz, num_heads, seq_len = distance.shape
    for name, mask in (("valid", valid), ("forced", forced)):
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (bsz, seq_len)):
            raise ValueError(
                f"{name} must be a bool [B, S] = {[bsz, seq_len]} mask, got {mask.dtype} {list(mask.shape)}"
            )
    pos = torch.arange(seq_len, device=distance.device).expand(bsz, num_heads, seq_len)
    return _best_ranked(
        distance.long(),
        pos,
        seq_len,
        budget,
        None if forced is None else forced[:, None, :].expand_as(pos),
        None if valid is None else ~valid[:, None, :].expand_as(pos),
    )


def _best_ranked(
    distance: torch.Tensor,
    positions: torch.Tensor,
    seq_len: int,
    budget: int,
    forced: torch.Tensor | None,
    excluded: torch.Tensor | None,
) -> torch.Tensor:
    """The `select_topk` ranking of ``N`` entries per row: ``[B, H, budget]`` ascending positions, ``-1`` filled.

    ``distance``, ``positions`` (each entry's cache position), ``forced`` and ``excluded`` (never kept)
    are ``[B, H, N]``. The rank key is unique: distance first, then recency; forced keys are
    negative (the more recent first), excluded ones the largest int64.
    """
    key = distance * seq_len + (seq_len - 1 - positions)
    if forced is not None:
        key = torch.where(forced, -1 - positions, key)
    never = torch.iinfo(torch.int64).max
    if excluded is not None:
        key = key.masked_fill(excluded, never)
    keep = min(budget, key.shape[-1])
    chosen_key, order = torch.topk(key, keep, dim=-1, largest=False)
    chosen = positions.gather(-1, order).masked_fill(chosen_key == never, seq_len).sort(dim=-1).values
    chosen = chosen.masked_fill(chosen == seq_len, -1)
    if budget > keep:
        chosen = torch.cat([chosen, chosen.new_full((*chosen.shape[:2], budget - keep), -1)], dim=-1)
    return chosen


def rescore_selection(
    query: torch.Tensor, key: torch.Tensor, candidates: torch.Tensor, budget: int, forced: torch.Tensor | None
) -> torch.Tensor:
    """Keep the ``budget`` candidates with the largest exact ``q · k`` (forced ones first): a second stage.

    Args:
        query: ``[B, Hq, D]``.
        key: ``[B, Hkv, S, D]``.
        candidates: int64 ``[B, Hq or Hkv, R]`` from an estimator's selection (`select_topk` layout:
            ``-1`` for empty slots); a KV-group row scores with the sum of its query heads.
        budget: positions kept per row.
        forced: bool ``[B, S]`` of positions kept whatever their score (they rank first, the more
            recent first), or None.

    Returns:
        int64 ``[B, Hq or Hkv, budget]`` in `select_topk`'s layout, ties to the more recent position.
    """
    bsz, num_kv_heads, seq_len, _ = key.shape
    rows = candidates.shape[1]
    per_row = rows // num_kv_heads  # G if each query head has its own candidates, else 1
    safe = candidates.clamp(min=0)
    # Scores in float64, rounded to float32 for the ranking: the fused CPU op sums in another order,
    # and both round to the same float32 (but for a tie within 1e-16).
    k_sel = gather_positions(key, safe.reshape(bsz, num_kv_heads, -1)).double()  # [B, Hkv, per_row * R, D]
    k_sel = k_sel.unflatten(2, (per_row, -1))  # [B, Hkv, per_row, R, D]
    q = query.double().unflatten(1, (num_kv_heads, -1))  # [B, Hkv, G, D]
    if per_row == 1:
        q = q.sum(2, keepdim=True)  # the sum of the group's scores is the score of the summed query
    scores = (k_sel @ q.unsqueeze(-1)).squeeze(-1).reshape(bsz, rows, -1).float()  # [B, rows, R]
    is_forced = None if forced is None else forced.gather(1, safe.flatten(1)).view_as(safe)
    return _best_ranked(largest_first(scores), safe, seq_len, budget, is_forced, candidates < 0)


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``states[b, h, positions[b, h, i]]`` for ``states [B, H, S, D]``, ``positions [B, H, N]``.

    When each position's D values are contiguous and (batch, head) offsets are whole rows (as for
    contiguous tensors and for the filled prefix of a preallocated cache), the rows are copied with
    one ``index_select`` over the underlying storage, several times faster on CPU than ``gather``,
    which reads one index per element.
    """
    bsz, heads, _, dim = states.shape
    strides = states.stride()
    if strides[3] != 1 or strides[2] != dim or strides[0] % dim or strides[1] % dim:
        return states.gather(2, positions.unsqueeze(-1).expand(-1, -1, -1, dim))
    first_row = torch.arange(bsz, device=states.device).view(bsz, 1, 1) * (strides[0] // dim) + torch.arange(
        heads, device=states.device
    ).view(1, heads, 1) * (strides[1] // dim)
    rows_in_view = int(first_row.max()) + states.shape[2]
    rows = torch.as_strided(states, (rows_in_view, dim), (dim, 1))
    return rows.index_select(0, (first_row + positions).flatten()).view(bsz, heads, -1, dim)


def sparse_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Exact softmax attention of one decode token over the selected key/value positions.

    Args:
        query: ``[B, Hq, D]``.
        key, value: ``[B, Hkv, S, D]`` in their storage dtype; query head ``h`` uses KV head ``h // G``.
        indices: int64 ``[B, Hq, K]`` (per query head) or ``[B, Hkv, K]`` (shared by the G query heads of
            a group), each ``-1`` (skipped) or a position below S; order does not matter.
        scaling: score scale, usually ``D ** -0.5``.

    Returns:
        ``[B, Hq, D]`` in ``query.dtype``: ``softmax(q · k_selᵀ · scaling) @ v_sel`` computed in float32;
        zeros for a row with no valid index.
    """
    _, weight_sum, weighted_values = selected_attention_partials(query, key, value, indices, scaling)
    return (weighted_values / weight_sum.clamp(min=torch.finfo(torch.float32).tiny)).to(query.dtype)


def asymmetric_decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_codes: torch.Tensor,
    centroids: torch.Tensor,
    bits: int,
    shared_per_kv_group: bool,
    budget: int,
    candidate_pool: int,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the asymmetric rule: the ``budget`` keys with the largest centroid scores
    (:func:`centroid_table`, :func:`select_by_table`), or when ``candidate_pool`` exceeds the budget,
    that many narrowed to the budget by their exact scores (:func:`rescore_selection`); then exact
    attention over them.

    Returns the output ``[B, Hq, D]`` and the indices ``[B, Hq or Hkv, budget]``. The twin of the
    fused CPU op, which also writes the codes of the keys appended since the last step.
    """
    table = centroid_table(query, k_codes, centroids, bits)
    if shared_per_kv_group:
        table = table.sum(2, keepdim=True)
    indices = select_by_table(table, k_codes, max(budget, candidate_pool), valid, forced, largest=True)
    if candidate_pool > budget:
        indices = rescore_selection(query, key, indices, budget, forced)
    return sparse_decode_attention(query, key, value, indices, scaling), indices


def selected_attention_partials(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unnormalised softmax of :func:`sparse_decode_attention`, to be merged with other positions.

    Returns float32 ``(m [B, Hq, 1], l [B, Hq, 1], o [B, Hq, D])``: the largest selected logit (0 for
    a row with no valid index), ``l = Σ exp(logit - m)`` and ``o = Σ exp(logit - m) · v`` over the
    selected positions, so the attention is ``o / l``.
    """
    group = check_attention_inputs(query, key, value, indices)
    bsz, num_kv_heads, _, head_dim = key.shape
    per_head = indices.shape[1] // num_kv_heads  # G if each query head has its own indices, else 1
    idx = indices.reshape(bsz, num_kv_heads, -1)  # [B, Hkv, per_head * K]
    safe_idx = idx.clamp(min=0)
    k_sel = gather_positions(key, safe_idx).float().unflatten(2, (per_head, -1))  # [B, Hkv, per_head, K, D]
    v_sel = gather_positions(value, safe_idx).float().unflatten(2, (per_head, -1))
    q = query.float().unflatten(1, (num_kv_heads, group))
    # [B, Hkv, G, 1, D] when each query head meets its own keys, else [B, Hkv, 1, G, D].
    q = q.unsqueeze(3) if per_head > 1 else q.unsqueeze(2)
    scores = (q @ k_sel.transpose(-1, -2)) * scaling  # [B, Hkv, per_head, rows, K]
    live = (idx >= 0).unflatten(2, (per_head, 1, -1))
    scores = scores.masked_fill(~live, float("-inf"))
    logit_max = scores.amax(-1, keepdim=True)
    logit_max = torch.where(torch.isfinite(logit_max), logit_max, 0.0)
    weights = torch.exp(scores - logit_max)
    heads = num_kv_heads * group
    return (
        logit_max.reshape(bsz, heads, 1),
        weights.sum(-1, keepdim=True).reshape(bsz, heads, 1),
        (weights @ v_sel).reshape(bsz, heads, head_dim),
    )


def code_values(codes: torch.Tensor, centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """The Hadamard values packed codes stand for, ``centroids[h, code]``: float32 ``[B, H, S, D]``.

    Args:
        codes: packed uint8 ``[B, H, S, D * bits // 8]``.
        centroids: ``[H, 2**bits]``, the value each code stands for, per head.
        bits: the codes' width.

    Each byte is looked up whole (``8 // bits`` values per byte value and head), so only the bytes,
    not every code, become indices. ``code_values(...) @ hadamard_matrix(D)`` is back in the model's basis.
    """
    bsz, heads, length, packed = codes.shape
    per_byte = codes_per_byte(bits)
    byte_values = byte_centroids(centroids, bits, codes.device)  # [H, 256, per_byte]
    offsets = torch.arange(heads, device=codes.device).view(1, heads, 1, 1) * 256
    looked_up = torch.nn.functional.embedding(codes.long() + offsets, byte_values.reshape(-1, per_byte))
    return looked_up.view(bsz, heads, length, packed * per_byte)


def selected_mask(indices: torch.Tensor, heads: int, length: int) -> torch.Tensor:
    """``[B, heads, length]`` bool of the positions in ``indices`` (``[B, heads or Hkv, K]``, -1 skipped)."""
    if indices.shape[1] != heads:  # one selection per KV group
        indices = indices.repeat_interleave(heads // indices.shape[1], dim=1)
    marks = torch.zeros(*indices.shape[:2], length + 1, dtype=torch.bool, device=indices.device)
    marks.scatter_(2, torch.where(indices >= 0, indices, length), True)
    return marks[..., :length]


class PackedCodes(NamedTuple):
    """Packed Hadamard codes ``[B, H, S, D * bits // 8]`` with the centroids ``[H, 2**bits]`` they stand for."""

    codes: torch.Tensor
    centroids: torch.Tensor
    bits: int


TAIL_CALIBRATION_KEYS = 64
"""About how many positions per head the tail estimate's level is calibrated on (`tail_calibration_stride`)."""


def tail_calibration_stride(length: int) -> int:
    """Every this-many-th position (0, stride, 2 * stride, ...) is in the tail estimate's calibration sample."""
    return max(1, length // TAIL_CALIBRATION_KEYS)


def log_mass(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``log Σ exp(logits)`` over ``where`` per row, ``[..., 1]``; 0 for a row where nothing is."""
    mass = logits.masked_fill(~where, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.where(where.any(-1, keepdim=True), mass, 0.0)


def tail_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    key_codes: PackedCodes,
    value_codes: PackedCodes,
    valid: torch.Tensor | None,
    exact_positions: torch.Tensor | None = None,
    quantized_estimates: bool = False,
) -> torch.Tensor:
    """Attention of one decode token over the whole cache: exact at the selected positions, estimated elsewhere.

    The softmax runs over every valid position. A selected position has its exact logit
    ``q · k * scaling`` and value; any other has the key-code estimate of its logit
    (`centroid_scores` ``* scaling``, or with ``quantized_estimates`` the CPU op's
    `quantized_centroid_scores`), lowered per head by the level shift below, and the value its
    value codes stand for (`code_values` @ H). With every valid position selected this is
    :func:`sparse_decode_attention`.

    Level shift: summed over thousands of keys, the estimates' exponentials overstate the unselected
    keys' share of the softmax (by about 30% on the default model), which drowns pass keys
    (``results/adamas/tail/round7``). So the estimates are lowered by ``log Σ exp(estimate) - log Σ
    exp(exact)`` over a systematic sample: the valid positions ``0, s, 2s, ...`` (``s`` =
    `tail_calibration_stride`) whose logit is not exact otherwise (0 when there is none).

    Args:
        query, key, value, indices, scaling: as :func:`sparse_decode_attention`.
        key_codes: the keys' codes and centroids (``[B, Hkv, S, P]``, ``[Hkv, 2**bits]``).
        value_codes: the values' codes and centroids, likewise.
        valid: ``[B, S]`` bool of the positions the query may attend to, or None for all.
        exact_positions: int64 ``[B, Hq or Hkv, R]`` (``-1`` skipped), unselected positions whose logit is
            exact too (their keys were read anyway, by the ``rescore_factor`` stage); their values stay
            estimated. None: none.
        quantized_estimates: estimate logits as the C++ op does (`quantized_centroid_scores`).

    Returns:
        ``[B, Hq, D]`` in ``query.dtype``, computed in float32; zeros for a row with no valid position.
    """
    group = check_attention_inputs(query, key, value, indices)
    bsz, num_kv_heads, length, head_dim = key.shape
    heads = num_kv_heads * group
    q = query.float().view(bsz, num_kv_heads, group, head_dim)
    exact = (q @ key.float().transpose(2, 3)).view(bsz, heads, length) * scaling
    if quantized_estimates:
        estimated_logits = quantized_centroid_scores(query, *key_codes) * scaling
    else:
        estimated_logits = centroid_scores(query, *key_codes, shared_per_kv_group=False) * scaling
    selected = selected_mask(indices, heads, length)
    exact_logit = (
        selected if exact_positions is None else selected | selected_mask(exact_positions, heads, length)
    )
    attendable = torch.ones_like(selected) if valid is None else valid[:, None, :].expand_as(selected)
    positions = torch.arange(length, device=key.device)
    sample = attendable & ~exact_logit & (positions % tail_calibration_stride(length) == 0)
    estimated_logits = estimated_logits - (log_mass(estimated_logits, sample) - log_mass(exact, sample))
    logits = torch.where(exact_logit, exact, estimated_logits).masked_fill(~attendable, float("-inf"))
    estimated_values = code_values(*value_codes) @ hadamard_matrix(head_dim, key.device)
    values = torch.where(
        selected.view(bsz, num_kv_heads, group, length, 1),
        value.float()[:, :, None],
        estimated_values[:, :, None],
    )  # [B, Hkv, G, S, D]
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).view(bsz, num_kv_heads, group, 1, length)
    return (probs @ values).reshape(bsz, heads, head_dim).to(query.dtype)
