"""`OfflineHFLM`: lm-eval's `HFLM` on a model loaded by `hf_common.load_model_and_tokenizer`.

`HFLM` accepts a built model as ``pretrained``; this base class builds it with the project's loader, so
``pretrained=HuggingFaceTB/SmolLM2-135M-Instruct`` (the default) loads the embedded GGUF offline, and
checks every ``--model_args`` key: `HFLM` silently ignores its loading options when it is handed a model,
and ``from_pretrained`` would silently store a misspelt key on the config.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection
from typing import Any, ClassVar

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_common.default_model import DEFAULT_MODEL_ID, load_model_and_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["HFLM_OPTIONS", "LOADER_OPTIONS", "OfflineHFLM", "finite_or_none"]

LOADER_OPTIONS = frozenset({"dtype", "device", "revision", "trust_remote_code", "tokenizer"})
"""``--model_args`` used to load the model (besides ``pretrained``)."""

HFLM_OPTIONS = frozenset(
    {
        "backend",
        "truncation",
        "logits_cache",
        "max_length",
        "softmax_dtype",
        "mixed_precision_dtype",
        "batch_size",
        "max_batch_size",
        "add_bos_token",
        "prefix_token_id",
        "think_end_token",
        "enable_thinking",
        "chat_template_args",
    }
)
"""`HFLM` options that still apply to a model built outside it (parallelism, PEFT, GPTQ, GGUF do not)."""


def finite_or_none(value: Any) -> Any:
    """``None`` for NaN/inf floats (results JSON stays strict), the value otherwise; lists element-wise."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [finite_or_none(item) for item in value]
    return value


class OfflineHFLM(HFLM):
    """Base of the ``hf-adamas`` / ``hf-scylla`` lm-eval models: loads through the project's loader.

    Subclasses set ``MODEL_TYPE`` and ``OWN_OPTIONS`` (their own ``--model_args``), take those out of
    ``kwargs`` and call ``super().__init__(pretrained, attn_implementation=..., **kwargs)``.
    """

    MODEL_TYPE: ClassVar[str] = "hf"
    OWN_OPTIONS: ClassVar[Collection[str]] = ()

    def __init__(
        self,
        pretrained: str | os.PathLike | PreTrainedModel = DEFAULT_MODEL_ID,
        *,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - LOADER_OPTIONS - HFLM_OPTIONS)
        if unknown:
            accepted = sorted({"pretrained", *self.OWN_OPTIONS, *LOADER_OPTIONS, *HFLM_OPTIONS})
            raise ValueError(
                f"Unknown --model_args for {self.MODEL_TYPE}: {unknown}. Accepted: {', '.join(accepted)}"
            )
        loader = {key: kwargs.pop(key) for key in LOADER_OPTIONS & set(kwargs)}
        tokenizer = loader.pop("tokenizer", None)
        if isinstance(pretrained, PreTrainedModel):
            if tokenizer is None:
                raise ValueError(f"{self.MODEL_TYPE}: a model object as pretrained= needs tokenizer= as well")
            model = pretrained
            if attn_implementation is not None:
                model.set_attn_implementation(attn_implementation)
            self.model_name = model.name_or_path
        else:
            dtype = loader.pop("dtype", None)
            if str(loader.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI asks for "cuda" by default; HFLM, too, stays on the CPU without one
                logger.warning("%s: no CUDA device, evaluating on the CPU", self.MODEL_TYPE)
                loader.pop("device")
            model, loaded_tokenizer = load_model_and_tokenizer(
                pretrained,
                dtype=torch.float32 if dtype is None else get_dtype(dtype),
                attn_implementation=attn_implementation,
                **loader,
            )
            tokenizer = tokenizer or loaded_tokenizer
            self.model_name = str(pretrained)
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = _load_tokenizer(str(tokenizer))
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        # HFLM would look a model object up on the Hub for its sha; keep the name for the results JSON
        self.pretrained = self.model_name

    def get_model_info(self) -> dict[str, Any]:
        """HFLM's model information with the model's name (no Hub lookup for local folders)."""
        info = {
            "model_num_parameters": self._model.num_parameters(),
            "model_dtype": str(self._model.dtype),
            "model_name": self.model_name,
        }
        if not os.path.isdir(self.model_name) and self.model_name != DEFAULT_MODEL_ID:
            info |= {key: value for key, value in super().get_model_info().items() if key not in info}
        return info


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A tokenizer by name; the default model's ID resolves to its embedded copy, offline."""
    from hf_common.tasks.local_tasks import resolve_tokenizer

    return resolve_tokenizer({"tokenizer": name})
