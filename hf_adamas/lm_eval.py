"""The ``hf-adamas`` lm-eval model: `HFLM` with ``attn_implementation="adamas"``.

``--model hf-adamas --model_args token_budget=256,selector=adamas`` evaluates the model (default: the
embedded SmolLM2-135M-Instruct) with Adamas sparse attention; every `AdamasConfig` field is a model arg
(lists such as ``thresholds`` through JSON ``--model_args '{"thresholds": [-1, 0, 1]}'``), and a folder
saved with an ``adamas_config`` keeps its settings unless overridden.

Generation (``generate_until``) is plain ``generate()``: dense prefill, sparse decode steps. Scoring
(``loglikelihood``, ``loglikelihood_rolling``) would be a single forward, which Adamas leaves dense; with
``decode_scoring=True`` (the default) each position past the first ``token_budget`` is instead scored
by a decode step through the KV cache, as during generation, so scores see the sparse attention (the
paper's perplexity protocol). ``decode_scoring=False`` gives the one-forward scores of ``hf``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from lm_eval.api.registry import register_model
from transformers import DynamicCache, PreTrainedModel

from hf_adamas.bench.evaluation import decode_step
from hf_adamas.config import AdamasConfig
from hf_adamas.integration import apply_adamas
from hf_common.compat import cache_kwargs
from hf_common.default_model import DEFAULT_MODEL_ID
from hf_common.harness_lm import OfflineHFLM

__all__ = ["ADAMAS_OPTIONS", "AdamasLM"]

ADAMAS_OPTIONS = frozenset(field.name for field in dataclasses.fields(AdamasConfig))
"""`AdamasConfig` fields, each accepted as a ``--model_args`` key."""


@register_model("hf-adamas")
class AdamasLM(OfflineHFLM):
    """lm-eval model ``hf-adamas``: a causal LM with Adamas sparse attention (see the module docstring)."""

    MODEL_TYPE = "hf-adamas"
    OWN_OPTIONS = (*sorted(ADAMAS_OPTIONS), "decode_scoring")

    def __init__(
        self,
        pretrained: str | os.PathLike | PreTrainedModel = DEFAULT_MODEL_ID,
        decode_scoring: bool = True,
        **kwargs: Any,
    ) -> None:
        overrides = {key: kwargs.pop(key) for key in ADAMAS_OPTIONS & set(kwargs)}
        AdamasConfig(**overrides)  # validate before loading: a ValueError names the bad field
        super().__init__(pretrained, attn_implementation="adamas", **kwargs)
        stored = AdamasConfig.from_model_config(self.model.config.get_text_config(decoder=True))
        self.adamas_config = AdamasConfig(**{**stored.to_dict(), **overrides})
        apply_adamas(self.model, self.adamas_config)
        self.decode_scoring = bool(decode_scoring)

    @torch.inference_mode()
    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``: one forward over the first ``token_budget`` tokens, then decode steps.

        Batches are right-padded here; a real token never attends to the padding after it, so the
        logits of real positions do not depend on it.
        """
        if not self.decode_scoring or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        prefix = min(inps.shape[1], self.adamas_config.token_budget)
        cache = DynamicCache(config=self.model.config)
        logits = [self.model(input_ids=inps[:, :prefix], use_cache=True, **cache_kwargs(cache)).logits]
        for position in range(prefix, inps.shape[1]):
            logits.append(decode_step(self.model, cache, inps[:, position : position + 1])[:, None])
        return torch.cat(logits, dim=1)

    def get_model_info(self) -> dict[str, Any]:
        """The model information plus the Adamas settings and scoring mode, for the results JSON."""
        return super().get_model_info() | {
            "adamas": {**self.adamas_config.to_dict(), "decode_scoring": self.decode_scoring}
        }
