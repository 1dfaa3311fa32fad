"""The ``"adamas"`` attention function, with the transformers `AttentionInterface` signature.

Decode steps (one query token) of sparse layers select keys per head and run exact attention over
them; everything else (prefill, the first ``dense_layers`` layers, caches not longer than the
budget, training, ``output_attentions``) is delegated to transformers' own sdpa function, so it is
bit-identical to ``attn_implementation="sdpa"``.

Training and ``output_attentions=True`` fall back to dense attention with a one-time warning: the
selection is not differentiable and there are no dense weights to return.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import logging

from hf_adamas import ops
from hf_adamas.cache import CAPACITY_ATTRIBUTE, AdamasLayer, PreallocatedLayer
from hf_adamas.calibration import OnlineCalibratedLayer
from hf_adamas.codebook import code_book
from hf_adamas.config import CONFIG_ATTRIBUTE, AdamasConfig, check_model_config
from hf_adamas.ops import reference
from hf_adamas.ops.cpu import asymmetric_decode_step_cpu
from hf_adamas.selection import (
    CACHE_LAYER_ATTRIBUTE,
    SELECTORS,
    code_book_for,
    forced_positions,
    select_asymmetric_with_candidates,
)
from hf_common.compat import CACHE_ARGUMENT

logger = logging.get_logger(__name__)

ATTENTION_NAME = "adamas"

_HOOK_FLAG = "_adamas_cache_hook"


def settings_for(module: torch.nn.Module) -> AdamasConfig:
    """The module's `AdamasConfig`, validated against the model, re-read whenever the stored settings change.

    ``model.config.adamas_config`` is a plain dict that users may edit in place; the parsed settings
    are kept with a copy of the dict they came from and rebuilt when it no longer equals the stored
    one (a comparison of a few small values per call), so an edit takes effect on the next forward.
    """
    stored = getattr(module.config, CONFIG_ATTRIBUTE, None)
    cached = getattr(module, "_adamas_settings", None)
    if cached is not None and cached[0] == stored:
        return cached[1]
    settings = AdamasConfig.from_model_config(module.config)
    check_model_config(module.config, settings, type(module).__name__)
    module._adamas_settings = (copy.deepcopy(stored), settings)
    return settings


def _stash_cache_layer(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: find this layer's cache and swap a plain `DynamicLayer` for Adamas' own.

    Sparse layers get an `AdamasLayer` (codes next to the keys), dense ones a `PreallocatedLayer`
    (no ``torch.cat`` of the whole cache per step). The attention function receives keys and values
    but not the cache, so this hook (on each attention module) stashes the layer where the function
    finds it.
    """
    cache = kwargs.get(CACHE_ARGUMENT)
    layer = None
    if isinstance(cache, Cache) and module.layer_idx < len(cache.layers):
        layer = cache.layers[module.layer_idx]
        capacity = getattr(cache, CAPACITY_ATTRIBUTE, None)
        if module.config._attn_implementation == ATTENTION_NAME and _needs_swap(module, layer):
            settings = settings_for(module)
            if module.layer_idx >= settings.dense_layers:
                thresholds = settings.thresholds_for_layer(module.layer_idx)
                layer = _code_layer_type(settings).from_layer(layer, thresholds, settings.bits, capacity)
            else:
                layer = PreallocatedLayer.from_layer(layer, capacity)
            cache.layers[module.layer_idx] = layer
        elif isinstance(layer, PreallocatedLayer) and capacity is not None:
            layer.capacity = capacity
    setattr(module, CACHE_LAYER_ATTRIBUTE, layer)


def _needs_swap(module: torch.nn.Module, layer: object) -> bool:
    """Whether ``layer`` is not the one Adamas wants here: a plain `DynamicLayer`, a `PreallocatedLayer`
    in a sparse layer, or an `AdamasLayer` whose codes were made with other settings."""
    settings = settings_for(module)
    sparse_layer = module.layer_idx >= settings.dense_layers
    if type(layer) is DynamicLayer or (sparse_layer and type(layer) is PreallocatedLayer):
        return True
    if not isinstance(layer, AdamasLayer):
        return False
    thresholds = settings.thresholds_for_layer(module.layer_idx)
    return not (type(layer) is _code_layer_type(settings) and layer.encodes_with(thresholds, settings.bits))


