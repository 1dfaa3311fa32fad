"""The batched loop equals plain batched greedy (pads after EOS included), and each row decodes as if alone."""

from __future__ import annotations

import pytest
import torch
from scylla_models import make_draft, make_target

from hf_scylla import ScyllaStats, batched_generate, reference_speculative_decode


def left_padded(lengths: tuple[int, ...], vocab_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with token 0 (the tiny target's pad)."""
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        generator = torch.Generator().manual_seed(row)
        input_ids[row, width - length :] = torch.randint(3, vocab_size, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


DRAFTS = [
    pytest.param(1.0, False, 1.0, 1, id="random-draft-D1"),
    pytest.param(0.3, True, 1.0, 2, id="oracle-draft-D2"),
    pytest.param(0.5, True, 0.5, 3, id="oracle-draft-D3"),
]


@pytest.mark.parametrize(("context_scale", "oracle", "draft_context_scale", "depth"), DRAFTS)
@pytest.mark.parametrize("draft_tokens", [1, 4])
def test_batched_equals_plain_batched_greedy(context_scale, oracle, draft_context_scale, depth, draft_tokens):
    target = make_target(context_scale=context_scale)
    draft = make_draft(target, depth=depth, oracle=oracle, oracle_context_scale=draft_context_scale)
    input_ids, attention_mask = left_padded((7, 3, 11))
    plain = target.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, do_sample=False)
    result = batched_generate(
        target, draft, input_ids, attention_mask, max_new_tokens=32, draft_tokens=draft_tokens
    )
    assert torch.equal(result.sequences, plain)
    assert result.stats.new_tokens == 3 * 32
    # the prefill, one forward per batched cycle, and at most one with no room left to draft (not a cycle)
    steps = max(len(row) for row in result.stats.accepted_by_row)
    assert steps + 1 <= result.stats.target_forwards <= steps + 2
    assert len(result.stats.accepted_by_row) == 3
    assert 1.0 <= result.stats.tau <= draft_tokens + 1


@pytest.mark.parametrize(("context_scale", "oracle", "draft_context_scale", "depth"), DRAFTS)
def test_each_row_has_the_reference_cycles(context_scale, oracle, draft_context_scale, depth):
    """Alone or in a padded batch, a row keeps per cycle what the cache-free reference keeps.

    Rows in a batch accept different counts, so their caches get holes; a wrong mask or position there
    changes later drafts (the oracle drafts read their KV cache) and the cycle lists differ.
    """
    target = make_target(context_scale=context_scale)
    draft = make_draft(
        target, depth=depth, oracle=oracle, oracle_context_scale=draft_context_scale, confidence_threshold=0.0
    )
    input_ids, attention_mask = left_padded((9, 4, 13))
    expected = []
    for row in range(input_ids.shape[0]):
        prompt = input_ids[row : row + 1, attention_mask[row].bool()]
        sequence, cycles = reference_speculative_decode(target, draft, prompt, max_new_tokens=32)
        alone = batched_generate(
            target, draft, prompt, max_new_tokens=32, draft_tokens=draft.config.max_draft_tokens
        )
        assert torch.equal(alone.sequences, sequence)
        assert alone.stats.accepted == [accepted for _, accepted in cycles]
        expected.append([accepted for _, accepted in cycles])
    batch = batched_generate(
        target,
        draft,
        input_ids,
        attention_mask,
        max_new_tokens=32,
        draft_tokens=draft.config.max_draft_tokens,
    )
    assert batch.stats.accepted_by_row == expected


def test_rows_stop_at_eos_and_are_padded_like_generate() -> None:
    target = make_target(context_scale=0.3)
    draft = make_draft(target, oracle=True)
    input_ids, attention_mask = left_padded((6, 9))
    plain = target.generate(input_ids, attention_mask=attention_mask, max_new_tokens=40, do_sample=False)
    eos = int(plain[0, input_ids.shape[1] + 4])  # row 0 emits it early; row 1 maybe later or never
    kwargs = dict(max_new_tokens=40, eos_token_id=eos, pad_token_id=0)
    expected = target.generate(input_ids, attention_mask=attention_mask, do_sample=False, **kwargs)
    result = batched_generate(target, draft, input_ids, attention_mask, draft_tokens=4, **kwargs)
    assert torch.equal(result.sequences, expected)
    generated = expected[:, input_ids.shape[1] :]
    real = sum(int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else len(row) for row in generated)
    assert result.stats.new_tokens == real


def test_stats_merge_and_dict() -> None:
    """Two rows over two cycles, then a batch of two rows over one cycle: six (row, cycle) entries."""
    first = ScyllaStats([3] * 4, [3, 2, 1, 2], [0, 1, 0, 1], new_tokens=12, seconds=1.0, target_forwards=3)
    first.merge(ScyllaStats([3, 3], [0, 0], [0, 1], new_tokens=2, seconds=1.0, target_forwards=2))
    assert first.cycles == 6 and first.tau == pytest.approx(8 / 6 + 1)
    assert first.accepted_by_row == [[3, 1], [2, 2], [0], [0]]
    assert first.to_dict()["tokens_per_second"] == pytest.approx(7.0)
    assert first.tokens_per_target_forward == pytest.approx(14 / 5)


def test_bad_inputs_are_clear_errors() -> None:
    target = make_target(max_position_embeddings=32)
    draft = make_draft(target)
    input_ids, attention_mask = left_padded((5, 8))
    with pytest.raises(ValueError, match="draft_tokens must be >= 1"):
        batched_generate(target, draft, input_ids, attention_mask, max_new_tokens=4, draft_tokens=0)
    with pytest.raises(ValueError, match="exceeds the target's context of 32"):
        batched_generate(target, draft, input_ids, attention_mask, max_new_tokens=30)
    with pytest.raises(ValueError, match="needs left padding"):
        batched_generate(target, draft, input_ids, attention_mask.flip(1), max_new_tokens=4)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        batched_generate(target, draft, input_ids, attention_mask[:, 1:], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"must be \(batch, length\)"):
        batched_generate(target, draft, input_ids[0], max_new_tokens=4)
    unattached = make_draft(target)
    unattached.is_attached = False
    with pytest.raises(ValueError, match="attach_target"):
        batched_generate(target, unattached, input_ids, attention_mask, max_new_tokens=4)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_target_within_its_window_equals_plain_greedy(family: str) -> None:
    """Issue 16 item 19: a sliding-window target is served while the cache stays inside the window..."""
    overrides = {"use_sliding_window": True, "max_window_layers": 0} if family == "qwen2" else {}
    target = make_target(context_scale=0.3, family=family, sliding_window=64, **overrides)
    draft = make_draft(target, oracle=True)
    input_ids, attention_mask = left_padded((7, 3, 11))
    plain = target.generate(input_ids, attention_mask=attention_mask, max_new_tokens=24, do_sample=False)
    result = batched_generate(target, draft, input_ids, attention_mask, max_new_tokens=24, draft_tokens=4)
    assert torch.equal(result.sequences, plain)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_target_past_its_window_is_refused_up_front(family: str) -> None:
    """...and refused before any forward when it would outgrow it (it used to fail mid-decode)."""
    overrides = {"use_sliding_window": True, "max_window_layers": 0} if family == "qwen2" else {}
    target = make_target(family=family, sliding_window=16, **overrides)
    draft = make_draft(target)
    input_ids, attention_mask = left_padded((7, 3, 11))
    calls = []
    target.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="sliding_window is 16"):
        batched_generate(target, draft, input_ids, attention_mask, max_new_tokens=32, draft_tokens=4)
    assert calls == []
