"""Device dispatch for the Adamas ops: the Triton kernels for CUDA tensors, the PyTorch reference otherwise.

Every function keeps the signature of its :mod:`hf_adamas.ops.reference` twin. Set the environment variable
``HF_ADAMAS_FORCE_REFERENCE=1`` (read at import) or call :func:`force_reference` to use the reference on
every device, e.g. to rule out a kernel when debugging.

:func:`hadamard_codes` of CPU tensors bucketizes and packs in that module's C++ op too.

Key selection (:func:`select_by_code_distance`, :func:`select_by_centroid_scores`): the Triton score
kernels and ``torch.topk`` on CUDA; on CPU the fused C++ ops of :mod:`hf_adamas.ops.cpu` (the paper's
rule: byte-table scores and an exact top-k in one pass over the packed codes; the asymmetric rule: a
fast-scanned estimate narrows the keys that get exact scores), or :func:`reference.select_by_table`
where they cannot be built. :func:`sparse_decode_attention` of float32 CPU caches runs the C++ op of the same module too.
:func:`tail_decode_attention` (the optional tail estimate) reads only the selected K/V rows and sums
the others from their codes: one C++ call for float32 CPU caches (its logit estimates fast-scanned,
``reference.tail_decode_attention(..., quantized_estimates=True)``), :mod:`hf_adamas.ops.tail`
(PyTorch, float estimates) elsewhere. :func:`rescore_selection` (the optional exact second stage) runs that module's C++ op for
float32 CPU caches and the PyTorch reference elsewhere. The attention function runs the default rule's
whole step through :func:`hf_adamas.ops.cpu.asymmetric_decode_step_cpu` where :func:`float32_cpu_cache` holds.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from transformers.utils import logging

from hf_adamas.ops import reference, tail
from hf_adamas.ops.cpu import (
    cpu_extension,
    hadamard_codes_cpu,
    rescore_selection_cpu,
    select_by_centroids_cpu,
    select_by_table_cpu,
    sparse_decode_attention_cpu,
    tail_decode_attention_cpu,
)
from hf_adamas.ops.reference import select_topk

__all__ = [
    "centroid_scores",
    "code_distance",
    "float32_cpu_cache",
    "force_reference",
    "hadamard_codes",
    "rescore_selection",
    "select_by_centroid_scores",
    "select_by_code_distance",
    "select_topk",
    "sparse_decode_attention",
    "tail_decode_attention",
    "triton_available",
]

logger = logging.get_logger(__name__)

_force_reference = os.environ.get("HF_ADAMAS_FORCE_REFERENCE", "0").lower() not in ("", "0", "false", "no")


def force_reference(enabled: bool = True) -> None:
    """Use the PyTorch reference ops on every device (True) or the Triton kernels on CUDA again (False)."""
    global _force_reference
    _force_reference = enabled


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        from hf_adamas.ops import kernels
    except ImportError:  # no triton wheel for this platform
        return None
    return kernels


def triton_available() -> bool:
    """Whether the Triton kernels can be imported here."""
    return _kernels() is not None


def _use_triton(tensor: torch.Tensor) -> bool:
    if not tensor.is_cuda or _force_reference:
        return False
    if not triton_available():
        logger.warning_once(
            "Adamas: Triton cannot be imported, so CUDA tensors go through the PyTorch reference ops "
            "(correct, slower). Install triton for the fused kernels."
        )
        return False
    return True


def hadamard_codes(x: torch.Tensor, thresholds: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed Hadamard codes ``[..., D * bits // 8]`` of ``x [..., D]``; see :func:`reference.hadamard_codes`."""
    if _use_triton(x):
        return _kernels().hadamard_codes_triton(x, thresholds, bits)
    if _fused_cpu(x) and bits in (1, 2):  # the C++ op packs 1- and 2-bit codes (4-bit value codes: PyTorch)
        return hadamard_codes_cpu(x, thresholds, bits)
    return reference.hadamard_codes(x, thresholds, bits)


def code_distance(
    q_codes: torch.Tensor, k_codes: torch.Tensor, bits: int, shared_per_kv_group: bool
) -> torch.Tensor:
    """Exact L1 code distance, int32 ``[B, Hq or Hkv, S]``; see :func:`reference.code_distance`."""
    if _use_triton(k_codes):
        return _kernels().code_distance_triton(q_codes, k_codes, bits, shared_per_kv_group)
    return reference.code_distance(q_codes, k_codes, bits, shared_per_kv_group)


def centroid_scores(
    query: torch.Tensor, k_codes: torch.Tensor, centroids: torch.Tensor, bits: int, shared_per_kv_group: bool
) -> torch.Tensor:
    """Asymmetric query-vs-code scores, float32 ``[B, Hq or Hkv, S]``; see :func:`reference.centroid_scores`."""
    if _use_triton(k_codes):
        return _kernels().centroid_scores_triton(query, k_codes, centroids, bits, shared_per_kv_group)
    return reference.centroid_scores(query, k_codes, centroids, bits, shared_per_kv_group)