def _code_layer_type(settings: AdamasConfig) -> type[AdamasLayer]:
    return OnlineCalibratedLayer if settings.calibration == "online" else AdamasLayer


def _prepare_module(module: torch.nn.Module) -> None:
    """Install the cache hook once (on a module's first Adamas call, or from `install_cache_hooks`)."""
    if not getattr(module, _HOOK_FLAG, False):
        module.register_forward_pre_hook(_stash_cache_layer, with_kwargs=True)
        setattr(module, _HOOK_FLAG, True)


def install_cache_hooks(model: torch.nn.Module) -> None:
    """Hook every attention module (one with an integer ``layer_idx``) before its first Adamas call.

    Without this, a module first reached by a decode step (a cache prefilled under sdpa, then switched
    to Adamas) would not find its cache on that step and re-encode every cached key once.
    """
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "config"):
            _prepare_module(module)


def _code_layer(module: torch.nn.Module, key: torch.Tensor) -> AdamasLayer | None:
    """The module's cache layer when it is an `AdamasLayer` holding exactly these keys (so its codes are theirs)."""
    layer = getattr(module, CACHE_LAYER_ATTRIBUTE, None)
    if (
        isinstance(layer, AdamasLayer)
        and layer.get_seq_length() == key.shape[2]
        and layer.keys.data_ptr() == key.data_ptr()
    ):
        return layer
    return None


def _key_codes(
    module: torch.nn.Module, key: torch.Tensor, thresholds: torch.Tensor, bits: int
) -> torch.Tensor:
    """Cached codes when the layer's cache holds exactly these keys, else codes computed now.

    The second case covers caches that store no codes (static, sliding-window, quantized, or a
    user's own layer type): every sparse layer then re-encodes its whole cache at every step, which
    is correct but costs about as much as the estimate itself, so it is said once.
    """
    layer = _code_layer(module, key)
    if layer is not None and layer.bits == bits:
        return layer.key_codes
    stored = getattr(module, CACHE_LAYER_ATTRIBUTE, None)
    logger.warning_once(
        f"Adamas: the cache layer ({type(stored).__name__}) stores no key codes, so every sparse layer "
        f"re-encodes all {key.shape[2]} cached keys at every decode step (correct, but slower). Use the "
        "DynamicCache that generate() builds by default or hf_adamas.AdamasCache."
    )
    return ops.hadamard_codes(key, thresholds, bits)


def _valid_positions(attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
    """``[batch, kv_len]`` bool of positions the (last) query may attend to, from the 4-D mask."""
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, query_length - 1, :]
    return last_row if last_row.dtype == torch.bool else last_row == 0


def _warn_dense_fallback(reason: str) -> None:
    logger.warning_once(f"Adamas attention runs dense (ordinary sdpa attention) {reason}.")


def adamas_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Adamas sparse attention. Shapes as every transformers attention function.

    Args:
        module: the attention module (reads ``layer_idx``, ``config.adamas_config``).
        query: ``[batch, q_heads, q_len, head_dim]``, post-RoPE.
        key, value: ``[batch, kv_heads, kv_len, head_dim]``, the whole cache after this step's update.
        attention_mask: boolean or additive 4-D mask from the registered mask builder, or None.

    Returns:
        ``([batch, q_len, q_heads, head_dim], None)``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"Adamas attention does not support attention-logit soft-capping ({type(module).__name__}, "
            "e.g. Gemma 2); use attn_implementation='eager' for this model."
        )
    settings = settings_for(module)
    _prepare_module(module)
    query_length, kv_length = query.shape[2], key.shape[2]
    sparse = (
        query_length == 1 and module.layer_idx >= settings.dense_layers and kv_length > settings.token_budget
    )
    if sparse and module.training:
        _warn_dense_fallback("in training mode: sparse selection is for inference only")
        sparse = False
    if sparse and kwargs.get("output_attentions", False):
        _warn_dense_fallback("when output_attentions=True: there are no dense weights to return")
        sparse = False
    if not sparse:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    valid = _valid_positions(attention_mask, query_length)
    layer = _fused_step_layer(settings, module, key, value)
    if layer is not None:
        output = _fused_step(settings, module, layer, query[:, :, 0], key, value, valid, scaling)
        return output[:, None], None
    arguments = {
        "settings": settings,
        "module": module,
        "query": query[:, :, 0],
        "key": key,
        "valid": valid,
        "key_codes": lambda thresholds: _key_codes(module, key, thresholds, settings.bits),
    }
    if settings.value_code_bits:  # the config allows it with selector="adamas_asymmetric" only
        indices, candidates = select_asymmetric_with_candidates(**arguments)
        output = _attention_with_tail(
            settings, module, query[:, :, 0], key, value, indices, candidates, scaling, valid
        )
    else:
        indices = SELECTORS[settings.selector](**arguments)
        output = ops.sparse_decode_attention(query[:, :, 0], key, value, indices, scaling)
    return output[:, None], None


