"""Every input rule of hf_adamas, written once: the config, calibration, the reference ops and the Triton
kernels all call these, so each rule raises the same actionable error wherever it is broken."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "KEY_CODE_WIDTHS",
    "PACKED_CODE_WIDTHS",
    "check_attention_inputs",
    "check_bits",
    "check_centroid_score_inputs",
    "check_centroid_values",
    "check_code_distance_inputs",
    "check_head_dim",
    "check_threshold_values",
    "check_thresholds",
    "codes_per_byte",
]


KEY_CODE_WIDTHS = (1, 2)
"""Bits per dimension of key codes (the paper's 2, or signs)."""
PACKED_CODE_WIDTHS = (1, 2, 4)
"""Bits per dimension any packed code may have: key codes, and the 2- or 4-bit value codes of the tail."""


def check_bits(bits: int, widths: tuple[int, ...] = KEY_CODE_WIDTHS) -> None:
    if isinstance(bits, bool) or bits not in widths:
        allowed = " or ".join(str(width) for width in widths)
        raise ValueError(f"bits must be {allowed} (bits per dimension of a code), got {bits}")


def codes_per_byte(bits: int) -> int:
    check_bits(bits, PACKED_CODE_WIDTHS)
    return 8 // bits


def check_head_dim(dim: int, owner: str = "") -> None:
    """``owner`` (e.g. a model class name) prefixes the message when the head size comes from a model."""
    if dim < 16 or dim & (dim - 1):
        where = (
            f"{owner} has head_dim={dim}, which is not a power of two >= 16" if owner else f"head_dim {dim}"
        )
        raise ValueError(
            f"{where} is not supported: Adamas needs a power of two >= 16 (e.g. 64 or 128) for the "
            "Sylvester Hadamard transform and the Triton kernels"
        )


def check_threshold_values(values: Sequence[float], bits: int) -> list[float]:
    """Validate one layer's bucket edges (``2**bits - 1`` finite, strictly increasing) as Python floats."""
    check_bits(bits, PACKED_CODE_WIDTHS)
    expected = 2**bits - 1
    values = [float(t) for t in values]
    if len(values) != expected:
        raise ValueError(f"{bits}-bit codes need {expected} thresholds, got {len(values)}: {values}")
    if any(not math.isfinite(t) for t in values) or any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"thresholds must be finite and strictly increasing, got {values}")
    return values


def check_thresholds(thresholds: torch.Tensor, bits: int) -> list[float]:
    """Validate a 1-D thresholds tensor and return its values as Python floats (free for a CPU tensor)."""
    if thresholds.dim() != 1:
        raise ValueError(f"thresholds must be a 1-D tensor, got shape {tuple(thresholds.shape)}")
    return check_threshold_values(thresholds.float().tolist(), bits)


def check_code_distance_inputs(q_codes: torch.Tensor, k_codes: torch.Tensor) -> int:
    """Validate packed query/key codes ``[B, Hq, P]`` / ``[B, Hkv, S, P]`` and return the group size G."""
    if q_codes.dtype != torch.uint8 or k_codes.dtype != torch.uint8:
        raise ValueError(
            f"codes must be packed uint8 (from hadamard_codes), got {q_codes.dtype} and {k_codes.dtype}"
        )
    if q_codes.dim() != 3 or k_codes.dim() != 4:
        raise ValueError(
            "expected q_codes [B, Hq, P] (one query token) and k_codes [B, Hkv, S, P], got shapes "
            f"{tuple(q_codes.shape)} and {tuple(k_codes.shape)}"
        )
    (bsz, num_q_heads, num_bytes), (k_bsz, num_kv_heads, _, k_bytes) = q_codes.shape, k_codes.shape
    if bsz != k_bsz or num_bytes != k_bytes or num_q_heads % num_kv_heads:
        raise ValueError(
            "q_codes [B, Hq, P] and k_codes [B, Hkv, S, P] must agree on B and P, and Hq must be a multiple "
            f"of Hkv; got {tuple(q_codes.shape)} and {tuple(k_codes.shape)}"
        )
    return num_q_heads // num_kv_heads


def check_attention_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor
) -> int:
    """Validate sparse decode attention inputs and return the group size G = Hq // Hkv."""
    if query.dim() != 3 or key.dim() != 4 or key.shape != value.shape:
        raise ValueError(
            "expected query [B, Hq, D] (one decode token; squeeze the length-1 axis) and key/value "
            f"[B, Hkv, S, D] of equal shape, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    bsz, num_q_heads, head_dim = query.shape
    if key.shape[0] != bsz or key.shape[3] != head_dim or num_q_heads % key.shape[1]:
        raise ValueError(
            "query [B, Hq, D] and key [B, Hkv, S, D] must agree on B and D with Hq a multiple of Hkv, got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    if indices.dim() != 3 or indices.shape[0] != bsz or indices.shape[1] not in (num_q_heads, key.shape[1]):
        raise ValueError(
            f"indices must be [B, Hq, K] or [B, Hkv, K] (B={bsz}, Hq={num_q_heads}, Hkv={key.shape[1]}), "
            f"got {tuple(indices.shape)}"
        )
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64 (as returned by select_topk), got {indices.dtype}")
    return num_q_heads // key.shape[1]


def check_centroid_score_inputs(
    query: torch.Tensor, k_codes: torch.Tensor, centroids: torch.Tensor, bits: int
) -> int:
    """Validate a float query ``[B, Hq, D]``, packed key codes and ``[Hkv, 2**bits]`` centroids; return G."""
    check_bits(bits)
    if (
        not query.is_floating_point()
        or query.dim() != 3
        or k_codes.dtype != torch.uint8
        or k_codes.dim() != 4
    ):
        raise ValueError(
            "expected a float query [B, Hq, D] (one decode token) and packed uint8 k_codes [B, Hkv, S, P], "
            f"got {query.dtype} {tuple(query.shape)} and {k_codes.dtype} {tuple(k_codes.shape)}"
        )
    (bsz, num_q_heads, head_dim), (k_bsz, num_kv_heads, _, packed) = query.shape, k_codes.shape
    if bsz != k_bsz or head_dim * bits != packed * 8 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"query [B, Hq, D] and k_codes [B, Hkv, S, D * {bits} / 8] must agree on B and D, with Hq a "
            f"multiple of Hkv; got {tuple(query.shape)} and {tuple(k_codes.shape)}"
        )
    if tuple(centroids.shape) != (num_kv_heads, 2**bits):
        raise ValueError(
            f"centroids must be [Hkv, 2**bits] = {[num_kv_heads, 2**bits]}, got {list(centroids.shape)}"
        )
    return num_q_heads // num_kv_heads


def check_centroid_values(layers: Sequence, bits: int) -> list[list[list[float]]]:
    levels = 2**bits
    rows = [[[float(c) for c in head] for head in layer] for layer in layers]
    for layer in rows:
        for head in layer:
            if len(head) != levels or any(not math.isfinite(c) for c in head):
                raise ValueError(f"{bits}-bit codes need {levels} finite centroids per KV head, got {head}.")
    return rows
