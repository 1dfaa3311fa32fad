"""Fused Walsh-Hadamard transform + bucketize + pack (Triton), matching :func:`hf_adamas.ops.reference.hadamard_codes`.

Each program transforms a block of rows against one column block of the orthonormal Hadamard matrix with an
fp32 ``tl.dot`` (column blocks keep the matrix tile small for D = 256), counts the thresholds each value
exceeds and packs ``8 // bits`` codes per byte in the layout documented in :mod:`hf_adamas.ops.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_adamas._validation import check_head_dim, check_thresholds, codes_per_byte
from hf_adamas.ops.reference import hadamard_matrix

__all__ = ["hadamard_codes_triton"]


@triton.jit
def hadamard_codes_kernel(
    x_ptr,
    h_ptr,
    out_ptr,
    n_rows,
    t0,
    t1,
    t2,
    D: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    BLOCK_P: tl.constexpr = BLOCK_D // PER_BYTE
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    # 64-bit rows: rows * D passes 2^31 elements in a long batched prefill (e.g. 540K tokens x 32 heads x 128).
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    x = tl.load(x_ptr + rows[:, None] * D + dims[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
    h = tl.load(h_ptr + dims[:, None] * D + cols[None, :])
    x_hat = tl.dot(x, h, input_precision="ieee")  # [BLOCK_N, BLOCK_D]
    codes = (x_hat > t0).to(tl.int32)
    if BITS == 2:
        codes += (x_hat > t1).to(tl.int32) + (x_hat > t2).to(tl.int32)
    shifts = tl.arange(0, PER_BYTE) * BITS
    grouped = tl.reshape(codes, (BLOCK_N, BLOCK_P, PER_BYTE)) << shifts[None, None, :]
    packed = tl.sum(grouped, axis=2).to(tl.uint8)  # bits are disjoint, so the sum is a bitwise or
    out_cols = pid_d * BLOCK_P + tl.arange(0, BLOCK_P)
    tl.store(out_ptr + rows[:, None] * (D // PER_BYTE) + out_cols[None, :], packed, mask=row_mask[:, None])


def _launch_hadamard_codes(x2d: torch.Tensor, thresholds: list[float], bits: int) -> torch.Tensor:
    n_rows, dim = x2d.shape
    out = torch.empty(n_rows, dim // codes_per_byte(bits), dtype=torch.uint8, device=x2d.device)
    if n_rows == 0:
        return out
    # Column blocks cap the fp32 Hadamard tile at 8192 values (32 KB of shared memory, also for D=256).
    block_n, block_d = 16, min(dim, 8192 // dim)
    t0, t1, t2 = [*thresholds, 0.0, 0.0][:3]  # 1-bit codes use only t0
    grid = (triton.cdiv(n_rows, block_n), dim // block_d)
    hadamard_codes_kernel[grid](
        x2d, hadamard_matrix(dim, x2d.device), out, n_rows, t0, t1, t2, D=dim, BITS=bits, BLOCK_N=block_n,
        BLOCK_D=block_d,
    )  # fmt: skip
    return out


def hadamard_codes_triton(x: torch.Tensor, thresholds: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed Hadamard codes of ``x``; same contract as :func:`hf_adamas.ops.reference.hadamard_codes`.

    Args:
        x: ``[..., D]`` float tensor (fp32/fp16/bf16) on a CUDA device (or any device under
            ``TRITON_INTERPRET=1``), D a power of two >= 16.
        thresholds: 1-D tensor of ``2**bits - 1`` strictly increasing values. Keep it on the CPU: its
            values are read on the host and passed to the kernel as scalars.
        bits: 1 or 2.

    Returns:
        uint8 ``[..., D * bits // 8]``: ``8 // bits`` codes per byte, dimension ``i`` in byte
        ``i // (8 // bits)`` at bit offset ``bits * (i % (8 // bits))``.

    Examples::

        >>> k = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
        >>> hadamard_codes_triton(k, torch.tensor([-1.0, 0.0, 1.0]), bits=2).shape
        torch.Size([1, 8, 4096, 32])
    """
    values = check_thresholds(thresholds, bits)
    dim = x.shape[-1]
    check_head_dim(dim)
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (post-RoPE queries or keys), got {x.dtype}")
    packed = _launch_hadamard_codes(x.reshape(-1, dim).contiguous(), values, bits)
    return packed.reshape(*x.shape[:-1], packed.shape[-1])
