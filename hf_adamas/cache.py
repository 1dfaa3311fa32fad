"""The code cache: key codes stored next to the KV cache, computed once per key as it enters.

Layout. `AdamasLayer` keeps, per layer, keys and values ``[batch, kv_heads, seq, head_dim]`` (as
`transformers.DynamicLayer`) plus packed key codes ``[batch, kv_heads, seq, head_dim * bits / 8]``
``uint8``: 4 two-bit codes per byte, dimension ``i`` in byte ``i // 4`` at bits ``2*(i % 4)`` and
``2*(i % 4) + 1`` (8 one-bit codes per byte with ``bits=1``). At 2 bits a key's codes take 1/8 of
its bf16 key, i.e. 1/16 of its bf16 key and value (1/32 of an fp32 K+V cache).

Memory. Storage is preallocated instead of the ``torch.cat`` that `DynamicLayer` does on every
step, which copies the whole cache each decoded token; `keys`/`values`/`key_codes` are views of the
filled part. When ``generate()`` says how long the sequence will get (prompt + ``max_new_tokens``,
recorded on the cache by `apply_adamas`), the first update reserves exactly that; otherwise the
capacity grows by a quarter (``GROWTH``) when full, so at most 25% of the cache is reserved but
unused, and a regrowth briefly holds the old and the new buffer of one layer. Per token and layer
the cache holds ``kv_heads * head_dim * (2 * element_size + bits / 8)`` bytes: at head_dim 64,
3 KV heads, fp32 K/V and 2-bit codes, 1536 B of K/V plus 48 B of codes (3.1%). Cropping (assisted decoding), reordering (beam search) and batch
selection keep the codes row- and position-aligned with the keys.

Two ways to get it:
- plain ``model.generate()``: the Adamas attention function swaps each sparse layer's
  `DynamicLayer` in the `DynamicCache` that ``generate`` builds for an `AdamasLayer` holding the
  same tensors (see `hf_adamas.attention`), so nothing needs building;
- ``cache=AdamasCache(model.config)`` (``past_key_values=`` before transformers 5.24) built by the user, e.g. to reuse across calls.
"""

from __future__ import annotations

import torch
from transformers import Cache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from hf_adamas import ops
from hf_adamas.config import AdamasConfig, check_model_config

_MIN_CAPACITY = 256
GROWTH = 1.25
"""Factor by which a full `AdamasLayer` grows when no final length is known."""

CAPACITY_ATTRIBUTE = "adamas_capacity"
"""Attribute of a `Cache` holding the final sequence length ``generate()`` announced (see `apply_adamas`)."""


class AdamasLayer(DynamicLayer):
    """A `DynamicLayer` that also stores the packed Hadamard codes of its keys."""

    def __init__(self, thresholds: list[float], bits: int, capacity: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.capacity = capacity  # the final length if known: reserved at once instead of grown
        self.threshold_values = list(thresholds)
        # Stays on the CPU: the kernels take thresholds as scalars, a device tensor would sync.
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32)
        self.bits = bits
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._length = 0

    def encodes_with(self, thresholds: list[float], bits: int) -> bool:
        """Whether this layer's codes were made with these settings (else they must be rebuilt)."""
        return bits == self.bits and list(thresholds) == self.threshold_values

    @classmethod
    def from_layer(
        cls, layer: DynamicLayer, thresholds: list[float], bits: int, capacity: int | None = None
    ) -> AdamasLayer:
        """An `AdamasLayer` holding ``layer``'s keys and values, with codes computed for them once."""
        new = cls(thresholds, bits, capacity)
        if layer.is_initialized and layer.get_seq_length() > 0:  # also re-encodes a stale AdamasLayer
            new.update(layer.keys, layer.values)
        elif layer.is_initialized:
            new.lazy_initialization(layer.keys, layer.values)
        return new

    # The filled part of the buffers, under the names the rest of transformers reads.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._buffers is None else self._buffers[0][:, :, : self._length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._assign(0, value)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._buffers is None else self._buffers[1][:, :, : self._length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._assign(1, value)

    @property
    def key_codes(self) -> torch.Tensor | None:
        return None if self._buffers is None else self._buffers[2][:, :, : self._length]

    def _assign(self, slot: int, value: torch.Tensor | None) -> None:
        """Only `None` (reset) and the empty tensors of `lazy_initialization` may be assigned directly."""
        if value is None or value.numel() == 0:
            self._buffers, self._length = None, 0
            return
        raise AttributeError("AdamasLayer stores keys and values through update(); do not assign them.")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        """Make room for ``needed`` positions: the announced final length, else 1.25x (amortised O(1) appends)."""
        capacity = 0 if self._buffers is None else self._buffers[0].shape[2]
        if needed <= capacity:
            return
        if self.capacity is not None and needed <= self.capacity:
            capacity = self.capacity
        else:
            capacity = max(_MIN_CAPACITY, needed, int(capacity * GROWTH))
        batch, heads, _, head_dim = key_states.shape
        packed = head_dim * self.bits // 8
        new = (
            key_states.new_empty(batch, heads, capacity, head_dim),
            value_states.new_empty(batch, heads, capacity, value_states.shape[-1]),
            torch.empty(batch, heads, capacity, packed, dtype=torch.uint8, device=key_states.device),
        )
        if self._buffers is not None:
            for old, fresh in zip(self._buffers, new, strict=True):
                fresh[:, :, : self._length] = old[:, :, : self._length]
        self._buffers = new

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys, values and the new keys' codes; return all keys and values (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, added = self._length, key_states.shape[2]
        self._reserve(key_states, value_states, start + added)
        keys, values, codes = self._buffers
        keys[:, :, start : start + added] = key_states
        values[:, :, start : start + added] = value_states
        codes[:, :, start : start + added] = ops.hadamard_codes(key_states, self.thresholds, self.bits)
        self._length = start + added
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        self._length = max(0, self._length + tokens_to_remove)

    def _select_rows(self, rows: torch.Tensor) -> None:
        if self._buffers is not None:
            self._buffers = tuple(buffer[rows.to(buffer.device)] for buffer in self._buffers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._buffers is not None:
            self._buffers = tuple(buffer.repeat_interleave(repeats, dim=0) for buffer in self._buffers)

    def offload(self) -> None:
        raise NotImplementedError("AdamasLayer does not support cache offloading.")

    def prefetch(self) -> None:
        raise NotImplementedError("AdamasLayer does not support cache offloading.")


class AdamasCache(Cache):
    """A cache for a whole model: `AdamasLayer` for sparse layers, `DynamicLayer` for dense ones.

    Pass it as ``cache=AdamasCache(model.config)`` (``past_key_values=`` before transformers 5.24); the settings come from
    ``model.config.adamas_config`` unless ``adamas_config`` is given.
    """

    def __init__(self, config: PretrainedConfig, adamas_config: AdamasConfig | None = None) -> None:
        text_config = config.get_text_config(decoder=True)
        settings = adamas_config or AdamasConfig.from_model_config(text_config)
        check_model_config(config, settings, type(config).__name__)
        layers = [
            DynamicLayer()
            if index < settings.dense_layers
            else AdamasLayer(settings.thresholds_for_layer(index), settings.bits)
            for index in range(text_config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
