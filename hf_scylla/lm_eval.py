"""The ``hf-scylla`` lm-eval model: `HFLM` whose generation is Scylla speculative decoding.

``--model hf-scylla --model_args draft=<folder>`` loads the target (default: the embedded
SmolLM2-135M-Instruct) and the draft with `ScyllaDraftModel.from_pretrained(..., target=,
target_tokenizer=)`, which refuses a draft built for another target. ``generate_until`` decodes one
request at a time (``batch_size=1``: transformers' assisted decoding verifies one chain) with
`hf_scylla.generate`; scoring requests are the target's own forwards, as with ``hf``.

Stop sequences: one verification can accept several tokens, and lm-eval's stop check decodes only the
last few tokens of each step, so a stop string inside an accepted chunk would be missed. `StopStrings`
decodes everything generated so far instead; the text is cut at the first stop string afterwards
(lm-eval's own post-processing), so the output equals plain greedy decoding.

The decoding statistics (tau, tokens/s; with ``baseline=True`` also plain greedy tokens/s on the same
requests, the speedup and how many outputs equal greedy) go into the results JSON under
``config.scylla`` through `get_model_info`.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.utils import postprocess_generated_text
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from hf_common.default_model import DEFAULT_MODEL_ID
from hf_common.harness_lm import OfflineHFLM, finite_or_none
from hf_scylla.candidate_generator import ScyllaStats
from hf_scylla.generation import MAX_BATCH_SIZE, generate
from hf_scylla.modeling import ScyllaDraftModel

__all__ = ["ScyllaLM", "StopStrings", "card_notes", "speculative_eval_results"]


class StopStrings(StoppingCriteria):
    """Stop once any of ``stops`` occurs anywhere in the text generated after ``prompt_length`` tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.prompt_length = prompt_length

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :])
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _generation_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's convention: temperature 0 (the default) without ``do_sample`` means greedy."""
    kwargs = dict(kwargs)
    temperature = kwargs.pop("temperature", 0.0)
    if temperature == 0.0 and not kwargs.get("do_sample"):
        kwargs["do_sample"] = False
    else:
        kwargs["temperature"] = temperature
    return kwargs


