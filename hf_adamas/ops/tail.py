"""The tail estimate's PyTorch production path: attention over the selection plus the estimated rest,
without reading the unselected keys or values.

:func:`tail_decode_attention` computes what :func:`hf_adamas.ops.reference.tail_decode_attention`
specifies (a softmax over every position, exact at the selected ones) by merging two partial
softmaxes: the selected rows' (`reference.selected_attention_partials`, which gathers only those K/V
rows) and the unselected positions', whose values are summed in the Hadamard basis from their codes
and rotated back once per head. It serves every device and dtype; float32 CPU caches go through the
one C++ call `cpu.tail_decode_attention_cpu` instead (`hf_adamas.ops.tail_decode_attention` picks).
The reference is the test oracle of both.
"""

from __future__ import annotations

import torch

from hf_adamas.ops.reference import (
    PackedCodes,
    byte_table_sum,
    centroid_table,
    code_values,
    gather_positions,
    hadamard_matrix,
    log_mass,
    selected_attention_partials,
    selected_mask,
    tail_calibration_stride,
)


def _level_shift(
    table: torch.Tensor,
    key: torch.Tensor,
    query: torch.Tensor,
    key_codes: PackedCodes,
    excluded: torch.Tensor,
    exact_logits: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """``[B, Hq, 1]``: the reference's level shift of the estimated logits, from strided views of the
    calibration sample's keys and codes (about `TAIL_CALIBRATION_KEYS` rows per KV head), the estimates
    read from the query's lookup ``table`` (`centroid_table`)."""
    bsz, num_kv_heads, length, head_dim = key.shape
    stride = tail_calibration_stride(length)
    rows = key[:, :, ::stride].float()  # [B, Hkv, n, D]
    grouped = query.float().view(bsz, num_kv_heads, -1, head_dim)
    exact = (grouped @ rows.transpose(2, 3)).view(bsz, query.shape[1], -1) * scaling
    estimated = byte_table_sum(table, key_codes.codes[:, :, ::stride], shared_per_kv_group=False) * scaling
    sample = ~excluded[..., ::stride]
    if exact_logits is not None:
        sample = sample & torch.isnan(exact_logits[..., ::stride])
    return log_mass(estimated, sample) - log_mass(exact, sample)


def _unselected_partials(
    table: torch.Tensor,
    key_codes: PackedCodes,
    value_codes: PackedCodes,
    excluded: torch.Tensor,
    start_max: torch.Tensor,
    scaling: float,
    exact_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, l, o)`` of the positions not ``excluded``: their largest logit (at least ``start_max``),
    ``Σ exp(logit - m)`` and ``Σ exp(logit - m)`` times their code values, ``o`` in the Hadamard basis (``m`` stays ``start_max``, possibly -inf, where no
    position is left)."""
    bsz, heads, length = excluded.shape
    logits = byte_table_sum(table, key_codes.codes, shared_per_kv_group=False) * scaling
    if exact_logits is not None:  # NaN where the estimate stands
        logits = torch.where(torch.isnan(exact_logits), logits, exact_logits)
    logits = logits.masked_fill(excluded, float("-inf"))
    logit_max = torch.maximum(start_max, logits.amax(-1, keepdim=True))
    weights = torch.exp(logits - logit_max).nan_to_num(0.0)  # [B, Hq, S]; a row with no logit: zeros
    decoded_values = code_values(*value_codes)  # [B, Hkv, S, D], Hadamard basis
    kv_heads = decoded_values.shape[1]
    summed = (weights.view(bsz, kv_heads, -1, length) @ decoded_values).view(bsz, heads, -1)
    return logit_max, weights.sum(-1, keepdim=True), summed


def _exact_logits(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``[B, Hq, S]`` float32: ``q · k * scaling`` at ``positions`` (``[B, Hq or Hkv, R]``, -1 skipped), NaN elsewhere."""
    bsz, num_kv_heads, length, head_dim = key.shape
    heads = query.shape[1]
    if positions.shape[1] != heads:  # one candidate list per KV group
        positions = positions.repeat_interleave(heads // positions.shape[1], dim=1)
    safe = positions.clamp(min=0)
    rows = gather_positions(key, safe.reshape(bsz, num_kv_heads, -1)).float()  # [B, Hkv, G * R, D]
    rows = rows.view(bsz, num_kv_heads, -1, positions.shape[2], head_dim)  # [B, Hkv, G, R, D]
    q = query.float().view(bsz, num_kv_heads, -1, head_dim, 1)
    logits = (rows @ q).reshape(bsz, heads, -1) * scaling
    out = torch.full((bsz, heads, length + 1), float("nan"), device=key.device)
    out.scatter_(2, torch.where(positions >= 0, positions, length), logits)
    return out[..., :length]


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
) -> torch.Tensor:
    """Same arguments and result as :func:`hf_adamas.ops.reference.tail_decode_attention`."""
    selected_max, selected_sum, selected_values = selected_attention_partials(
        query, key, value, indices, scaling
    )
    length, head_dim = key.shape[2:]
    excluded = selected_mask(indices, query.shape[1], length)
    if valid is not None:
        excluded = excluded | ~valid[:, None, :]
    exact_logits = None if exact_positions is None else _exact_logits(query, key, exact_positions, scaling)
    # The selection's largest logit starts the tail's maximum (-inf for a row with nothing selected).
    start_max = torch.where(selected_sum > 0, selected_max, float("-inf"))
    table = centroid_table(query, *key_codes)
    shift = _level_shift(table, key, query, key_codes, excluded, exact_logits, scaling)
    table[:, :, :, 0] -= (shift / scaling).view(*table.shape[:3], 1)  # every estimate lowered by the shift
    tail_max, tail_sum, tail_values = _unselected_partials(
        table, key_codes, value_codes, excluded, start_max, scaling, exact_logits
    )
    tail_max = torch.where(torch.isfinite(tail_max), tail_max, 0.0)  # nothing valid at all: zeros
    tail_values = tail_values @ hadamard_matrix(head_dim, key.device)
    selected_scale = torch.exp(selected_max - tail_max)  # tail_max >= selected_max
    weight_sum = selected_sum * selected_scale + tail_sum
    output = selected_values * selected_scale + tail_values
    return (output / weight_sum.clamp(min=torch.finfo(torch.float32).tiny)).to(query.dtype)