def _fused_step_layer(
    settings: AdamasConfig, module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor
) -> AdamasLayer | None:
    """The cache layer when the default step runs as one C++ call (`_fused_step`): the asymmetric rule
    without the tail estimate, on a float32 CPU cache layer that stores these keys' codes."""
    if (
        settings.selector != "adamas_asymmetric"
        or settings.value_code_bits
        or not ops.float32_cpu_cache(key, value)
    ):
        return None
    layer = _code_layer(module, key)
    return layer if layer is not None and layer.bits == settings.bits else None


def _fused_step(
    settings: AdamasConfig,
    module: torch.nn.Module,
    layer: AdamasLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """`select_adamas_asymmetric` (with its rescoring) + `ops.sparse_decode_attention` in one C++ call
    (`ops.cpu.asymmetric_decode_step_cpu`), which also writes the codes of the keys stored since the
    last step into the layer's code buffer: the Python between the steps cost as much as they did."""
    _, centroids = code_book_for(settings, module, key)
    codes, coded = layer.unwritten_key_codes()
    output, _ = asymmetric_decode_step_cpu(
        query, key, value, codes, coded, layer.thresholds, centroids, settings.bits,
        settings.gqa_selection == "shared_per_kv_group", settings.token_budget, settings.candidate_pool, valid,
        forced_positions(settings, valid, key.shape[0], key.shape[2], key.device), scaling,
    )  # fmt: skip
    layer.key_codes_written()
    return output


def _value_codes(
    module: torch.nn.Module, value: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache layer's value codes and centroids when it holds exactly these values, else made now
    (with a code book from all of them; said once, as for key codes in `_key_codes`)."""
    layer = getattr(module, CACHE_LAYER_ATTRIBUTE, None)
    if (
        isinstance(layer, AdamasLayer)
        and layer.get_seq_length() == value.shape[2]
        and layer.values.data_ptr() == value.data_ptr()
    ):
        return layer.value_codes(bits)
    logger.warning_once(
        f"Adamas: the cache layer ({type(layer).__name__}) stores no value codes, so every sparse layer "
        f"re-encodes all {value.shape[2]} cached values for the tail estimate at every decode step."
    )
    thresholds, centroids = code_book(value, bits)
    return reference.hadamard_codes(value, thresholds, bits), centroids


def _attention_with_tail(
    settings: AdamasConfig,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    candidates: torch.Tensor | None,
    scaling: float,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """``ops.tail_decode_attention``: the selection exact, every other key with its code estimate (the
    rescored ``candidates`` with their exact logits)."""
    thresholds, centroids = code_book_for(settings, module, key)
    key_codes = reference.PackedCodes(
        _key_codes(module, key, thresholds, settings.bits), centroids, settings.bits
    )
    value_codes = reference.PackedCodes(
        *_value_codes(module, value, settings.value_code_bits), settings.value_code_bits
    )
    return ops.tail_decode_attention(
        query, key, value, indices, scaling, key_codes, value_codes, valid, candidates
    )
