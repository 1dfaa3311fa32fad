"""The standalone-draft baseline: a small causal LM for transformers' assisted generation.

Scylla's draft reads the target's hidden state; the classic alternative (`generate(assistant_model=...)`)
is a separate small LM that sees tokens only. For a fair comparison the baseline here has the draft's
shape: the target's hidden size, heads and vocabulary, ``num_hidden_layers`` decoder layers, and its
embedding and LM head initialised from the target's (which the Scylla draft shares), trained with
next-token cross-entropy on the same cached data (`hf_scylla.training.FeatureDataset`, whose hidden
states it ignores).
"""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from hf_scylla.training import FeatureDataset, pad_records, trained_positions, trainer_defaults

__all__ = [
    "collate_for_causal_lm",
    "load_standalone_draft",
    "make_standalone_draft",
    "train_standalone_draft",
]


def make_standalone_draft(target: PreTrainedModel, num_hidden_layers: int = 1) -> LlamaForCausalLM:
    """A new Llama LM shaped like a depth-``num_hidden_layers`` Scylla draft of ``target``."""
    source = target.config
    config = LlamaConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=getattr(source, "num_key_value_heads", source.num_attention_heads),
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=getattr(source, "rms_norm_eps", 1e-5),
        rope_parameters=getattr(source, "rope_parameters", None),
        tie_word_embeddings=bool(getattr(source, "tie_word_embeddings", False)),
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(target.dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(target.get_input_embeddings().weight)
        if not config.tie_word_embeddings:
            model.get_output_embeddings().weight.copy_(target.get_output_embeddings().weight)
    return model.to(target.device).eval()


def collate_for_causal_lm(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Cached feature records to ``input_ids``/``attention_mask``/``labels`` (-100 where the draft
    would not learn: prompt and padding)."""
    records = [record | {"attention_mask": torch.ones_like(record["input_ids"])} for record in records]
    batch = pad_records(records, ("input_ids", "attention_mask", "loss_mask"))
    labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def load_standalone_draft(
    target: PreTrainedModel, checkpoint: str | os.PathLike | None = None, num_hidden_layers: int = 1
) -> LlamaForCausalLM:
    """The baseline LM on ``target``'s device: loaded from ``checkpoint`` (same vocabulary as the target,
    else ``ValueError``), or new from `make_standalone_draft` with seed 0."""
    if checkpoint is None:
        torch.manual_seed(0)
        return make_standalone_draft(target, num_hidden_layers)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=target.dtype).to(target.device)
    if model.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"{checkpoint} has a vocabulary of {model.config.vocab_size}, the target {target.config.vocab_size}"
        )
    return model


def train_standalone_draft(
    model: LlamaForCausalLM,
    features: FeatureDataset,
    output_dir: str | os.PathLike,
    resume: bool | str = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **training_arguments,
):
    """Train the baseline LM on ``features``' tokens with the Trainer (same defaults as `train_draft`).

    The embedding and LM head stay frozen at the target's values, as the Scylla draft's shared ones do,
    so both learn the same kind of parameters: decoder layers (plus, for the draft, its input
    projection). Returns the ``TrainOutput``; the final model (and ``tokenizer``, which makes the folder
    usable as ``assistant_model``) is saved to ``output_dir``.
    """
    if not trained_positions(features):
        raise ValueError("no position is trained: every loss mask is 0 (use a longer max_length)")
    for parameter in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        parameter.requires_grad_(False)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**trainer_defaults(output_dir) | training_arguments),
        train_dataset=features,
        data_collator=collate_for_causal_lm,
    )
    model.train()
    result = trainer.train(resume_from_checkpoint=resume or None)
    model.eval()
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return result
