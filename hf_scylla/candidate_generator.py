"""`ScyllaCandidateGenerator`: drafts token chains with a Scylla head inside transformers' assisted decoding.

transformers 5.x hands a generator with ``requires_model_outputs = True`` the target's outputs of the
previous forward (prefill or verification). The generator feeds the draft the pairs
``(h_t, x_{t+1})`` whose target features are new, then drafts autoregressively on its own predicted
features, and crops its cache back to the target-feature prefix after every verification (EAGLE
recomputes the accepted positions with the target's true features).

With ``lookup_tokens`` set, a cycle whose last few tokens occurred earlier in the sequence proposes
what followed them (prompt lookup, `ngram_continuation`) instead of the draft's chain: repeats of the
prompt or of the answer itself are long runs a one-layer draft rarely predicts. Such a cycle returns
no candidate logits, so transformers verifies it by matching (greedy) or by sampling the target at
every position (exact: a fixed proposal is kept with the target's probability of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.utils import ModelOutput

from hf_common.compat import crop_cache
from hf_scylla.config import check_lookup
from hf_scylla.modeling import ScyllaDraftModel

__all__ = ["ScyllaCandidateGenerator", "ScyllaStats", "acceptance_length", "ngram_continuation"]


def acceptance_length(accepted: Sequence[int]) -> float:
    """The paper's tau from the draft tokens kept in each cycle: tokens gained per cycle, the target's
    bonus token included (``nan`` without cycles). Single and batched decoding both report this."""
    return sum(accepted) / len(accepted) + 1 if accepted else float("nan")


def ngram_continuation(
    tokens: torch.Tensor, num_tokens: int, min_ngram: int, max_ngram: int
) -> torch.Tensor | None:
    """Prompt lookup: the up to ``num_tokens`` tokens after the latest earlier occurrence of the last
    ``n`` tokens of the 1-D ``tokens``, trying ``n = max_ngram`` down to ``min_ngram``; ``None`` if no
    suffix of those lengths occurred before. Earlier occurrences may overlap the suffix (runs)."""
    length = tokens.shape[0]
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        earlier = tokens.unfold(0, n, 1)[:-1]  # every window but the suffix itself
        starts = (earlier == tokens[length - n :]).all(dim=1).nonzero()
        if starts.numel():
            follows = int(starts[-1]) + n
            return tokens[follows : follows + num_tokens]
    return None


@dataclass
class ScyllaStats:
    """Acceptance statistics of draft-verify cycles, for single and batched decoding alike.

    One ``drafted``/``accepted``/``rows``/``lookup`` entry per sequence and cycle (a batched cycle adds one
    entry per row still decoding, ``rows`` naming it; ``lookup`` marks cycles that proposed a prompt-lookup
    continuation instead of a draft chain; the prefill forward is not a cycle). ``tau`` is the paper's acceptance length: tokens gained
    per cycle and sequence, the target's bonus token included. ``target_forwards`` counts the target's
    forwards, prefill included, so ``tokens_per_target_forward`` is what a whole batch gained per forward.
    """

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    lookup: list[bool] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    target_forwards: int = 0

    def __post_init__(self) -> None:
        """Stats built from lists without ``lookup`` had no lookup cycles; the lists stay aligned."""
        self.lookup = self.lookup or [False] * len(self.drafted)
        if not len(self.drafted) == len(self.accepted) == len(self.rows) == len(self.lookup):
            raise ValueError("drafted, accepted, rows and lookup need one entry per cycle each")

    def record(self, drafted: int, accepted: int, row: int = 0, lookup: bool = False) -> None:
        self.drafted.append(drafted)
        self.accepted.append(accepted)
        self.rows.append(row)
        self.lookup.append(lookup)

    @property
    def accepted_by_row(self) -> list[list[int]]:
        """Per sequence of a batch, the draft tokens it kept in each of its cycles."""
        by_row: list[list[int]] = [[] for _ in range(max(self.rows, default=-1) + 1)]
        for row, accepted in zip(self.rows, self.accepted, strict=True):
            by_row[row].append(accepted)
        return by_row

    @property
    def cycles(self) -> int:
        return len(self.drafted)

    @property
    def tau(self) -> float:
        return acceptance_length(self.accepted)

    @property
    def acceptance_per_position(self) -> list[float]:
        """For draft position j (0-based): accepted / drafted over the cycles that drafted it."""
        rates = []
        for position in range(max(self.drafted, default=0)):
            reached = sum(d > position for d in self.drafted)
            kept = sum(a > position for a in self.accepted)
            rates.append(kept / reached)
        return rates

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else float("nan")

    def merge(self, other: ScyllaStats) -> None:
        """Add another run's cycles, tokens, forwards and time (for per-benchmark totals); its sequences
        are numbered after this run's."""
        first_row = max(self.rows, default=-1) + 1
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.rows += [first_row + row for row in other.rows]
        self.lookup += other.lookup
        self.new_tokens += other.new_tokens
        self.seconds += other.seconds
        self.target_forwards += other.target_forwards

    def to_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "tau": self.tau,
            "cycles": self.cycles,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "target_forwards": self.target_forwards,
            "tokens_per_target_forward": self.tokens_per_target_forward,
            "mean_drafted": sum(self.drafted) / self.cycles if self.cycles else float("nan"),
            "acceptance_per_position": self.acceptance_per_position,
            "lookup_cycles": sum(self.lookup),
        }


