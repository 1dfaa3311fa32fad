"""Reduced draft vocabulary (EAGLE-3's ``d2t``/``t2d``, FR-Spec): a draft LM head over the N most frequent tokens.

The draft's LM head dominates its step time (49,152 x 576 for SmolLM2). A head over only the N most
frequent target tokens of the draft's training data costs N/V of that; drafted ids are mapped back to
the target's vocabulary, where the target verifies them, so decoding stays lossless. The mapping is
stored as EAGLE-3 does: ``d2t[i]`` is the offset with ``target_id = i + d2t[i]`` (ids kept in increasing
order) and ``t2d`` is a boolean mask over the target's vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from hf_scylla.config import tokenizer_fingerprint

if TYPE_CHECKING:
    from hf_scylla.modeling import ScyllaDraftModel

__all__ = [
    "DEFAULT_DRAFT_VOCAB_SIZE",
    "check_vocabulary_mapping",
    "count_tokens",
    "draft_target_ids",
    "frequent_draft_vocabulary",
    "full_vocabulary_draft",
    "full_vocabulary_logits",
    "most_frequent_tokens",
    "reduce_draft_vocabulary",
]

DEFAULT_DRAFT_VOCAB_SIZE = 8192
"""Chosen by ``hf-scylla verify-cost`` on SmolLM2-135M (results/scylla/speed): heads of 2K-16K tokens lose
no measured top-1 agreement on the held-out prompt sets, and 2K-8K all cost under 3.2% of a target step
(full head: 15%); 8K keeps the most rare tokens within that floor, for drafts stronger than this one."""


def count_tokens(token_lists: Iterable[Iterable[int]], vocab_size: int) -> torch.Tensor:
    """``(vocab_size,)`` occurrence counts of every id over ``token_lists``."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for tokens in token_lists:
        ids = torch.as_tensor(list(tokens), dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"token ids must be in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}"
            )
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def most_frequent_tokens(
    counts: torch.Tensor, size: int, always_include: Iterable[int] = ()
) -> torch.LongTensor:
    """The ``size`` most frequent ids (ties: lower id first) plus ``always_include``, in increasing order.

    ``always_include`` (e.g. EOS and the chat template's special tokens) takes places from the tail of
    the ranking, so the result has exactly ``size`` ids.
    """
    vocab_size = len(counts)
    if not 1 <= size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {size}")
    forced = sorted({int(token) for token in always_include})
    if len(forced) > size or any(not 0 <= token < vocab_size for token in forced):
        raise ValueError(
            f"always_include {forced} does not fit a vocabulary of {size} ids out of {vocab_size}"
        )
    # Stable sort by descending count keeps lower ids first among equal counts.
    ranking = torch.sort(counts, descending=True, stable=True).indices
    chosen = torch.zeros(vocab_size, dtype=torch.bool)
    chosen[forced] = True
    ranking = ranking[~chosen[ranking]]
    chosen[ranking[: size - len(forced)]] = True
    return chosen.nonzero().flatten()


def draft_target_ids(d2t: torch.Tensor) -> torch.LongTensor:
    """The target id of each reduced-head entry: ``i + d2t[i]`` (EAGLE-3's layout)."""
    return torch.arange(len(d2t), device=d2t.device) + d2t


def check_vocabulary_mapping(d2t: torch.Tensor, t2d: torch.Tensor, target_vocab_size: int) -> None:
    """Raise a `ValueError` unless ``d2t``/``t2d`` describe the same increasing subset of the target's ids."""
    if t2d.shape != (target_vocab_size,):
        raise ValueError(
            f"Draft vocabulary mapping t2d covers {tuple(t2d.shape)} target ids, but the target's vocabulary "
            f"has {target_vocab_size} tokens"
        )
    target_ids = draft_target_ids(d2t)
    if len(target_ids) and (target_ids.min() < 0 or target_ids.max() >= target_vocab_size):
        raise ValueError(
            f"Draft vocabulary mapping d2t maps to target ids {int(target_ids.min())}..{int(target_ids.max())}, "
            f"outside the target's vocabulary of {target_vocab_size} tokens"
        )
    if len(target_ids) > 1 and not bool((target_ids[1:] > target_ids[:-1]).all()):
        raise ValueError("Draft vocabulary mapping d2t is not strictly increasing (corrupted checkpoint)")
    if not torch.equal(t2d.nonzero().flatten().to(target_ids.device), target_ids):
        raise ValueError("Draft vocabulary mappings d2t and t2d disagree (corrupted checkpoint)")


