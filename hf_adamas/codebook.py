"""Code books: bucket edges at the quantiles of Hadamard-transformed vectors, and each bucket's mean.

One statistic serves every code in the package: the key codes' thresholds and centroids (offline in
`hf_adamas.calibration`, online per prompt in `hf_adamas.calibration.OnlineCalibratedLayer`) and the
value codes of the tail estimate (`hf_adamas.cache.AdamasLayer.value_codes`).
"""

from __future__ import annotations

import torch

from hf_adamas._validation import PACKED_CODE_WIDTHS, check_bits
from hf_adamas.ops.reference import hadamard_values

QUANTILE_INPUT_LIMIT = 1_000_000
"""Most values handed to ``torch.quantile`` per layer (it refuses much larger inputs)."""


def subsample_rows(transformed: torch.Tensor, limit: int = QUANTILE_INPUT_LIMIT) -> torch.Tensor:
    """Whole rows ``[N, D]`` of ``transformed [..., D]``, at most ``limit`` values, every coordinate alike.

    Keeping whole key vectors (a stride over rows, not over the flattened tensor, whose stride could
    share a factor with D and keep only some Hadamard coordinates) makes every coordinate contribute
    the same number of values to the quantiles.
    """
    rows = transformed.reshape(-1, transformed.shape[-1])
    return rows[:: max(1, -(-rows.numel() // limit))]


def threshold_centroids(thresholds: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Centroids implied by the thresholds alone, ``[kv_heads, 2**bits]`` float32.

    Inner buckets get their midpoint; the two outer buckets sit half a bucket beyond their edge,
    the width being the mean inner width (1 with a single edge). Used when no measured centroids
    are given, e.g. with the paper's thresholds.
    """
    edges = thresholds.float().cpu()
    width = float((edges[-1] - edges[0]) / (len(edges) - 1)) if len(edges) > 1 else 1.0
    inner = (edges[1:] + edges[:-1]) / 2
    values = torch.cat([edges[:1] - width / 2, inner, edges[-1:] + width / 2])
    return values.expand(kv_heads, -1).contiguous()


@torch.no_grad()
def code_book(keys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantile thresholds and per-head bucket means of the Hadamard-transformed ``keys`` (or values).

    Args:
        keys: post-RoPE keys ``[batch, kv_heads, seq, head_dim]`` (rows of a batch are pooled), or
            values for the tail estimate's value codes.
        bits: code width, 1, 2 or 4.

    Returns:
        ``(thresholds, centroids)``: float32 CPU ``[2**bits - 1]`` edges at the ``k / 2**bits``
        quantiles (the quartiles for 2 bits, the median for 1), and float32 ``[kv_heads, 2**bits]`` on the keys' device,
        the mean transformed value of each bucket per KV head (the implied centroid for a bucket
        that no value of a head falls in).
    """
    check_bits(bits, PACKED_CODE_WIDTHS)
    levels = 2**bits
    kv_heads = keys.shape[1]
    transformed = hadamard_values(keys)
    values = transformed.transpose(0, 1).reshape(kv_heads, -1)
    sample = subsample_rows(transformed).flatten()
    quantiles = torch.arange(1, levels, dtype=torch.float32, device=keys.device) / levels
    thresholds = torch.quantile(sample, quantiles).cpu()
    if bool((thresholds[1:] <= thresholds[:-1]).any()):  # degenerate keys: fall back to spread edges
        thresholds = thresholds[0] + torch.arange(levels - 1, dtype=torch.float32) * 1e-3
    codes = torch.bucketize(values, thresholds.to(keys.device))  # number of edges strictly below
    sums = torch.zeros(kv_heads, levels, device=keys.device).scatter_add_(1, codes, values)
    counts = torch.zeros(kv_heads, levels, device=keys.device).scatter_add_(1, codes, torch.ones_like(values))
    implied = threshold_centroids(thresholds, kv_heads).to(keys.device)
    centroids = torch.where(counts > 0, sums / counts.clamp(min=1), implied)
    return thresholds, centroids
