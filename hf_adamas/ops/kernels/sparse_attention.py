"""Split-K sparse decode attention over gathered key/value rows (Triton).

Matches :func:`hf_adamas.ops.reference.sparse_decode_attention`. The K selected indices of a row are cut into
``num_splits`` chunks; one program per (chunk, batch, selection head) gathers its keys and values once,
runs an online softmax for every query head that shares those indices (all G heads of a KV group when the
indices are per KV head) and writes a partial ``(output, log-sum-exp)``. A second kernel merges the
partials with log-sum-exp weights. ``-1`` indices are skipped; a row with none left returns zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hf_adamas._validation import check_attention_inputs, check_head_dim

__all__ = ["sparse_decode_attention_triton"]

# Upper bound on the [heads, BLOCK_K, D] float32 product tile of one program. With 8 warps it compiles
# without register spills on sm_90 for 1, 4 and 8 heads at D=128 (BLOCK_K 32, 16 and 8).
_MAX_TILE_ELEMENTS = 8192
_NUM_WARPS = 8


@triton.jit
def sparse_decode_attention_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    scaling,
    num_sel_heads,
    num_indices,
    chunk,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ib,
    stride_ih,
    G: tl.constexpr,
    HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_sel_heads).to(tl.int64)
    # 64-bit head offsets: kv_head * stride_kh passes 2^31 elements at about 540K tokens of cache
    # (32 KV heads, head_dim 128), where 32-bit arithmetic would wrap to another head's rows.
    sel_head = (pid_bh % num_sel_heads).to(tl.int64)
    kv_head = sel_head * HEADS // G
    heads = sel_head * HEADS + tl.arange(0, HEADS_PAD)
    head_mask = tl.arange(0, HEADS_PAD) < HEADS
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=head_mask[:, None], other=0.0
    )
    q = q.to(tl.float32) * scaling
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    idx_base = idx_ptr + b * stride_ib + sel_head * stride_ih

    row_max = tl.full([HEADS_PAD], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([HEADS_PAD], dtype=tl.float32)
    acc = tl.zeros([HEADS_PAD, D], dtype=tl.float32)
    start = pid_split * chunk
    for off in range(start, tl.minimum(start + chunk, num_indices), BLOCK_K):
        offs = off + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_base + offs, mask=offs < num_indices, other=-1)
        live = idx >= 0
        k = tl.load(k_base + idx[:, None] * stride_ks + dims[None, :], mask=live[:, None], other=0.0)
        scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [HEADS_PAD, BLOCK_K]
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(row_max, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no live key yet: avoid -inf - -inf
        alpha = tl.exp(row_max - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        v = tl.load(v_base + idx[:, None] * stride_vs + dims[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        row_max = m_new

    has_mass = row_sum > 0
    lse = tl.where(has_mass, row_max + tl.log(tl.where(has_mass, row_sum, 1.0)), float("-inf"))
    out = acc / tl.where(has_mass, row_sum, 1.0)[:, None]
    mid_rows = (b * (num_sel_heads * HEADS) + heads) * num_splits + pid_split
    tl.store(mid_lse_ptr + mid_rows, lse, mask=head_mask)
    tl.store(mid_o_ptr + mid_rows[:, None] * D + dims[None, :], out, mask=head_mask[:, None])


@triton.jit
def sparse_decode_attention_combine_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    num_splits,
    D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # flattened (batch, query head)
    splits = tl.arange(0, SPLITS_PAD)
    split_mask = splits < num_splits
    dims = tl.arange(0, D)
    lse = tl.load(mid_lse_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weights = tl.exp(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    parts = tl.load(
        mid_o_ptr + (row * num_splits + splits[:, None]) * D + dims[None, :],
        mask=split_mask[:, None],
        other=0.0,
    )
    total = tl.sum(weights, axis=0)
    out = tl.sum(weights[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + dims, out)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _default_num_splits(num_blocks: int, num_programs: int, device: torch.device) -> int:
    """Enough splits for about two programs per streaming multiprocessor, never more than the blocks."""
    return max(1, min(num_blocks, (2 * _num_sms(device)) // max(1, num_programs)))


def _launch_sparse_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    group: int,
    num_splits: int | None = None,
) -> torch.Tensor:
    bsz, num_q_heads, head_dim = query.shape
    num_sel_heads, num_indices = indices.shape[1], indices.shape[2]
    heads = num_q_heads // num_sel_heads  # query heads sharing one row of indices: G or 1
    out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)  # contiguous: rows of D
    if out.numel() == 0 or num_indices == 0:
        return out
    query, indices = query.contiguous(), indices.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    heads_pad = triton.next_power_of_2(heads)
    block_k = max(8, min(32, _MAX_TILE_ELEMENTS // (heads_pad * head_dim)))
    num_blocks = triton.cdiv(num_indices, block_k)
    if num_splits is None:
        num_splits = _default_num_splits(num_blocks, bsz * num_sel_heads, query.device)
    chunk = triton.cdiv(num_blocks, max(1, min(num_splits, num_blocks))) * block_k
    num_splits = triton.cdiv(num_indices, chunk)
    mid_o = torch.empty(bsz, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    mid_lse = torch.empty(bsz, num_q_heads, num_splits, dtype=torch.float32, device=query.device)
    sparse_decode_attention_split_kernel[(num_splits, bsz * num_sel_heads)](
        query, key, value, indices, mid_o, mid_lse, scaling, num_sel_heads, num_indices, chunk, num_splits,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2), value.stride(0),
        value.stride(1), value.stride(2), indices.stride(0), indices.stride(1), G=group, HEADS=heads,
        HEADS_PAD=heads_pad, D=head_dim, BLOCK_K=block_k, num_warps=_NUM_WARPS,
    )  # fmt: skip
    sparse_decode_attention_combine_kernel[(bsz * num_q_heads,)](
        mid_o, mid_lse, out, num_splits, D=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits)
    )
    return out


def sparse_decode_attention_triton(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Exact softmax attention of one decode token over selected positions (split-K Triton kernel).

    Same contract as :func:`hf_adamas.ops.reference.sparse_decode_attention`.

    Args:
        query: ``[B, Hq, D]``, D a power of two (the decode token; squeeze the length-1 axis).
        key, value: ``[B, Hkv, S, D]`` in their storage dtype (e.g. bf16), innermost dim contiguous; query
            head ``h`` reads KV head ``h // (Hq // Hkv)``.
        indices: int64 ``[B, Hq, K]`` (per query head) or ``[B, Hkv, K]`` (shared by a KV group, whose keys
            are then gathered once for all G heads). Each entry is ``-1`` (skipped) or a position below S:
            positions are not bounds-checked on the device.
        scaling: score scale, usually ``D ** -0.5``.

    Returns:
        ``[B, Hq, D]`` in ``query.dtype``, accumulated in float32; zeros for a row without valid indices.

    Examples::

        >>> q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16)
        >>> idx = torch.randint(0, 32768, (1, 8, 256), device="cuda")
        >>> sparse_decode_attention_triton(q, k, v, idx, scaling=128**-0.5).shape
        torch.Size([1, 32, 128])
    """
    group = check_attention_inputs(query, key, value, indices)
    check_head_dim(query.shape[-1])
    return _launch_sparse_decode_attention(query, key, value, indices, scaling, group)
