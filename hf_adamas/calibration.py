"""Code books from a model's own key statistics: bucket thresholds, and bucket centroids.

The paper's fixed edges (-10, 0, 10) were tuned on Llama-2 activations. On SmolLM2-135M the
orthonormal Hadamard values of post-RoPE keys stay within about +-5 (see
``../shared/reference/adamas.md``), so every code is 1 or 2 and the 2-bit code degenerates into a
sign bit. A code book puts each layer's edges at the quartiles of its transformed key values (the
median for 1-bit codes), so the codes use all their levels, and records each bucket's mean value
per KV head (its centroid), which the ``"adamas_asymmetric"`` selector dots with the query.

Two ways to get one, both from the same `code_book` statistics:

- offline: `calibrate_codes` runs one dense forward pass over sample text (``hf-adamas calibrate``)
  and returns per-layer thresholds and per-layer, per-head centroids for `AdamasConfig`;
- online: ``AdamasConfig(calibration="online")`` makes each sparse layer's cache an
  `OnlineCalibratedLayer`, which computes the code book from the first keys it stores, i.e. the
  prompt's own prefill, before encoding them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from hf_adamas._validation import check_bits
from hf_adamas.cache import AdamasLayer
from hf_adamas.ops.reference import hadamard_values
from hf_common.compat import cache_kwargs

MIN_CALIBRATION_TOKENS = 16
"""Fewest text tokens `calibrate_thresholds` accepts."""


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
    """Quantile thresholds and per-head bucket means of the Hadamard-transformed ``keys``.

    Args:
        keys: post-RoPE keys ``[batch, kv_heads, seq, head_dim]`` (rows of a batch are pooled).
        bits: code width, 1 or 2.

    Returns:
        ``(thresholds, centroids)``: float32 CPU ``[2**bits - 1]`` edges at the ``1/4, 2/4, 3/4``
        quantiles (the median for 1 bit), and float32 ``[kv_heads, 2**bits]`` on the keys' device,
        the mean transformed value of each bucket per KV head (the implied centroid for a bucket
        that no value of a head falls in).
    """
    check_bits(bits)
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


@torch.inference_mode()
def calibrate_codes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    num_tokens: int = 1024,
    bits: int = 2,
) -> dict[str, list]:
    """Per-layer thresholds and per-layer, per-head centroids from the keys of ``text`` (offline).

    Args:
        model: a causal LM whose attention layers fill a `DynamicCache`.
        tokenizer: its tokenizer.
        text: calibration text; its first ``num_tokens`` tokens are used.
        num_tokens: how many tokens to run.
        bits: 2 (edges at the 25/50/75% quantiles) or 1 (the median).

    Returns:
        ``{"thresholds": [layers][2**bits - 1], "centroids": [layers][kv_heads][2**bits]}``, ready
        for ``AdamasConfig(thresholds=..., centroids=...)``.
    """
    check_bits(bits)
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :num_tokens].to(model.device)
    if num_tokens < MIN_CALIBRATION_TOKENS or input_ids.shape[1] < MIN_CALIBRATION_TOKENS:
        raise ValueError(
            f"Calibration needs at least {MIN_CALIBRATION_TOKENS} tokens: num_tokens={num_tokens}, and the "
            f"text has {input_ids.shape[1]} of them."
        )
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True)
    thresholds, centroids = [], []
    for layer in cache.layers:
        edges, means = code_book(layer.keys, bits)
        thresholds.append([round(float(edge), 4) for edge in edges])
        centroids.append([[round(float(c), 4) for c in head] for head in means.cpu()])
    return {"thresholds": thresholds, "centroids": centroids}


class OnlineCalibratedLayer(AdamasLayer):
    """An `AdamasLayer` whose code book comes from the first keys it stores: the prompt's prefill.

    Thresholds and centroids (`code_book`) are computed from the keys of the first update, when
    first asked for (the first sparse step, with the codes), and then kept for every later key;
    cropping the layer back to empty forgets them, so a reused cache calibrates on its next prompt.
    Used for ``AdamasConfig(calibration="online")``.
    """

    def __init__(
        self, thresholds: list[float] | None = None, bits: int = 2, capacity: int | None = None
    ) -> None:
        del thresholds  # computed from the data
        super().__init__([], bits, capacity)
        self._code_book: tuple[torch.Tensor, torch.Tensor] | None = None
        self._calibration_length = 0  # the first update's keys: those the code book is made from

    def encodes_with(self, thresholds: list[float] | None, bits: int) -> bool:
        """Online codes depend only on the code width (the thresholds are the data's)."""
        return bits == self.bits

    def _book(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._code_book is None and self._calibration_length > 0:
            self._code_book = code_book(self.keys[:, :, : self._calibration_length], self.bits)
            self.threshold_values = self._code_book[0].tolist()
        return self._code_book

    @property
    def thresholds(self) -> torch.Tensor | None:
        book = self._book()
        return None if book is None else book[0]

    @property
    def centroids(self) -> torch.Tensor | None:
        """Per-KV-head bucket means ``[kv_heads, 2**bits]``, or None before any key is stored."""
        book = self._book()
        return None if book is None else book[1]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._calibration_length == 0:
            self._calibration_length = key_states.shape[2]
        return super().update(key_states, value_states, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        if 0 < self.get_seq_length() + tokens_to_remove < self._calibration_length:
            self._book()  # made before the keys it is made from are cut
        super().crop(tokens_to_remove)
        if self.get_seq_length() == 0:
            self._code_book, self._calibration_length = None, 0

    def _map_buffers(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._book()  # from the rows it was stored with
        super()._map_buffers(change)

    def _assign(self, value: torch.Tensor | None) -> None:
        super()._assign(value)
        self._code_book, self._calibration_length = None, 0
