"""Asymmetric (query vs key-code centroid) scores (Triton), matching :func:`hf_adamas.ops.reference.centroid_scores`.

The query's float lookup table ``[B, Hkv, G, P, 256]`` is built in PyTorch (it is tiny:
:func:`hf_adamas.ops.reference.centroid_table`); the kernel does the part that reads the cache: one program
takes a block of keys of one KV head, loads their packed code bytes once, and for each of the G query
heads of the group (or their summed table) sums the ``P`` table entries the bytes pick.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_adamas.ops.reference import centroid_table

__all__ = ["centroid_scores_triton"]


@triton.jit
def byte_table_sum_kernel(
    table_ptr,
    k_ptr,
    out_ptr,
    seq_len,
    num_kv_heads,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_ob,
    stride_oh,
    C: tl.constexpr,
    P: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = pid_bh % num_kv_heads
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, P)
    s_mask = offs_s < seq_len
    k_ptrs = (
        k_ptr
        + b * stride_kb
        + kv_head * stride_kh
        + offs_s[:, None].to(tl.int64) * stride_ks
        + offs_p[None, :]
    )
    k = tl.load(k_ptrs, mask=s_mask[:, None], other=0).to(tl.int32)
    entry = offs_p[None, :] * 256 + k  # [BLOCK_S, P] offsets into one column's [P, 256] table
    for c in tl.static_range(C):
        column = ((b * num_kv_heads + kv_head) * C + c) * (P * 256)
        score = tl.sum(tl.load(table_ptr + column + entry), axis=1)
        tl.store(out_ptr + b * stride_ob + (kv_head * C + c) * stride_oh + offs_s, score, mask=s_mask)


def centroid_scores_triton(
    query: torch.Tensor, k_codes: torch.Tensor, centroids: torch.Tensor, bits: int, shared_per_kv_group: bool
) -> torch.Tensor:
    """Same contract as :func:`hf_adamas.ops.reference.centroid_scores`: float32 ``[B, Hq or Hkv, S]``."""
    table = centroid_table(query, k_codes, centroids, bits)  # validates the inputs
    if shared_per_kv_group:
        table = table.sum(2, keepdim=True)
    table = table.contiguous()
    bsz, num_kv_heads, seq_len, packed = k_codes.shape
    columns = table.shape[2]
    if k_codes.stride(-1) != 1:
        k_codes = k_codes.contiguous()
    out = torch.empty(bsz, num_kv_heads * columns, seq_len, dtype=torch.float32, device=k_codes.device)
    if out.numel() == 0:
        return out
    block_s = min(128, triton.next_power_of_2(seq_len))
    grid = (triton.cdiv(seq_len, block_s), bsz * num_kv_heads)
    byte_table_sum_kernel[grid](
        table, k_codes, out, seq_len, num_kv_heads, k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        out.stride(0), out.stride(1), C=columns, P=packed, BLOCK_S=block_s,
    )  # fmt: skip
    return out