def sparse_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of one decode token over selected positions, ``[B, Hq, D]``; see :func:`reference.sparse_decode_attention`."""
    if _use_triton(query):
        return _kernels().sparse_decode_attention_triton(query, key, value, indices, scaling)
    if float32_cpu_cache(key, value):
        return sparse_decode_attention_cpu(query, key, value, indices, scaling)
    return reference.sparse_decode_attention(query, key, value, indices, scaling)


def tail_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    key_codes: reference.PackedCodes,
    value_codes: reference.PackedCodes,
    valid: torch.Tensor | None,
    exact_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention over the selection plus the estimated unselected positions, ``[B, Hq, D]``; see
    :func:`reference.tail_decode_attention`. One C++ call for float32 CPU caches, else
    :func:`tail.tail_decode_attention` (PyTorch, any device)."""
    if _force_reference:
        implementation = reference.tail_decode_attention
    elif float32_cpu_cache(key, value):
        implementation = tail_decode_attention_cpu
    else:
        implementation = tail.tail_decode_attention
    return implementation(query, key, value, indices, scaling, key_codes, value_codes, valid, exact_positions)


def rescore_selection(
    query: torch.Tensor, key: torch.Tensor, candidates: torch.Tensor, budget: int, forced: torch.Tensor | None
) -> torch.Tensor:
    """The exact second stage over an estimate's candidates, ``[B, H, budget]``; see :func:`reference.rescore_selection`."""
    if _fused_cpu(key) and key.dtype == torch.float32 and key.stride(3) == 1:
        return rescore_selection_cpu(query, key, candidates, budget, forced)
    return reference.rescore_selection(query, key, candidates, budget, forced)


def float32_cpu_cache(key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the C++ attention ops (:mod:`hf_adamas.ops.cpu`) read these K/V in place: float32 CPU
    caches with contiguous rows, the extension built, the reference not forced."""
    return (
        _fused_cpu(key)
        and key.dtype == value.dtype == torch.float32
        and key.stride(3) == value.stride(3) == 1
    )


def _fused_cpu(tensor: torch.Tensor) -> bool:
    """Whether the fused C++ ops of :mod:`hf_adamas.ops.cpu` serve this CPU tensor."""
    return tensor.device.type == "cpu" and not _force_reference and cpu_extension() is not None


def _select_by_table(
    table: torch.Tensor,
    k_codes: torch.Tensor,
    shared_per_kv_group: bool,
    budget: int,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
    largest: bool,
) -> torch.Tensor:
    """The CPU selection from a ``[B, Hkv, G, P, 256]`` table; a shared KV group sums its G tables first."""
    table = table.sum(2, keepdim=True) if shared_per_kv_group else table
    if _fused_cpu(k_codes):
        return select_by_table_cpu(table, k_codes, budget, valid, forced, largest)
    return reference.select_by_table(table, k_codes, budget, valid, forced, largest)


def select_by_code_distance(
    q_codes: torch.Tensor,
    k_codes: torch.Tensor,
    bits: int,
    shared_per_kv_group: bool,
    budget: int,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
) -> torch.Tensor:
    """The paper's selection: `select_topk` of :func:`code_distance`, ``[B, Hq or Hkv, budget]``."""
    if _use_triton(k_codes):
        distance = _kernels().code_distance_triton(q_codes, k_codes, bits, shared_per_kv_group)
        return select_topk(distance, budget, valid, forced)
    table = reference.distance_table(q_codes, k_codes, bits)
    return _select_by_table(table, k_codes, shared_per_kv_group, budget, valid, forced, largest=False)


def select_by_centroid_scores(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    centroids: torch.Tensor,
    bits: int,
    shared_per_kv_group: bool,
    budget: int,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
) -> torch.Tensor:
    """The asymmetric selection: the ``budget`` largest :func:`centroid_scores`, ``[B, Hq or Hkv, budget]``."""
    if _use_triton(k_codes):
        scores = _kernels().centroid_scores_triton(query, k_codes, centroids, bits, shared_per_kv_group)
        return select_topk(reference.largest_first(scores), budget, valid, forced)
    if _fused_cpu(k_codes):  # the table is built in C++ too
        q_hat = reference.hadamard_values(query)
        return select_by_centroids_cpu(
            q_hat, k_codes, centroids, bits, shared_per_kv_group, budget, valid, forced
        )
    table = reference.centroid_table(query, k_codes, centroids, bits)
    return _select_by_table(table, k_codes, shared_per_kv_group, budget, valid, forced, largest=True)
