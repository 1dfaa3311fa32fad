"""The tail estimate's production path: attention over the selection plus the estimated rest, without
reading the unselected keys or values.

:func:`tail_decode_attention` computes what :func:`hf_adamas.ops.reference.tail_decode_attention`
specifies (a softmax over every position, exact at the selected ones), but merges two partial
softmaxes instead: the selected rows' (`reference.selected_attention_partials`: only those K/V rows
are gathered) and the unselected positions', whose values are summed in the Hadamard basis from
their codes and rotated back once per head. It runs on every device; the reference is its test oracle.
"""

from __future__ import annotations

import torch

from hf_adamas.ops.reference import code_values, hadamard_matrix, selected_attention_partials, selected_mask


def tail_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    tail_scores: torch.Tensor,
    value_codes: torch.Tensor,
    value_centroids: torch.Tensor,
    value_bits: int,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """Same arguments and result as :func:`hf_adamas.ops.reference.tail_decode_attention`."""
    selected_max, selected_sum, selected_values = selected_attention_partials(
        query, key, value, indices, scaling
    )
    bsz, num_kv_heads, length, head_dim = key.shape
    heads = query.shape[1]
    tail = (tail_scores.float() * scaling).masked_fill(selected_mask(indices, heads, length), float("-inf"))
    if valid is not None:
        tail = tail.masked_fill(~valid[:, None, :], float("-inf"))
    logit_max = torch.maximum(selected_max, tail.amax(-1, keepdim=True))
    logit_max = torch.where(torch.isfinite(logit_max), logit_max, 0.0)
    tail_weights = torch.exp(tail - logit_max)  # [B, Hq, S]
    hadamard = code_values(value_codes, value_centroids, value_bits)  # [B, Hkv, S, D]
    tail_values = (tail_weights.view(bsz, num_kv_heads, -1, length) @ hadamard).view(bsz, heads, head_dim)
    tail_values = tail_values @ hadamard_matrix(head_dim, key.device)
    rescale = torch.exp(selected_max - logit_max)
    weight_sum = selected_sum * rescale + tail_weights.sum(-1, keepdim=True)
    output = selected_values * rescale + tail_values
    return (output / weight_sum.clamp(min=torch.finfo(torch.float32).tiny)).to(query.dtype)
