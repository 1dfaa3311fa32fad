"""Registration with transformers, and turning Adamas on for an already loaded model.

``import hf_adamas`` registers ``"adamas"`` with `AttentionInterface` and, under the same name, the
sdpa mask builder with `AttentionMaskInterface` (an unregistered name would get
``attention_mask=None`` and silently ignore left padding). After that,
``from_pretrained(..., attn_implementation="adamas")`` and ``model.set_attn_implementation("adamas")``
both work; `apply_adamas` also validates the model and stores an `AdamasConfig` on it.
"""

from __future__ import annotations

import functools
import inspect

from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_adamas.attention import ATTENTION_NAME, adamas_attention_forward, install_cache_hooks
from hf_adamas.cache import CAPACITY_ATTRIBUTE
from hf_adamas.config import AdamasConfig, check_model_config
from hf_common.compat import CACHE_ARGUMENT


def register() -> None:
    """Register the ``"adamas"`` attention function and its mask builder (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, adamas_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _uses_attention_interface(model: PreTrainedModel) -> bool:
    """Whether the model's attention dispatches through transformers' `AttentionInterface`."""
    source = inspect.getsource(inspect.getmodule(type(model)))
    return "ALL_ATTENTION_FUNCTIONS.get_interface(" in source


def apply_adamas(model: PreTrainedModel, adamas_config: AdamasConfig | None = None) -> PreTrainedModel:
    """Switch a loaded model to Adamas attention with ``adamas_config`` (or the model's stored one).

    The settings are stored on ``model.config`` (so ``save_pretrained`` keeps them) and the model's
    attention implementation is set to ``"adamas"``. Returns the same model.
    """
    name = type(model).__name__
    if not _uses_attention_interface(model):
        raise ValueError(
            f"{name} does not route its attention through transformers' AttentionInterface, so "
            "attn_implementation='adamas' cannot reach it. Supported: Llama, Mistral, Qwen2/2.5/3 and "
            "other models whose modeling file calls ALL_ATTENTION_FUNCTIONS.get_interface."
        )
    adamas_config = adamas_config or AdamasConfig.from_model_config(model.config)
    check_model_config(model.config, adamas_config, name)
    adamas_config.save_to_model_config(model.config.get_text_config(decoder=True))
    register()
    _announce_generation_length(model)
    install_cache_hooks(model)
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def _announce_generation_length(model: PreTrainedModel) -> None:
    """Make ``generate()`` record the final sequence length on its cache, so code caches reserve it once.

    ``generate`` knows the length (prompt + ``max_new_tokens``) when it builds the cache, but the
    attention function only sees keys and values; this wraps the model's (not the class's)
    ``_prepare_cache_for_generation`` to store that length on the cache under `CAPACITY_ATTRIBUTE`.
    Without it (a transformers that renames the method, or a hand-written decode loop) the code
    cache grows by `hf_adamas.cache.GROWTH` instead.
    """
    original = getattr(model, "_prepare_cache_for_generation", None)
    if original is None or getattr(original, "_adamas_wrapped", False):
        return
    signature = inspect.signature(original)
    if not {"model_kwargs", "max_cache_length"} <= set(signature.parameters):
        return

    @functools.wraps(original)
    def prepare_cache(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        cache = bound["model_kwargs"].get(CACHE_ARGUMENT)
        if isinstance(cache, Cache):
            setattr(cache, CAPACITY_ATTRIBUTE, int(bound["max_cache_length"]))
        return result

    prepare_cache._adamas_wrapped = True
    model._prepare_cache_for_generation = prepare_cache
