"""Batched greedy speculative decoding with a Scylla draft: the rows of a left-padded batch advance together.

transformers' assisted decoding verifies one sequence, but Scylla's third law concerns the decoding
batch size (the throughput-optimal draft length shrinks as the batch grows, arXiv 2505.07858
Thm 1.3). Each cycle here drafts a chain of ``draft_tokens`` for every row, verifies all rows in one
target forward, and keeps the longest prefix that *every* unfinished row matched, plus the target's
own token after it (each row's greedy token there). Rows stay aligned, so both KV caches stay
rectangular and a rejection is one ``crop``; the price is that a batch advances at its slowest row.
`BatchedStats` records both that uniform acceptance and each row's own match length.

Greedy only. The output is token for token that of ``target.generate(do_sample=False)`` on the same
left-padded batch, pads after EOS included (the test oracle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from hf_common.compat import cache_kwargs, crop_cache
from hf_scylla.generation import check_generation_inputs
from hf_scylla.modeling import ScyllaDraftModel

__all__ = ["BatchedOutput", "BatchedStats", "batched_generate"]


@dataclass
class BatchedStats:
    """Acceptance of batched draft-verify cycles (the prefill forward is not a cycle).

    ``tau`` is what the batch gained per cycle and row (uniform acceptance + the target's token);
    ``row_tau`` is what the rows alone would have gained (their own match lengths + 1), so
    ``row_tau - tau`` is the cost of advancing together.
    """

    batch_size: int
    draft_tokens: int
    accepted: list[int] = field(default_factory=list)
    row_matches: list[int] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    target_forwards: int = 0

    @property
    def cycles(self) -> int:
        return len(self.accepted)

    @property
    def tau(self) -> float:
        return (sum(self.accepted) + self.cycles) / self.cycles if self.cycles else float("nan")

    @property
    def row_tau(self) -> float:
        return sum(self.row_matches) / len(self.row_matches) + 1 if self.row_matches else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def merge(self, other: BatchedStats) -> None:
        """Add another batch's cycles, tokens, forwards and time (for totals over many batches)."""
        self.accepted += other.accepted
        self.row_matches += other.row_matches
        self.new_tokens += other.new_tokens
        self.seconds += other.seconds
        self.target_forwards += other.target_forwards

    def to_dict(self) -> dict[str, float | int]:
        return {
            "batch_size": self.batch_size,
            "draft_tokens": self.draft_tokens,
            "tau": self.tau,
            "row_tau": self.row_tau,
            "cycles": self.cycles,
            "target_forwards": self.target_forwards,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class BatchedOutput:
    """``(B, prompt + new)`` sequences, padded after EOS like ``generate``, and the cycle statistics."""

    sequences: torch.LongTensor
    stats: BatchedStats


def _positions(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Token positions of a left-padded batch, as ``generate`` derives them (pads get position 1)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _eos_ids(target: PreTrainedModel, eos_token_id: int | list[int] | None) -> torch.Tensor:
    ids = target.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return torch.tensor(ids, dtype=torch.long, device=target.device)


class _DraftState:
    """The draft's KV cache, synced to the target's true features, and the pairs still to feed it."""

    def __init__(self, draft: ScyllaDraftModel, tokens, features, positions, mask):
        self.draft, self.cache = draft, draft.new_cache()
        self.pending = (tokens, features, positions)  # pairs (x_{t+1}, h_t, t) not yet in the cache
        self.mask = mask  # over the cache plus the pending pairs

    def add_pairs(self, tokens, features, positions, mask) -> None:
        self.pending = (tokens, features, positions)
        self.mask = mask

    def draft_chain(self, length: int) -> torch.LongTensor:
        """Sync the pending pairs, draft ``length`` greedy tokens per row, then forget the drafted KV."""
        tokens, features, positions = self.pending
        out = self.draft(
            tokens,
            features,
            position_ids=positions,
            cache=self.cache,
            attention_mask=self.mask,
            logits_to_keep=1,
        )
        synced, mask, position = self.cache.get_seq_length(), self.mask, positions[:, -1:]
        drafted = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(length - 1):
            mask, position = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1), position + 1
            out = self.draft(
                drafted[-1],
                out.features[:, -1:],
                position_ids=position,
                cache=self.cache,
                attention_mask=mask,
                logits_to_keep=1,
            )
            drafted.append(out.logits[:, -1].argmax(-1, keepdim=True))
        crop_cache(self.cache, synced)
        return torch.cat(drafted, dim=1)


@torch.no_grad()
def batched_generate(
    target: PreTrainedModel,
    draft: ScyllaDraftModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    draft_tokens: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> BatchedOutput:
    """Greedy speculative decoding of a left-padded batch; rows advance by their common accepted prefix.

    Args:
        target, draft: the target and a Scylla draft attached to it.
        input_ids, attention_mask: ``(B, S)`` left-padded prompts and their mask (default: no padding).
        max_new_tokens: tokens to generate per row (fewer where every row has stopped at EOS).
        draft_tokens: chain length per cycle; defaults to ``draft.config.max_draft_tokens``.
        eos_token_id, pad_token_id: default to the target's generation config; rows that emitted EOS
            are filled with ``pad_token_id``, as ``generate`` does.
    """
    if not draft.is_attached:
        raise ValueError("The draft has no embedding/LM head yet: call draft.attach_target(target) first")
    draft_tokens = draft.config.max_draft_tokens if draft_tokens is None else draft_tokens
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_generation_inputs(target, input_ids, input_ids.shape[-1] + max_new_tokens, max_batch_size=None)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
        )
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("batched_generate needs left padding: the last column of attention_mask must be 1")
    eos_ids = _eos_ids(target, eos_token_id)
    pad_token_id = target.generation_config.pad_token_id if pad_token_id is None else pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos_ids[0]) if len(eos_ids) else 0
    layer = draft.config.target_hidden_layer % (target.config.get_text_config().num_hidden_layers + 1)
    stats = BatchedStats(batch_size=input_ids.shape[0], draft_tokens=draft_tokens)
    start = time.perf_counter()

    cache = DynamicCache(config=target.config)
    mask, positions = attention_mask, _positions(attention_mask)
    out = target(
        input_ids,
        attention_mask=mask,
        position_ids=positions,
        output_hidden_states=True,
        **cache_kwargs(cache),
    )
    stats.target_forwards += 1
    next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)
    finished = torch.isin(next_tokens[:, 0], eos_ids)
    lengths = torch.ones_like(finished, dtype=torch.long)  # new tokens per row, EOS included
    sequences = torch.cat([input_ids, next_tokens], dim=1)
    features = out.hidden_states[layer].masked_fill(mask[..., None] == 0, 0.0)  # pads' features are junk
    state = _DraftState(draft, sequences[:, 1:], features, positions, mask)

    while sequences.shape[1] - input_ids.shape[1] < max_new_tokens and not bool(finished.all()):
        room = max_new_tokens - (sequences.shape[1] - input_ids.shape[1])
        length = min(draft_tokens, room - 1)
        drafted = state.draft_chain(length) if length else sequences.new_empty(sequences.shape[0], 0)
        candidates = torch.cat([sequences[:, -1:], drafted], dim=1)
        verify_mask = torch.cat([mask, mask.new_ones(candidates.shape)], dim=1)
        verify_positions = positions[:, -1:] + torch.arange(1, candidates.shape[1] + 1, device=mask.device)
        out = target(
            candidates,
            attention_mask=verify_mask,
            position_ids=verify_positions,
            output_hidden_states=True,
            **cache_kwargs(cache),
        )
        stats.target_forwards += 1
        greedy = out.logits.argmax(-1)
        matches = (drafted == greedy[:, :length]).long().cumprod(dim=1).sum(dim=1)
        accepted = int(matches[~finished].min())
        if length:
            stats.accepted.append(accepted)
            stats.row_matches += matches[~finished].tolist()
        new_tokens = torch.cat([drafted[:, :accepted], greedy[:, accepted : accepted + 1]], dim=1)
        new_tokens = new_tokens.masked_fill(finished[:, None], pad_token_id)
        is_eos = torch.isin(new_tokens, eos_ids) & ~finished[:, None]
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        new_tokens = new_tokens.masked_fill(after_eos, pad_token_id)
        lengths += torch.where(
            finished, 0, torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, accepted + 1)
        )
        finished = finished | is_eos.any(dim=1)
        sequences = torch.cat([sequences, new_tokens], dim=1)

        kept = mask.shape[1] + accepted + 1  # the last accepted token and the drafts before it
        crop_cache(cache, kept)
        mask, positions = verify_mask[:, :kept], verify_positions[:, : accepted + 1]
        state.add_pairs(new_tokens, out.hidden_states[layer][:, : accepted + 1], positions, mask)

    if bool(finished.all()):  # like generate: stop at the step where the last row emitted EOS
        sequences = sequences[:, : input_ids.shape[1] + int(lengths.max())]
    stats.new_tokens = int(lengths.sum())
    stats.seconds = time.perf_counter() - start
    return BatchedOutput(sequences=sequences, stats=stats)
