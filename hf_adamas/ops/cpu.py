"""The fused CPU decode ops (`csrc/select_cpu.cpp`), compiled on first use with the C++ toolchain.

- `hadamard_codes_cpu`: `reference.hadamard_codes` with its bucketize + pack in one C++ loop (the
  transform stays the reference's matmul, so the codes are the same bits); a decode step encodes
  one key per layer, where the tensor ops cost tens of microseconds.
- `select_by_table_cpu`: one decode step's estimate + top-k in a single pass over the packed key codes:
  per key, ``P`` byte lookups into the query's table (all query heads of a KV group at once), then
  ``std::nth_element`` for the exact top-k with the ranking rules of `reference.select_topk`.
- `select_by_centroids_cpu`: the exact selection of the asymmetric rule from the query's Hadamard
  values and the centroids, by a fast scan: per key a uint16 estimate from uint8 nibble tables (AVX2
  byte shuffles over 32 keys at a time), then exact scores only for the keys within the estimate's
  error bound of the top-k, and the exact top-k among them (index for index the reference's).
- `rescore_selection_cpu`: the exact ``q · k`` of the candidates an estimate selected, read in place
  from the cache, and their top-k (the optional second stage, ``rescore_factor``).
- `sparse_decode_attention_cpu`: attention over the selected rows, read in place from the cache.
- `asymmetric_decode_step_cpu`: a whole decode step of the default rule for a layer that stores key
  codes: the new keys' codes written into the cache's code buffer, the selection of
  `select_by_centroids_cpu` and the attention of `sparse_decode_attention_cpu`, in one call.
- `tail_decode_attention_cpu`: the tail estimate (``value_code_bits``) in one call: exact over the
  selection, elsewhere each key's logit from the same fast scan of its codes (the quantized estimate
  itself, `reference.quantized_centroid_scores`) and its value codes' Hadamard values, for the query
  heads of a KV group at once, over chunks of positions in parallel.

Their PyTorch twins, and the fallback when no compiler is found, are `reference.select_by_table`,
`reference.rescore_selection`, `reference.sparse_decode_attention`, `reference.asymmetric_decode_step`
and `reference.tail_decode_attention`.

The extension is built once per machine (`hf_common.cpp_extension`, about 30 s).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from hf_adamas._validation import check_attention_inputs, check_centroid_score_inputs, check_thresholds
from hf_adamas.ops.reference import PackedCodes, hadamard_matrix, hadamard_values
from hf_common.cpp_extension import load_cpu_extension

__all__ = [
    "asymmetric_decode_step_cpu",
    "cpu_extension",
    "hadamard_codes_cpu",
    "rescore_selection_cpu",
    "select_by_centroids_cpu",
    "select_by_table_cpu",
    "sparse_decode_attention_cpu",
    "tail_decode_attention_cpu",
]

SOURCE = Path(__file__).parent / "csrc" / "select_cpu.cpp"


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The compiled ops, or None (said once) when they cannot be built here."""
    return load_cpu_extension(
        "hf_adamas_select_cpu", SOURCE, "Adamas decoding uses the PyTorch reference ops on CPU"
    )


def _masks(batch: int, seq_len: int, valid: torch.Tensor | None, forced: torch.Tensor | None):
    """The forced and valid masks as the C++ ops take them (an empty tensor: all valid)."""
    forced = torch.zeros(batch, seq_len, dtype=torch.bool) if forced is None else forced.contiguous()
    valid = torch.empty(0, dtype=torch.bool) if valid is None else valid.contiguous()
    return forced, valid


def hadamard_codes_cpu(x: torch.Tensor, thresholds: torch.Tensor, bits: int) -> torch.Tensor:
    """`reference.hadamard_codes` of a CPU tensor, its bucketize + pack fused; the extension must be available."""
    check_thresholds(thresholds, bits)
    x_hat = hadamard_values(x)
    packed = cpu_extension().bucket_codes(
        x_hat.reshape(-1, x.shape[-1]), thresholds.float().contiguous(), bits
    )
    return packed.view(*x.shape[:-1], packed.shape[-1])


def select_by_table_cpu(
    table: torch.Tensor,
    k_codes: torch.Tensor,
    budget: int,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
    largest: bool,
) -> torch.Tensor:
    """`reference.select_by_table` in one fused C++ pass; the extension must be available."""
    layout = table.float().permute(0, 1, 3, 4, 2).contiguous()  # [B, Hkv, P, 256, C]: one read per byte
    forced, valid = _masks(k_codes.shape[0], k_codes.shape[2], valid, forced)
    return cpu_extension().select_by_table(layout, _rows_contiguous(k_codes), budget, forced, valid, largest)


