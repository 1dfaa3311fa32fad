"""Plain-PyTorch speculative decoding with a Scylla draft: the spec the fast path is tested against.

No KV caches anywhere: every cycle runs the target over the whole sequence plus the candidates, and
the draft over every ``(h_t, x_{t+1})`` pair again for each drafted token. Batch size 1, float math,
temperature as the only warper. Acceptance follows Leviathan et al. 2023, Algorithm 1. With
``config.lookup_tokens``, a cycle whose suffix repeats proposes what followed it instead
(`lookup_continuation`), as a point-mass draft distribution: the same rule then keeps a proposed token
with the target's probability of it.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from hf_scylla.modeling import ScyllaDraftModel

__all__ = ["lookup_continuation", "reference_speculative_decode"]


def lookup_continuation(
    tokens: list[int], num_tokens: int, min_ngram: int, max_ngram: int
) -> list[int] | None:
    """Prompt lookup by its definition: for ``n = max_ngram`` down to ``min_ngram``, the latest earlier
    start of the last ``n`` tokens, and the up to ``num_tokens`` tokens after it (``None``: no repeat)."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= len(tokens):
            continue
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + num_tokens]
    return None


def _distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits.float() / temperature).softmax(dim=-1)


def _draft_chain(
    draft: ScyllaDraftModel,
    sequence: torch.Tensor,
    features: torch.Tensor,
    budget: int,
    do_sample: bool,
    temperature: float,
    confidence_threshold: float,
    rng: torch.Generator | None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Draft up to ``budget`` tokens from the target features ``h_0..h_{L-1}`` of ``sequence[:L+1]``."""
    tokens, features_in, drafted, distributions = sequence[:, 1:], features, [], []
    for _ in range(budget):
        out = draft(tokens, features_in)
        q = _distribution(out.logits[0, -1], temperature)
        token = int(torch.multinomial(q, 1, generator=rng)) if do_sample else int(q.argmax())
        drafted.append(token)
        distributions.append(q)
        if float(q[token]) < confidence_threshold:
            break
        tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        features_in = torch.cat([features_in, out.features[:, -1:]], dim=1)
    return drafted, distributions


@torch.no_grad()
def reference_speculative_decode(
    target: PreTrainedModel,
    draft: ScyllaDraftModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    rng: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Decode ``max_new_tokens`` tokens; returns the sequence and ``(drafted, accepted)`` per cycle.

    Draft length and confidence threshold come from ``draft.config``, as in the fast path.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"the reference loop decodes one sequence, got batch size {input_ids.shape[0]}")
    config = draft.config
    max_length = input_ids.shape[1] + max_new_tokens
    sequence, cycles = input_ids.cpu(), []
    outputs = target(sequence, output_hidden_states=True)
    p = _distribution(outputs.logits[0, -1], temperature)
    first = int(torch.multinomial(p, 1, generator=rng)) if do_sample else int(p.argmax())
    sequence = torch.cat([sequence, torch.tensor([[first]])], dim=1)
    features = draft.target_features(outputs.hidden_states)
    while sequence.shape[1] < max_length and not (
        eos_token_id is not None and sequence[0, -1] == eos_token_id
    ):
        room = max_length - sequence.shape[1] - 1
        looked_up = None
        if config.lookup_tokens and room > 0:
            looked_up = lookup_continuation(
                sequence[0].tolist(),
                min(config.lookup_tokens, room),
                config.lookup_min_ngram,
                config.lookup_max_ngram,
            )
        if looked_up is not None:
            drafted = looked_up
            q = [torch.nn.functional.one_hot(torch.tensor(token), p.shape[-1]).float() for token in drafted]
        else:
            drafted, q = _draft_chain(
                draft,
                sequence,
                features,
                min(config.max_draft_tokens, room),
                do_sample,
                temperature,
                config.confidence_threshold,
                rng,
            )
        candidates = torch.cat([sequence, torch.tensor([drafted], dtype=sequence.dtype)], dim=1)
        outputs = target(candidates, output_hidden_states=True)
        p = _distribution(outputs.logits[0, sequence.shape[1] - 1 :], temperature)
        accepted, extra = len(drafted), None
        for index, token in enumerate(drafted):
            if do_sample:
                ratio = p[index, token] / q[index][token]
                if float(torch.rand((), generator=rng)) <= float(ratio):
                    continue
                residual = (p[index] - q[index]).clamp(min=0)
                extra = int(torch.multinomial(residual / residual.sum(), 1, generator=rng))
            elif token == int(p[index].argmax()):
                continue
            else:
                extra = int(p[index].argmax())
            accepted = index
            break
        if extra is None:  # every draft token kept: the bonus token comes from the target's last position
            extra = int(torch.multinomial(p[-1], 1, generator=rng)) if do_sample else int(p[-1].argmax())
        new_tokens = [*drafted[:accepted], extra][: max_length - sequence.shape[1]]
        if eos_token_id is not None and eos_token_id in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(eos_token_id) + 1]
        if drafted:  # a forward with nothing drafted (no room left) is plain decoding, not a cycle
            cycles.append((len(drafted), len(new_tokens) - 1))
        features = draft.target_features(outputs.hidden_states)[:, : sequence.shape[1] + len(new_tokens) - 1]
        sequence = torch.cat([sequence, torch.tensor([new_tokens], dtype=sequence.dtype)], dim=1)
    return sequence, cycles
