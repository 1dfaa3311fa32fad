"""Exact sequence laws and Pearson's chi-square test: the check that speculative sampling is lossless.

With a vocabulary of V tokens, the law of the first L new tokens has ``V**L`` cells; `exact_sequence_law`
computes it by enumerating every continuation, so samples drawn by any decoder can be compared with the
target's own law (`chi_square_p_value`). `draft_chain_logits` gives the law of a broken sampler that
keeps every draft token, which the same test must reject: that shows the test has power.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from hf_scylla.modeling import ScyllaDraftModel

__all__ = ["chi_square_p_value", "draft_chain_logits", "exact_sequence_law", "sequence_cell"]

NextLogits = Callable[[torch.Tensor], torch.Tensor]
"""``(N, S)`` token ids -> ``(N, V)`` logits of the next token."""


@torch.no_grad()
def exact_sequence_law(
    next_logits: NextLogits, prompt: torch.Tensor, length: int, vocab_size: int
) -> torch.Tensor:
    """P(x_1..x_length | prompt) for all ``vocab_size**length`` continuations, in lexicographic order."""
    probs = torch.ones(1)
    for step in range(length):
        continuations = torch.tensor(
            list(itertools.product(range(vocab_size), repeat=step)), dtype=torch.long
        ).view(vocab_size**step, step)
        inputs = torch.cat([prompt.expand(len(continuations), -1), continuations], dim=1)
        probs = (probs[:, None] * next_logits(inputs).float().softmax(dim=-1)).reshape(-1)
    return probs


def sequence_cell(sequence: torch.Tensor, prompt_length: int, length: int, vocab_size: int) -> int:
    """The lexicographic cell of the first ``length`` new tokens of a ``(1, S)`` sequence."""
    cell = 0
    for token in sequence[0, prompt_length : prompt_length + length].tolist():
        cell = cell * vocab_size + int(token)
    return cell


def chi_square_p_value(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of cell ``samples`` under ``probs``, pooling cells expected below 5."""
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    statistic = ((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum()
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), statistic / 2))


def draft_chain_logits(target: PreTrainedModel, draft: ScyllaDraftModel, prompt_length: int) -> NextLogits:
    """Next-token logits of a sampler that keeps every draft token: the target's for the first new token
    (it comes from the prefill), then the draft's chain on its own features."""

    @torch.no_grad()
    def next_logits(inputs: torch.Tensor) -> torch.Tensor:
        outputs = target(inputs[:, :prompt_length], output_hidden_states=True)
        if inputs.shape[1] == prompt_length:
            return outputs.logits[:, -1]
        features = draft.target_features(outputs.hidden_states)
        tokens = inputs[:, 1 : prompt_length + 1]
        for position in range(prompt_length + 1, inputs.shape[1]):
            out = draft(tokens, features)
            features = torch.cat([features, out.features[:, -1:]], dim=1)
            tokens = torch.cat([tokens, inputs[:, position : position + 1]], dim=1)
        return draft(tokens, features).logits[:, -1]

    return next_logits