def select_by_centroids_cpu(
    q_hat: torch.Tensor,
    k_codes: torch.Tensor,
    centroids: torch.Tensor,
    bits: int,
    shared_per_kv_group: bool,
    budget: int,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
    portable: bool = False,
) -> torch.Tensor:
    """`reference.centroid_table` (from ``q_hat``, the query's Hadamard values) then
    `reference.select_by_table`, in one C++ call; the extension must be available.

    ``portable`` scans with the plain C++ loop instead of AVX2 (the same estimates; for tests).
    """
    forced, valid = _masks(k_codes.shape[0], k_codes.shape[2], valid, forced)
    return cpu_extension().select_by_centroids(
        q_hat.float().contiguous(), _rows_contiguous(k_codes), centroids.float().contiguous(), bits,
        shared_per_kv_group, budget, forced, valid, portable,
    )  # fmt: skip


def rescore_selection_cpu(
    query: torch.Tensor, key: torch.Tensor, candidates: torch.Tensor, budget: int, forced: torch.Tensor | None
) -> torch.Tensor:
    """`reference.rescore_selection` for float32 caches with contiguous rows; the extension must be available."""
    forced = torch.empty(0, dtype=torch.bool) if forced is None else forced.contiguous()
    return cpu_extension().rescore_selection(
        query.float().contiguous(), key, candidates.contiguous(), budget, forced
    )


def sparse_decode_attention_cpu(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`reference.sparse_decode_attention` for float32 caches, gathering only the selected rows."""
    check_attention_inputs(query, key, value, indices)
    out = cpu_extension().sparse_decode_attention(
        query.float().contiguous(), key, value, indices.contiguous(), float(scaling)
    )
    return out.to(query.dtype)


def asymmetric_decode_step_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_codes: torch.Tensor,
    coded: int,
    thresholds: torch.Tensor,
    centroids: torch.Tensor,
    bits: int,
    shared_per_kv_group: bool,
    budget: int,
    candidate_pool: int,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.asymmetric_decode_step` for float32 caches in one C++ call, after writing the codes
    of keys ``coded..S`` (`reference.hadamard_codes` with ``thresholds``) into ``k_codes`` in place.

    ``k_codes`` is the cache's code buffer ``[B, Hkv, S, P]`` (rows contiguous); its rows before
    ``coded`` are read as they are. With ``candidate_pool`` above ``budget`` the estimate proposes that
    many keys and their exact scores keep ``budget`` (`rescore_selection_cpu`). Returns the output
    ``[B, Hq, D]`` and the indices.
    """
    check_centroid_score_inputs(query, k_codes, centroids, bits)
    if coded < key.shape[2]:
        check_thresholds(thresholds, bits)
    if key.shape != value.shape or key.shape[:2] != k_codes.shape[:2] or key.shape[2] != k_codes.shape[2]:
        raise ValueError(
            f"key, value [B, Hkv, S, D] and k_codes [B, Hkv, S, P] disagree: {tuple(key.shape)}, "
            f"{tuple(value.shape)}, {tuple(k_codes.shape)}"
        )
    if k_codes.stride(-1) != 1:
        raise ValueError(
            "k_codes must be the code buffer itself (contiguous rows): its codes are written in place"
        )
    forced, valid = _masks(key.shape[0], key.shape[2], valid, forced)
    return cpu_extension().asymmetric_decode_step(
        query, key, value, k_codes, coded, thresholds, centroids.float().contiguous(),
        hadamard_matrix(key.shape[-1]), bits, shared_per_kv_group, budget, candidate_pool, forced, valid,
        float(scaling),
    )  # fmt: skip


def tail_decode_attention_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    key_codes: PackedCodes,
    value_codes: PackedCodes,
    valid: torch.Tensor | None,
    exact_positions: torch.Tensor | None = None,
    portable: bool = False,
) -> torch.Tensor:
    """`reference.tail_decode_attention` (same arguments, ``quantized_estimates=True``) for float32 caches
    in one C++ call: the level shift's sample and the selection read exactly, every other key's logit
    fast-scanned from its codes and its value decoded from them, the positions split into chunks that
    run in parallel and merge like an online softmax.

    ``portable`` runs the plain C++ loops instead of AVX2 (the same sums but for rounding; for tests).
    """
    check_attention_inputs(query, key, value, indices)
    check_centroid_score_inputs(query, key_codes.codes, key_codes.centroids, key_codes.bits)
    out = cpu_extension().tail_decode_attention(
        query.float().contiguous(), hadamard_values(query).contiguous(), key, value, indices.contiguous(),
        torch.empty(0, dtype=torch.int64) if exact_positions is None else exact_positions.contiguous(),
        _rows_contiguous(key_codes.codes), _rows_contiguous(value_codes.codes),
        key_codes.centroids.float().contiguous(), key_codes.bits,
        value_codes.centroids.float().contiguous(), value_codes.bits,
        torch.empty(0, dtype=torch.bool) if valid is None else valid.contiguous(),
        hadamard_matrix(key.shape[-1], key.device), float(scaling), portable,
    )  # fmt: skip
    return out.to(query.dtype)


def _rows_contiguous(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` as they are when each row is contiguous (a view of the cache's buffer), else a copy."""
    return codes if codes.stride(-1) == 1 else codes.contiguous()
