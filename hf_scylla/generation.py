"""Entry points: ``model.generate(custom_generate=scylla_generate, draft_model=draft)`` and `generate`.

transformers offers no argument to inject a candidate generator, but ``generate`` accepts a callable
``custom_generate`` after preparing the cache, processors and stopping criteria. `scylla_generate` runs
transformers' own ``_assisted_decoding`` with a `ScyllaCandidateGenerator`: for the duration of the
call the *model instance* gets a ``_get_candidate_generator`` attribute returning it (removed on
exit); transformers' classes and functions are left untouched.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

from hf_common.compat import CACHE_ARGUMENT
from hf_common.few_rows_linear import few_rows_linear_available, few_rows_linear_layers
from hf_scylla.candidate_generator import ScyllaCandidateGenerator, ScyllaStats
from hf_scylla.modeling import ScyllaDraftModel
from hf_scylla.tree import TreeConfig, tree_decode

__all__ = ["ScyllaGenerateOutput", "check_generation_inputs", "generate", "scylla_generate"]

MAX_BATCH_SIZE = 1
"""transformers' assisted decoding verifies one sequence at a time."""


def check_generation_inputs(
    target: PreTrainedModel,
    input_ids: torch.Tensor,
    max_length: int | None = None,
    max_batch_size: int | None = MAX_BATCH_SIZE,
) -> None:
    """Clear errors for inputs speculative decoding cannot serve: a batch, or a prompt past the context."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if max_batch_size is not None and input_ids.shape[0] > max_batch_size:
        raise ValueError(
            f"Scylla speculative decoding supports batch size {max_batch_size} (transformers' assisted "
            f"decoding verifies one chain at a time), got batch size {input_ids.shape[0]}; loop over "
            "prompts, or use hf_scylla.batched_generate (greedy, rows advance together)"
        )
    context = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    if context is None:
        return
    if input_ids.shape[1] >= context:
        raise ValueError(
            f"The prompt has {input_ids.shape[1]} tokens but the target's context is {context} tokens: "
            "there is no room to generate"
        )
    if max_length is not None and max_length > context:
        raise ValueError(
            f"Generating up to {max_length} tokens (prompt + new tokens) exceeds the target's context of "
            f"{context} tokens; lower max_new_tokens"
        )


def scylla_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    draft_model: ScyllaDraftModel,
    scylla_stats: ScyllaStats | None = None,
    max_draft_tokens: int | None = None,
    confidence_threshold: float | None = None,
    lookup_tokens: int | None = None,
    tree: TreeConfig | None = None,
    few_rows_linear: bool = True,
    **model_kwargs,
):
    """A ``custom_generate`` callable: assisted decoding of ``model`` with the Scylla ``draft_model``.

    Use as ``model.generate(input_ids, custom_generate=scylla_generate, draft_model=draft,
    scylla_stats=stats, max_new_tokens=...)``; ``scylla_stats`` (optional) collects acceptance, and
    ``max_draft_tokens`` / ``confidence_threshold`` / ``lookup_tokens`` (prompt-lookup proposals, 0: off)
    override the draft config's for this call.
    ``tree=TreeConfig(depth, top_k, total_tokens)`` drafts EAGLE-2 dynamic trees instead of chains
    (`hf_scylla.tree`, batch 1; trees draft with the draft alone, without prompt lookup).
    ``few_rows_linear``: the target's and draft's float32 CPU linear layers use
    `hf_common.few_rows_linear` for inputs of 2-16 rows during the call (verification and tree drafting
    cost about one 1-token forward instead of 1.5-3; one-row steps stay ``F.linear``); no effect elsewhere.
    """
    check_generation_inputs(model, input_ids, generation_config.max_length)
    cache = model_kwargs.get(CACHE_ARGUMENT)
    cached = cache.get_seq_length() if cache is not None else 0
    if cached:
        raise ValueError(
            f"The target's cache (past_key_values) already holds {cached} tokens: Scylla drafting needs the "
            "target's hidden states of the whole prompt, which a prefilled cache skips. Pass an empty cache "
            "(or none)."
        )
    if tree is not None and (
        max_draft_tokens is not None or confidence_threshold is not None or lookup_tokens
    ):
        raise ValueError(
            "max_draft_tokens/confidence_threshold/lookup_tokens shape chains; a tree takes TreeConfig"
        )
    if "_get_candidate_generator" in vars(model):
        raise RuntimeError("scylla_generate is already running on this model instance (re-entrant call)")
    layers = few_rows_linear_layers(model, draft_model) if few_rows_linear else contextlib.nullcontext()
    with layers:
        if tree is not None:
            return tree_decode(
                model,
                draft_model,
                input_ids,
                tree,
                generation_config,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                stats=scylla_stats,
                **model_kwargs,
            )
        generator = ScyllaCandidateGenerator(
            draft_model,
            model,
            generation_config,
            logits_processor=logits_processor,
            max_draft_tokens=max_draft_tokens,
            confidence_threshold=confidence_threshold,
            lookup_tokens=lookup_tokens,
            stats=scylla_stats,
        )
        model._get_candidate_generator = lambda **_: generator
        try:
            return GenerationMixin._assisted_decoding(
                model,
                input_ids,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                generation_config=generation_config,
                **model_kwargs,
            )
        finally:
            del model._get_candidate_generator


@dataclass
class ScyllaGenerateOutput:
    """What `generate` returns: ``generate()``'s own output and the acceptance statistics."""

    output: torch.LongTensor | GenerateDecoderOnlyOutput
    stats: ScyllaStats


def generate(
    target: PreTrainedModel, draft: ScyllaDraftModel, input_ids: torch.LongTensor, **generate_kwargs
) -> ScyllaGenerateOutput:
    """Speculative decoding of ``target`` with ``draft``; lossless (greedy or sampled) and timed.

    ``generate_kwargs`` go to ``target.generate`` (``max_new_tokens``, ``do_sample``, ``temperature``,
    ``attention_mask``...). ``stats.new_tokens`` / ``stats.seconds`` give tokens per second.
    """
    check_generation_inputs(target, input_ids)
    if generate_kwargs.get("few_rows_linear", True):
        few_rows_linear_available()  # builds the C++ kernel on a fresh machine (about 30 s): not timed
    stats = ScyllaStats()
    start = time.perf_counter()
    output = target.generate(
        input_ids, custom_generate=scylla_generate, draft_model=draft, scylla_stats=stats, **generate_kwargs
    )
    stats.seconds = time.perf_counter() - start
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    stats.new_tokens = sequences.shape[1] - input_ids.shape[1]
    stats.target_forwards = stats.cycles + 1  # the prefill, then one verification forward per cycle
    return ScyllaGenerateOutput(output=output, stats=stats)