class ScyllaCandidateGenerator(CandidateGenerator):
    """Chain drafting from a Scylla head, with a fixed or confidence-adaptive draft length, and prompt
    lookup in its place where the sequence repeats itself (``lookup_tokens``).

    Args:
        draft: a `ScyllaDraftModel` attached to ``target``.
        target: the model being decoded (its config picks the hidden-state index).
        generation_config: the target's generation config (``do_sample``, ``max_length``).
        logits_processor: the target's processors and warpers, applied to draft logits too, so the
            candidate logits are the distribution the draft tokens were sampled from (lossless sampling).
        max_draft_tokens: chain length cap; defaults to ``draft.config.max_draft_tokens``.
        confidence_threshold: stop a chain after a token with draft probability below this;
            defaults to ``draft.config.confidence_threshold`` (0 drafts the full chain).
        lookup_tokens: prompt-lookup proposal length (0: off); defaults to ``draft.config.lookup_tokens``,
            with the config's n-gram range.
        stats: where acceptance is recorded; a new `ScyllaStats` by default.
    """

    requires_model_outputs = True

    def __init__(
        self,
        draft: ScyllaDraftModel,
        target: PreTrainedModel,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None = None,
        max_draft_tokens: int | None = None,
        confidence_threshold: float | None = None,
        lookup_tokens: int | None = None,
        stats: ScyllaStats | None = None,
    ):
        if not draft.is_attached:
            raise ValueError("The draft has no embedding/LM head yet: call draft.attach_target(target) first")
        self.draft = draft
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.max_draft_tokens = (
            draft.config.max_draft_tokens if max_draft_tokens is None else max_draft_tokens
        )
        self.confidence_threshold = (
            draft.config.confidence_threshold if confidence_threshold is None else confidence_threshold
        )
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {self.confidence_threshold}")
        self.lookup_tokens = draft.config.lookup_tokens if lookup_tokens is None else lookup_tokens
        self.lookup_ngrams = (draft.config.lookup_min_ngram, draft.config.lookup_max_ngram)
        check_lookup(self.lookup_tokens, *self.lookup_ngrams)
        self.stats = stats if stats is not None else ScyllaStats()
        self.model_kwargs_overrides = {"output_hidden_states": draft.feature_layers(target.config)}
        self.cache = draft.new_cache()
        self.synced_length = 0  # positions whose draft KV was computed from the target's true features
        self.last_drafted = 0
        self.last_was_lookup = False

    @torch.no_grad()
    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict | None = None,
        model_outputs: ModelOutput | None = None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Draft up to ``max_draft_tokens`` tokens after ``input_ids`` (or a prompt-lookup continuation,
        without logits); returns ``(ids, logits)``."""
        self.last_drafted, self.last_was_lookup = 0, False
        if is_first_iteration:  # the target prefills first; its features arrive with the next call
            self.cache = self.draft.new_cache()
            self.synced_length = 0
            return input_ids, None

        # The target has processed every token but the last: features h_0..h_{L-1} exist.
        processed = input_ids.shape[1] - 1
        new_features = self.draft.target_features(model_outputs.hidden_states)[
            :, : processed - self.synced_length
        ]
        out = self.draft(
            input_ids[:, self.synced_length + 1 :],
            new_features.to(self.draft.device),
            cache=self.cache,
            logits_to_keep=1,
        )
        self.synced_length = processed

        room = self.max_length - input_ids.shape[1] - 1
        continuation = None
        if self.lookup_tokens and room > 0:
            continuation = ngram_continuation(
                input_ids[0], min(self.lookup_tokens, room), *self.lookup_ngrams
            )
        if continuation is not None:
            self.last_drafted, self.last_was_lookup = continuation.shape[0], True
            return torch.cat([input_ids, continuation[None]], dim=-1), None

        budget = min(self.max_draft_tokens, room)
        sequence, chosen_logits = input_ids, []
        for step in range(budget):
            token, logits, confidence = self._choose_token(sequence, out.logits[:, -1])
            sequence = torch.cat([sequence, token], dim=-1)
            chosen_logits.append(logits)
            if step == budget - 1 or confidence < self.confidence_threshold:
                break
            out = self.draft(token, out.features[:, -1:], cache=self.cache, logits_to_keep=1)
        self.last_drafted = len(chosen_logits)
        if not chosen_logits:
            return input_ids, None
        return sequence, torch.stack(chosen_logits, dim=1)

    def _choose_token(
        self, sequence: torch.LongTensor, raw_logits: torch.Tensor
    ) -> tuple[torch.LongTensor, torch.Tensor, float]:
        """Next draft token under the target's processors: argmax, or a sample when ``do_sample``."""
        logits = self.logits_processor(sequence, raw_logits.float())
        probs = logits.softmax(dim=-1)
        if self.do_sample:
            token = torch.multinomial(probs, num_samples=1)
        else:
            token = probs.argmax(dim=-1, keepdim=True)
        return token, logits, float(probs.gather(-1, token))

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        """Record the cycle and drop the draft's KV for positions built on its own (unverified) features."""
        if self.last_drafted:
            self.stats.record(self.last_drafted, int(num_matches), lookup=self.last_was_lookup)
        crop_cache(self.cache, self.synced_length)
