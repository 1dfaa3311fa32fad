"""Triton kernels for the Adamas ops; each has the same signature as its :mod:`hf_adamas.ops.reference` twin."""

from hf_adamas.ops.kernels.centroid_scores import centroid_scores_triton
from hf_adamas.ops.kernels.code_distance import code_distance_triton
from hf_adamas.ops.kernels.hadamard_codes import hadamard_codes_triton
from hf_adamas.ops.kernels.sparse_attention import sparse_decode_attention_triton

__all__ = [
    "centroid_scores_triton",
    "code_distance_triton",
    "hadamard_codes_triton",
    "sparse_decode_attention_triton",
]