@register_model("hf-scylla")
class ScyllaLM(OfflineHFLM):
    """lm-eval model ``hf-scylla``: generation with a Scylla draft (see the module docstring)."""

    MODEL_TYPE = "hf-scylla"
    OWN_OPTIONS = ("draft", "max_draft_tokens", "confidence_threshold", "lookup_tokens", "baseline")

    def __init__(
        self,
        pretrained: str | os.PathLike | PreTrainedModel = DEFAULT_MODEL_ID,
        draft: str | os.PathLike | None = None,
        max_draft_tokens: int | None = None,
        confidence_threshold: float | None = None,
        lookup_tokens: int | None = None,
        baseline: bool = False,
        **kwargs: Any,
    ) -> None:
        if not draft:
            raise ValueError("hf-scylla needs a draft: --model_args draft=<folder of a trained Scylla draft>")
        if not os.path.isdir(draft) and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(draft)):
            raise ValueError(
                f"hf-scylla: draft={draft} is neither a folder holding a saved Scylla draft nor a Hub repository id"
            )
        batch_size = kwargs.get("batch_size", 1)
        if str(batch_size) != str(MAX_BATCH_SIZE):
            raise ValueError(
                f"hf-scylla decodes one sequence at a time (transformers' assisted decoding verifies one "
                f"chain), got batch_size={batch_size}; use --batch_size 1"
            )
        super().__init__(pretrained, **kwargs)
        # raises a ValueError naming hidden size, vocabulary or tokenizer when the draft does not fit
        self.draft = ScyllaDraftModel.from_pretrained(
            draft, target=self.model, target_tokenizer=self.tokenizer, dtype=self.model.dtype
        )
        self.draft = self.draft.to(self.model.device).eval()
        self.draft_path = str(draft)
        self.max_draft_tokens = max_draft_tokens
        self.confidence_threshold = confidence_threshold
        self.lookup_tokens = lookup_tokens
        self.baseline = bool(baseline)
        self.stats = ScyllaStats()
        self.baseline_tokens = 0
        self.baseline_seconds = 0.0
        self.baseline_matches = 0
        self.requests = 0

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        """Speculative decoding of one request; with ``baseline``, plain decoding of it too (timed)."""
        kwargs = _generation_kwargs(generation_kwargs)
        kwargs |= {"max_length": max_length, "pad_token_id": self.tokenizer.pad_token_id}
        stopping = StoppingCriteriaList([StopStrings(self.tokenizer, stop, context.shape[1])])
        result = generate(
            self.model,
            self.draft,
            context,
            stopping_criteria=stopping,
            max_draft_tokens=self.max_draft_tokens,
            confidence_threshold=self.confidence_threshold,
            lookup_tokens=self.lookup_tokens,
            **kwargs,
        )
        self.stats.merge(result.stats)
        self.requests += 1
        if self.baseline:
            start = time.perf_counter()
            plain = self.model.generate(context, stopping_criteria=stopping, **kwargs)
            self.baseline_seconds += time.perf_counter() - start
            self.baseline_tokens += plain.shape[1] - context.shape[1]
            self.baseline_matches += self._text(plain, context, stop) == self._text(
                result.output, context, stop
            )
        return result.output

    def _text(self, sequences: torch.Tensor, context: torch.Tensor, stop: list[str]) -> str:
        """The generated text as lm-eval keeps it: decoded and cut at the first stop string."""
        return postprocess_generated_text(
            self.tok_decode(sequences[0, context.shape[1] :].tolist()), stop, None
        )

    def decoding_stats(self) -> dict[str, Any]:
        """tau, tokens/s and draft settings; with ``baseline``, greedy tokens/s, speedup and matches."""
        stats = self.stats.to_dict()
        info = {
            "draft": self.draft_path,
            "draft_layers": self.draft.config.num_hidden_layers,
            "max_draft_tokens": self.max_draft_tokens or self.draft.config.max_draft_tokens,
            "confidence_threshold": (
                self.draft.config.confidence_threshold
                if self.confidence_threshold is None
                else self.confidence_threshold
            ),
            "lookup_tokens": self.draft.config.lookup_tokens
            if self.lookup_tokens is None
            else self.lookup_tokens,
            "requests": self.requests,
            **{
                key: stats[key]
                for key in ("tau", "cycles", "lookup_cycles", "new_tokens", "seconds", "tokens_per_second")
            },
            "acceptance_per_position": stats["acceptance_per_position"],
        }
        if self.baseline:
            baseline_speed = (
                self.baseline_tokens / self.baseline_seconds if self.baseline_seconds else float("nan")
            )
            info |= {
                "baseline_new_tokens": self.baseline_tokens,
                "baseline_seconds": self.baseline_seconds,
                "baseline_tokens_per_second": baseline_speed,
                "speedup": stats["tokens_per_second"] / baseline_speed if baseline_speed else float("nan"),
                "outputs_equal_to_baseline": self.baseline_matches,
            }
        return {key: finite_or_none(value) for key, value in info.items()}

    def get_model_info(self) -> dict[str, Any]:
        """The model information plus `decoding_stats` under ``"scylla"``, for the results JSON."""
        return super().get_model_info() | {"scylla": self.decoding_stats()}


def speculative_eval_results(results: dict[str, Any]) -> list:
    """Model-index entries for the measured tau / speedup of an ``hf-scylla`` results dict (card format of
    `hf_scylla.hub`); empty when the run decoded nothing."""
    from hf_scylla.hub import eval_result_entries

    scylla = results.get("config", {}).get("scylla") or {}
    measured = {key: scylla[key] for key in ("tau", "speedup") if scylla.get(key) is not None}
    if not measured:
        return []
    tasks = ", ".join(sorted(results.get("results", {})))
    return eval_result_entries(
        {**measured, "dataset_name": f"{tasks} (lm-eval, local)", "dataset_type": tasks.replace(", ", "+")}
    )


def card_notes(results: dict[str, Any]) -> list[str]:
    """The line under a card's results table: tau, tokens/s and speedup measured during the tasks."""
    scylla = results.get("config", {}).get("scylla") or {}
    stats = ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in scylla.items()
        if key in ("tau", "tokens_per_second", "baseline_tokens_per_second", "speedup") and value is not None
    )
    return [f"Speculative decoding during these tasks: {stats}."] if stats else []
