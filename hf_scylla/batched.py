"""Batched greedy speculative decoding with a Scylla draft: every row of a left-padded batch keeps its own accepted tokens.

transformers' assisted decoding verifies one sequence, but Scylla's third law concerns the decoding
batch size (the throughput-optimal draft length shrinks as the batch grows, arXiv 2505.07858
Thm 1.3). Each cycle here drafts a chain of ``draft_tokens`` for every row and verifies all rows in
one target forward; row i keeps its own ``a_i`` matching tokens plus the target's token after them.
Both KV caches stay rectangular: a cycle appends ``max_i a_i + 1`` columns and masks out, per row,
the columns it rejected (holes), with per-row position ids, so attention sees exactly each row's
accepted sequence. The draft's new pairs are right-aligned in their block so every row's last pair
sits in the last column, where the next chain starts.

Greedy only. The output is token for token that of ``target.generate(do_sample=False)`` on the same
left-padded batch, pads after EOS included (the test oracle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from hf_common.compat import cache_kwargs, crop_cache
from hf_scylla.candidate_generator import ScyllaStats
from hf_scylla.generation import check_generation_inputs
from hf_scylla.modeling import ScyllaDraftModel

__all__ = ["BatchedOutput", "batched_generate"]


@dataclass
class BatchedOutput:
    """``(B, prompt + new)`` sequences, padded after EOS like ``generate``, and the cycle statistics."""

    sequences: torch.LongTensor
    stats: ScyllaStats


def _positions(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Token positions of a left-padded batch, as ``generate`` derives them (pads get position 1)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _eos_ids(target: PreTrainedModel, eos_token_id: int | list[int] | None) -> torch.Tensor:
    ids = target.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return torch.tensor(ids, dtype=torch.long, device=target.device)


class _DraftState:
    """The draft's KV cache, synced to the target's true features, and the block of pairs to feed it next.

    A block holds pairs ``(x_{t+1}, h_t)`` at positions t, right-aligned per row (every row's newest
    pair in the last column); ``block_mask`` marks the real pairs, ``mask`` covers the cache.
    """

    def __init__(self, draft: ScyllaDraftModel, tokens, features, positions, block_mask):
        self.draft, self.cache = draft, draft.new_cache()
        self.mask = block_mask[:, :0]
        self.block = (tokens, features, positions, block_mask)  # replaced after every verification

    def draft_chain(self, length: int) -> torch.LongTensor:
        """Sync the pending block, draft ``length`` greedy tokens per row, then forget the drafted KV."""
        tokens, features, positions, block_mask = self.block
        self.mask = torch.cat([self.mask, block_mask], dim=1)
        synced, mask, position = self.cache.get_seq_length() + tokens.shape[1], self.mask, positions[:, -1:]
        out = self.draft(
            tokens, features, position_ids=positions, cache=self.cache, attention_mask=mask, logits_to_keep=1
        )
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


def _check_sliding_window(target: PreTrainedModel, columns: int) -> None:
    """Refuse a sliding-window target whose cache would outgrow its window.

    The loop crops the target's cache by column after every verification; a sliding-window layer keeps
    only its last ``window`` columns, so past the window that crop (and the rows' holes) no longer
    line up. Within the window a sliding layer is a full one, so shorter runs are served as usual.
    """
    text_config = target.config.get_text_config()
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return
    if columns > window:
        raise ValueError(
            f"batched_generate does not support a sliding-window target past its window: the cache would "
            f"reach {columns} columns (padded prompt + max_new_tokens + draft_tokens) but the target's "
            f"sliding_window is {window}; lower max_new_tokens, or decode row by row with "
            "hf_scylla.generate (transformers' assisted decoding handles sliding windows)"
        )


def _right_aligned(kept: torch.LongTensor, width: int) -> tuple[torch.LongTensor, torch.Tensor]:
    """Per row, the source column of each of ``width`` block columns when row i's ``kept[i] + 1``
    entries end at the last column; and the mask of real (not hole) columns."""
    source = torch.arange(width, device=kept.device) - (width - 1 - kept)[:, None]
    return source.clamp(min=0), source >= 0


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
    """Greedy speculative decoding of a left-padded batch; each row keeps its own accepted drafts.

    Chains from the draft only: the draft config's prompt lookup (``lookup_tokens``) serves batch-1
    decoding (`hf_scylla.generate`) and is not used here.

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
    _check_sliding_window(target, input_ids.shape[-1] + max_new_tokens + draft_tokens)
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
    batch_size = input_ids.shape[0]
    stats = ScyllaStats()
    start = time.perf_counter()

    cache = DynamicCache(config=target.config)

    def target_forward(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        stats.target_forwards += 1
        return target(
            tokens,
            attention_mask=mask,
            position_ids=positions,
            output_hidden_states=draft.feature_layers(target.config),
            **cache_kwargs(cache),
        )

    mask, positions = attention_mask, _positions(attention_mask)
    out = target_forward(input_ids, mask, positions)
    last_tokens = out.logits[:, -1:].argmax(-1)  # (B, 1): each row's newest token, not yet processed
    last_positions = positions[:, -1]
    # One spare column receives the writes of rows that keep fewer tokens than the block is wide.
    generated = input_ids.new_full((batch_size, max_new_tokens + 1), pad_token_id)
    generated[:, 0] = last_tokens[:, 0]
    lengths = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
    finished = torch.isin(last_tokens[:, 0], eos_ids) | (lengths == max_new_tokens)
    features = draft.target_features(out.hidden_states).masked_fill(
        mask[..., None] == 0, 0.0
    )  # pads' features are junk
    state = _DraftState(draft, torch.cat([input_ids[:, 1:], last_tokens], dim=1), features, positions, mask)

    while not bool(finished.all()):
        room = int((max_new_tokens - lengths)[~finished].max())
        length = min(draft_tokens, room - 1)
        drafted = state.draft_chain(length) if length else input_ids.new_empty(batch_size, 0)
        candidates = torch.cat([last_tokens, drafted], dim=1)
        offsets = torch.arange(1, length + 2, device=mask.device)
        verify_mask = torch.cat([mask, mask.new_ones(candidates.shape)], dim=1)
        verify_positions = last_positions[:, None] + offsets
        out = target_forward(candidates, verify_mask, verify_positions)
        greedy = out.logits.argmax(-1)  # (B, length + 1); equals the drafts wherever they were accepted
        matched = (drafted == greedy[:, :length]).long().cumprod(dim=1).sum(dim=1)
        is_eos = torch.isin(greedy, eos_ids)
        first_eos = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), length + 1)
        kept = torch.minimum(torch.minimum(matched, first_eos), max_new_tokens - lengths - 1)
        kept = kept.masked_fill(finished, 0)
        if length:
            drafting = ~finished & (lengths < max_new_tokens - 1)  # a row with one token left drafts nothing
            for row in drafting.nonzero()[:, 0].tolist():
                stats.record(length, int(kept[row]), row)

        columns = lengths[:, None] + offsets - 1
        writes = (offsets - 1 <= kept[:, None]) & ~finished[:, None]
        generated.scatter_(1, columns.masked_fill(~writes, max_new_tokens), greedy)
        new_last = greedy.gather(1, kept[:, None])
        lengths += torch.where(finished, 0, kept + 1)
        finished = (
            finished | (torch.isin(new_last[:, 0], eos_ids) & writes[:, 0]) | (lengths == max_new_tokens)
        )

        width = int(kept.max()) + 1
        crop_cache(cache, mask.shape[1] + width)
        block_valid = offsets[:width] - 1 <= kept[:, None]
        mask = torch.cat([mask, block_valid.to(mask.dtype)], dim=1)
        source, block_mask = _right_aligned(kept, width)
        hidden = draft.target_features(out.hidden_states)
        pair_features = hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[-1]))
        state.block = (
            greedy.gather(1, source),
            pair_features,
            verify_positions.gather(1, source),
            block_mask,
        )
        last_tokens = new_last.masked_fill(finished[:, None], pad_token_id)
        last_positions = last_positions + kept + 1

    sequences = torch.cat([input_ids, generated[:, : int(lengths.max())]], dim=1)
    stats.new_tokens = int(lengths.sum())
    stats.seconds = time.perf_counter() - start
    return BatchedOutput(sequences=sequences, stats=stats)
