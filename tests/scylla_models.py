"""Tiny target/draft pairs for the Scylla tests, with a knob for how often the draft is right."""

from __future__ import annotations

import torch
from conftest import make_tiny_config
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_scylla import ScyllaDraftConfig, ScyllaDraftModel


def make_target(
    vocab_size: int = 128,
    context_scale: float = 1.0,
    seed: int = 0,
    head_dim: int = 16,
    family: str = "llama",
    **overrides,
) -> PreTrainedModel:
    """A tiny random Llama (or another ``family`` of conftest's); ``context_scale < 1`` shrinks
    attention/MLP outputs towards a bigram model."""
    torch.manual_seed(seed)
    config = make_tiny_config(family, head_dim, vocab_size=vocab_size, num_hidden_layers=2, **overrides)
    target = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(context_scale)
            layer.mlp.down_proj.weight.mul_(context_scale)
    return target


def make_draft(
    target: PreTrainedModel,
    depth: int = 1,
    oracle: bool = False,
    oracle_context_scale: float = 0.0,
    seed: int = 1,
    **overrides,
) -> ScyllaDraftModel:
    """A random draft, or (``oracle``) one predicting the bigram feature ``embed(x_{t+1})``.

    The oracle draft agrees with a target built with a small ``context_scale`` on most tokens, so
    tests see long accepted chains as well as rejections. ``oracle_context_scale > 0`` keeps that
    fraction of the draft's attention/MLP outputs, so its guesses also depend on its KV cache.
    """
    torch.manual_seed(seed)
    config = ScyllaDraftConfig.from_target_config(target.config, num_hidden_layers=depth, **overrides)
    draft = ScyllaDraftModel(config).eval()
    draft.attach_target(target)
    if oracle:
        hidden = config.target_hidden_size
        with torch.no_grad():
            draft.fc.weight.zero_()
            draft.fc.weight[:, :hidden] = torch.eye(hidden)
            for layer in draft.layers:
                layer.self_attn.o_proj.weight.mul_(oracle_context_scale)
                layer.mlp.down_proj.weight.mul_(oracle_context_scale)
    return draft


@torch.no_grad()
def peaky_sampling_pair(vocab: int = 4) -> tuple[PreTrainedModel, ScyllaDraftModel]:
    """A target with a peaky LM head over ``vocab`` tokens and a 2-token draft with a strong fc layer:
    sampling checks small enough for an exact law, with draft acceptance well inside (0, 1)."""
    target = make_target(vocab_size=vocab, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    target.lm_head.weight.mul_(6.0)
    draft = make_draft(target, max_draft_tokens=2)
    draft.fc.weight.mul_(10.0)
    return target, draft


@torch.no_grad()
def continuation_record(
    target: PreTrainedModel, prompt: torch.Tensor, max_new_tokens: int, with_features: bool = True
) -> dict[str, torch.Tensor]:
    """A sampled continuation of ``(1, P)`` ``prompt`` as a training record, the prompt masked out of the
    loss; ``with_features=False`` stores placeholder features (the standalone baseline reads tokens only)."""
    ids = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=True)[0]
    if with_features:
        hidden = target(ids[None], output_hidden_states=[-1]).hidden_states[-1][0]
    else:
        hidden = torch.zeros(len(ids), 1)
    loss_mask = torch.ones_like(ids)
    loss_mask[: prompt.shape[1]] = 0
    return {"input_ids": ids, "hidden_states": hidden, "loss_mask": loss_mask}
