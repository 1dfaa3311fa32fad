"""Code books from a model's own key statistics: bucket thresholds, and bucket centroids.

The paper's fixed edges (-10, 0, 10) were tuned on Llama-2 activations. On SmolLM2-135M the
orthonormal Hadamard values of post-RoPE keys stay within about +-5 (see
``../shared/reference/adamas.md``), so every code is 1 or 2 and the 2-bit code degenerates into a
sign bit. A code book puts each layer's edges at the quartiles of its transformed key values (the
median for 1-bit codes), so the codes use all their levels, and records each bucket's mean value
per KV head (its centroid), which the ``"adamas_asymmetric"`` selector dots with the query.

Two ways to get one, both from the same `hf_adamas.codebook.code_book` statistics:

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
from hf_adamas.codebook import code_book
from hf_common.compat import cache_kwargs

MIN_CALIBRATION_TOKENS = 16
"""Fewest text tokens `calibrate_thresholds` accepts."""


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