def full_vocabulary_logits(
    draft_logits: torch.Tensor, d2t: torch.Tensor, target_vocab_size: int
) -> torch.Tensor:
    """Scatter ``(..., N)`` reduced-head logits into ``(..., V)`` target-vocabulary logits, ``-inf`` elsewhere.

    The draft distribution is then exactly zero outside the subset, so the speculative-sampling rule,
    the logits processors and transformers' candidate logits all see the target's vocabulary.
    """
    target_ids = draft_target_ids(d2t)
    full = draft_logits.new_full((*draft_logits.shape[:-1], target_vocab_size), float("-inf"))
    return full.index_copy_(-1, target_ids, draft_logits)


def frequent_draft_vocabulary(
    counts: torch.Tensor, size: int, tokenizer: PreTrainedTokenizerBase
) -> torch.LongTensor:
    """The ``size`` most frequent ids of ``counts``, always including the tokenizer's special tokens
    (EOS and the chat template's markers must stay draftable)."""
    special = {*tokenizer.all_special_ids, tokenizer.eos_token_id} - {None}
    return most_frequent_tokens(counts, size, always_include=sorted(special))


@torch.no_grad()
def reduce_draft_vocabulary(
    draft: ScyllaDraftModel,
    token_ids: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> ScyllaDraftModel:
    """Give an attached full-vocabulary ``draft`` its own LM head over ``token_ids`` (in place; returned).

    The new head is the rows of the target's LM head for those ids, so a trained draft keeps its
    predictions on the subset without retraining. ``tokenizer`` (the target's) records its fingerprint
    in the config, so loading the draft with another tokenizer is an error.
    """
    config = draft.config
    if config.draft_vocab_size is not None:
        raise ValueError(f"the draft already has a reduced vocabulary of {config.draft_vocab_size} tokens")
    if not draft.is_attached:
        raise ValueError("The draft has no LM head yet: call draft.attach_target(target) first")
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().sort().values
    t2d = torch.zeros(config.target_vocab_size, dtype=torch.bool)
    d2t = token_ids - torch.arange(len(token_ids))
    t2d[token_ids.clamp(0, config.target_vocab_size - 1)] = True
    check_vocabulary_mapping(d2t, t2d, config.target_vocab_size)
    if tokenizer is not None:
        fingerprint = tokenizer_fingerprint(tokenizer)
        if config.target_tokenizer_hash not in (None, fingerprint):
            raise ValueError(
                f"The draft was trained with tokenizer fingerprint {config.target_tokenizer_hash}, but the "
                f"vocabulary subset comes from a tokenizer with fingerprint {fingerprint}"
            )
        config.target_tokenizer_hash = fingerprint
    weight = draft.lm_head.weight
    head = nn.Linear(weight.shape[1], len(token_ids), bias=False, device=weight.device, dtype=weight.dtype)
    head.weight.copy_(weight[token_ids.to(weight.device)])
    draft.lm_head = head
    draft.register_buffer("d2t", d2t.to(weight.device))
    draft.register_buffer("t2d", t2d.to(weight.device))
    config.draft_vocab_size = len(token_ids)
    return draft


def full_vocabulary_draft(draft: ScyllaDraftModel, target) -> ScyllaDraftModel:
    """A copy of a reduced-head ``draft`` that reads out through the target's full LM head instead (the
    inverse of `reduce_draft_vocabulary`: its head rows are the target's), attached to ``target``."""
    from hf_scylla.modeling import ScyllaDraftModel

    if draft.config.draft_vocab_size is None:
        raise ValueError("the draft already reads out through the target's full vocabulary")
    config = type(draft.config).from_dict({**draft.config.to_dict(), "draft_vocab_size": None})
    full = ScyllaDraftModel(config)
    own = {"lm_head.weight", "d2t", "t2d", "embed_tokens.weight"}
    full.load_state_dict({k: v for k, v in draft.state_dict().items() if k not in own}, strict=False)
    full.attach_target(target)
    return full.to(device=draft.device, dtype=draft.dtype).eval()
