"""The code cache: key codes stored next to the KV cache, built from the cached keys when first needed.

Layout. `AdamasLayer` keeps, per layer, keys and values ``[batch, kv_heads, seq, head_dim]`` (as
`transformers.DynamicLayer`) plus packed key codes ``[batch, kv_heads, seq, head_dim * bits / 8]``
``uint8``: 4 two-bit codes per byte, dimension ``i`` in byte ``i // 4`` at bits ``2*(i % 4)`` and
``2*(i % 4) + 1`` (8 one-bit codes per byte with ``bits=1``). At 2 bits a key's codes take 1/8 of
its bf16 key, i.e. 1/16 of its bf16 key and value (1/32 of an fp32 K+V cache).

Codes are built lazily: `AdamasLayer.key_codes` encodes the keys stored since its last call (or the
fused CPU decode step writes them itself: `AdamasLayer.unwritten_key_codes`). So a
prefill stores keys and values only, and the codes of the whole prompt are made at the first sparse
decode step, after the prefill's activations are freed; the code buffer is therefore not part of
the prefill's memory peak, which is what sets a long generation's peak (see
``results/adamas/memory``). A cache that never decodes sparsely never builds codes.

Memory. Storage is preallocated (`PreallocatedLayer`, also used for the dense layers) instead of the
``torch.cat`` that `DynamicLayer` does on every step, which copies the whole cache each decoded
token; `keys`/`values`/`key_codes` are views of the filled part. The prefill is stored exactly.
When ``generate()`` says how long the sequence will get (prompt + ``max_new_tokens``, recorded on
the cache by `apply_adamas`), the first decoded token reserves exactly that; otherwise the capacity
grows by a quarter (``GROWTH``) when full, so at most 25% of the cache is reserved but unused, and a
regrowth briefly holds the old and the new buffer of one layer. Per token and layer the cache holds ``kv_heads * head_dim * (2 *
element_size + bits / 8)`` bytes: at head_dim 64, 3 KV heads, fp32 K/V and 2-bit codes, 1536 B of
K/V plus 48 B of codes (3.1%); the tail estimate (``value_code_bits``) adds ``kv_heads * head_dim *
value_code_bits / 8`` bytes of value codes (96 B at 4 bits). Cropping (assisted decoding), reordering (beam search) and batch
selection keep the codes row- and position-aligned with the keys.

Two ways to get it:
- plain ``model.generate()``: the Adamas attention function swaps each layer's `DynamicLayer` in the
  `DynamicCache` that ``generate`` builds for an `AdamasLayer` (sparse layers) or a
  `PreallocatedLayer` (dense ones) holding the same tensors (see `hf_adamas.attention`), so nothing
  needs building;
- ``cache=AdamasCache(model.config)`` (``past_key_values=`` before transformers 5.24) built by the user, e.g. to reuse across calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Cache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from hf_adamas import ops
from hf_adamas.codebook import code_book
from hf_adamas.config import AdamasConfig, check_model_config

_MIN_CAPACITY = 256
GROWTH = 1.25
"""Factor by which a full `PreallocatedLayer` grows when no final length is known."""

CAPACITY_ATTRIBUTE = "adamas_capacity"
"""Attribute of a `Cache` holding the final sequence length ``generate()`` announced (see `apply_adamas`)."""


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers that grow rarely, not by ``torch.cat`` per step."""

    def __init__(self, capacity: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.capacity = capacity  # the final length if known: reserved at once instead of grown
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._length = 0

    def _adopt(self, layer: DynamicLayer) -> None:
        """Take ``layer``'s keys and values (the swap of a layer that ``generate()`` built)."""
        if layer.is_initialized and layer.get_seq_length() > 0:
            self.update(layer.keys, layer.values)
        elif layer.is_initialized:
            self.lazy_initialization(layer.keys, layer.values)

    @classmethod
    def from_layer(cls, layer: DynamicLayer, capacity: int | None = None) -> PreallocatedLayer:
        """A `PreallocatedLayer` holding ``layer``'s keys and values."""
        new = cls(capacity)
        new._adopt(layer)
        return new

    # The filled part of the buffers, under the names the rest of transformers reads.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._buffers is None else self._buffers[0][:, :, : self._length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._assign(value)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._buffers is None else self._buffers[1][:, :, : self._length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._assign(value)

    def _assign(self, value: torch.Tensor | None) -> None:
        """Only `None` (reset) and the empty tensors of `lazy_initialization` may be assigned directly."""
        if value is None or value.numel() == 0:
            self._buffers, self._length = None, 0
            return
        raise AttributeError(
            f"{type(self).__name__} stores keys and values through update(); do not assign them."
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        """Make room for ``needed`` positions: the announced final length, else 1.25x (amortised O(1) appends).

        The first update (the prefill) is stored exactly, even when a final length is announced: the
        prefill's activations set a long generation's memory peak, and a buffer no larger than a
        `DynamicLayer`'s keeps that peak where sdpa has it. The first decoded token then reserves the
        announced length, after those activations are freed.
        """
        capacity = 0 if self._buffers is None else self._buffers[0].shape[2]
        if needed <= capacity:
            return
        if self.capacity is not None and needed <= self.capacity:
            capacity = self.capacity if self._buffers is not None else needed
        else:
            capacity = max(_MIN_CAPACITY, needed, int(capacity * GROWTH))
        batch, heads, _, head_dim = key_states.shape
        new = (
            key_states.new_empty(batch, heads, capacity, head_dim),
            value_states.new_empty(batch, heads, capacity, value_states.shape[-1]),
        )
        if self._buffers is not None:
            for old, fresh in zip(self._buffers, new, strict=True):
                fresh[:, :, : self._length] = old[:, :, : self._length]
        self._buffers = new

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys and values; return all keys and values (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, added = self._length, key_states.shape[2]
        self._reserve(key_states, value_states, start + added)
        keys, values = self._buffers
        keys[:, :, start : start + added] = key_states
        values[:, :, start : start + added] = value_states
        self._length = start + added
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        self._length = max(0, self._length + tokens_to_remove)

    def _map_buffers(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``change`` to every buffer (row selection and repetition along the batch)."""
        if self._buffers is not None:
            self._buffers = tuple(change(buffer) for buffer in self._buffers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_buffers(lambda buffer: buffer[beam_idx.to(buffer.device)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_buffers(lambda buffer: buffer[indices.to(buffer.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_buffers(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support cache offloading.")

    def prefetch(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support cache offloading.")


class _RowCodes:
    """Packed codes of the rows of a growing buffer, encoded when first read and kept aligned with it."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], bytes_per_row: int) -> None:
        self.encode = encode
        self.bytes_per_row = bytes_per_row
        self.codes: torch.Tensor | None = None  # as long as the buffer once built
        self.coded = 0  # positions whose codes are in ``codes``

    def pending(self, buffer: torch.Tensor, length: int) -> tuple[torch.Tensor, int]:
        """The code rows of ``buffer[:, :, :length]`` (a view) and how many of them are written; the rest
        are the caller's to write (then `written`)."""
        if self.codes is None or self.codes.shape[:3] != buffer.shape[:3]:
            fresh = torch.empty(
                *buffer.shape[:3], self.bytes_per_row, dtype=torch.uint8, device=buffer.device
            )
            if self.codes is not None:  # the buffer grew or changed rows: keep what is coded
                fresh[:, :, : self.coded] = self.codes[:, :, : self.coded]
            self.codes = fresh
        return self.codes[:, :, :length], min(self.coded, length)

    def written(self, length: int) -> None:
        """Positions below ``length`` hold their codes."""
        self.coded = length

    def read(self, buffer: torch.Tensor, length: int) -> torch.Tensor:
        """Codes of ``buffer[:, :, :length]`` (a view); encodes the positions added since the last read."""
        codes, coded = self.pending(buffer, length)
        if coded < length:
            codes[:, :, coded:] = self.encode(buffer[:, :, coded:length])
            self.written(length)
        return codes

    def crop(self, length: int) -> None:
        self.coded = min(self.coded, length)

    def map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.codes is not None:
            self.codes = change(self.codes)


class AdamasLayer(PreallocatedLayer):
    """A `PreallocatedLayer` that also stores the packed Hadamard codes of its keys, built when first read.

    With the tail estimate (``AdamasConfig(value_code_bits=...)``) it also stores codes of its values,
    whose code book (`hf_adamas.codebook.code_book`) is made from the values stored when they are
    first asked for (at the first sparse step: the prompt and the first decoded token) and kept for
    every later value.
    """

    def __init__(self, thresholds: list[float], bits: int, capacity: int | None = None, **kwargs) -> None:
        super().__init__(capacity, **kwargs)
        self.threshold_values = list(thresholds)
        # Stays on the CPU: the kernels take thresholds as scalars, a device tensor would sync.
        self._thresholds = torch.tensor(thresholds, dtype=torch.float32)
        self.bits = bits
        self._key_codes: _RowCodes | None = None
        self._value_codes: _RowCodes | None = None
        self._value_code_book: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def thresholds(self) -> torch.Tensor:
        """The bucket edges the codes are made with (CPU float32)."""
        return self._thresholds

    def encodes_with(self, thresholds: list[float], bits: int) -> bool:
        """Whether this layer's codes were made with these settings (else they must be rebuilt)."""
        return bits == self.bits and list(thresholds) == self.threshold_values

    @classmethod
    def from_layer(
        cls, layer: DynamicLayer, thresholds: list[float], bits: int, capacity: int | None = None
    ) -> AdamasLayer:
        """An `AdamasLayer` holding ``layer``'s keys and values (a stale `AdamasLayer`'s codes are dropped)."""
        new = cls(thresholds, bits, capacity)
        new._adopt(layer)
        return new

    def _key_code_rows(self) -> _RowCodes:
        if self._key_codes is None:
            self._key_codes = _RowCodes(
                lambda rows: ops.hadamard_codes(rows, self.thresholds, self.bits),
                self._buffers[0].shape[-1] * self.bits // 8,
            )
        return self._key_codes

    @property
    def key_codes(self) -> torch.Tensor | None:
        """Codes of the stored keys ``[B, Hkv, S, P]`` (a view); encodes those stored since the last call."""
        if self._buffers is None:
            return None
        return self._key_code_rows().read(self._buffers[0], self._length)

    def unwritten_key_codes(self) -> tuple[torch.Tensor, int]:
        """The key-code buffer ``[B, Hkv, S, P]`` (a view) and the first position whose codes are not
        written yet, for an op that encodes them itself (with `thresholds`) and then calls
        `key_codes_written`; the layer must hold keys."""
        return self._key_code_rows().pending(self._buffers[0], self._length)

    def key_codes_written(self) -> None:
        """Every stored key's codes are in the buffer (after `unwritten_key_codes`)."""
        self._key_code_rows().written(self._length)

    def value_codes(self, bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``bits``-bit codes of the stored values ``[B, Hkv, S, D * bits / 8]`` (a view) and their
        centroids ``[Hkv, 2**bits]``; None while empty. Asking with another width starts over."""
        if self._buffers is None:
            return None
        values = self._buffers[1]
        if self._value_code_book is None or self._value_code_book[0].numel() != 2**bits - 1:
            thresholds, centroids = code_book(values[:, :, : self._length], bits)
            self._value_code_book = (thresholds, centroids)
            self._value_codes = _RowCodes(
                lambda rows: ops.hadamard_codes(rows, thresholds, bits), values.shape[-1] * bits // 8
            )
        return self._value_codes.read(values, self._length), self._value_code_book[1]

    def code_buffers(self) -> list[torch.Tensor]:
        """The code buffers built so far, whole (their reserved room included): for memory accounting."""
        return [
            codes.codes
            for codes in (self._key_codes, self._value_codes)
            if codes is not None and codes.codes is not None
        ]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        for codes in (self._key_codes, self._value_codes):
            if codes is not None:
                codes.crop(self._length)
        if self._length == 0:  # a reused cache makes its value code book from its next prompt
            self._value_codes = self._value_code_book = None

    def _map_buffers(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._map_buffers(change)
        for codes in (self._key_codes, self._value_codes):
            if codes is not None:
                codes.map(change)

    def _assign(self, value: torch.Tensor | None) -> None:
        super()._assign(value)
        self._key_codes = self._value_codes = self._value_code_book = None


class AdamasCache(Cache):
    """A cache for a whole model: `AdamasLayer` for sparse layers, `PreallocatedLayer` for dense ones.

    Pass it as ``cache=AdamasCache(model.config)`` (``past_key_values=`` before transformers 5.24); the settings come from
    ``model.config.adamas_config`` unless ``adamas_config`` is given.
    """

    def __init__(self, config: PretrainedConfig, adamas_config: AdamasConfig | None = None) -> None:
        text_config = config.get_text_config(decoder=True)
        settings = adamas_config or AdamasConfig.from_model_config(text_config)
        check_model_config(config, settings, type(config).__name__)
        layers = [
            PreallocatedLayer()
            if index < settings.dense_layers
            else AdamasLayer(settings.thresholds_for_layer(index), settings.bits)
            for index in range(text_config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
