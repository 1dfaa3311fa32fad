"""Reduced draft vocabulary: the subset head, its mapping on save/load, and lossless decoding with it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from scylla_models import make_draft, make_target, peaky_sampling_pair
from test_scylla_model import word_tokenizer

from hf_scylla import ScyllaDraftModel, ScyllaStats, generate, reference_speculative_decode
from hf_scylla.bench.verify_cost import clone_draft
from hf_scylla.distribution import chi_square_p_value, draft_chain_logits, exact_sequence_law, sequence_cell
from hf_scylla.vocab import count_tokens, full_vocabulary_draft, most_frequent_tokens, reduce_draft_vocabulary


def prompt(seed: int, length: int = 7, vocab_size: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def test_most_frequent_tokens_ranks_counts_and_keeps_forced_ids() -> None:
    counts = count_tokens([[5, 5, 5, 7, 7, 9], [9, 9, 9, 9, 1]], vocab_size=12)
    assert counts.tolist()[:10] == [0, 1, 0, 0, 0, 3, 0, 2, 0, 5]
    assert most_frequent_tokens(counts, 2).tolist() == [5, 9]
    # A forced id (EOS) takes the last place of the ranking; ties go to the lower id.
    assert most_frequent_tokens(counts, 3, always_include=[2]).tolist() == [2, 5, 9]
    assert most_frequent_tokens(counts, 5).tolist() == [0, 1, 5, 7, 9]
    with pytest.raises(ValueError, match="must be in"):
        most_frequent_tokens(counts, 13)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 12\)"):
        count_tokens([[12]], vocab_size=12)


def test_reduced_head_is_the_full_head_on_its_subset_and_zero_probability_elsewhere() -> None:
    target = make_target()
    draft = make_draft(target)
    tokens, features = prompt(0), torch.randn(1, 7, target.config.hidden_size)
    full = draft(tokens, features).logits
    subset = torch.tensor([2, 5, 17, 40, 99, 127])
    reduce_draft_vocabulary(draft, subset)
    assert draft.lm_head.weight.shape == (6, target.config.hidden_size)
    assert draft.lm_head is not target.lm_head
    reduced = draft(tokens, features).logits
    assert reduced.shape == full.shape
    torch.testing.assert_close(reduced[..., subset], full[..., subset])
    outside = torch.ones(128, dtype=torch.bool)
    outside[subset] = False
    assert torch.isinf(reduced[..., outside]).all()
    assert (reduced.softmax(-1)[..., outside] == 0).all()
    assert draft.t2d.nonzero().flatten().tolist() == subset.tolist()
    with pytest.raises(ValueError, match="already has a reduced vocabulary"):
        reduce_draft_vocabulary(draft, subset)
    with pytest.raises(ValueError, match="not strictly increasing"):
        reduce_draft_vocabulary(make_draft(target), torch.tensor([3, 3, 4]))


@pytest.mark.parametrize("size", [8, 64])
def test_greedy_with_reduced_vocabulary_equals_plain_greedy_and_reference(size: int) -> None:
    target = make_target(context_scale=0.3)
    draft = make_draft(target, oracle=True, oracle_context_scale=0.5)
    plain_outputs = [target.generate(prompt(seed), max_new_tokens=24, do_sample=False) for seed in range(3)]
    counts = count_tokens([output[0].tolist() for output in plain_outputs[:1]], 128)
    reduce_draft_vocabulary(draft, most_frequent_tokens(counts, size))
    for seed, plain in enumerate(plain_outputs):
        result = generate(target, draft, prompt(seed), max_new_tokens=24, do_sample=False)
        assert torch.equal(result.output, plain), f"prompt seed {seed}"
        sequence, cycles = reference_speculative_decode(target, draft, prompt(seed), max_new_tokens=24)
        assert torch.equal(sequence, plain)
        assert cycles == list(zip(result.stats.drafted, result.stats.accepted, strict=True))
    assert result.stats.tau > 1.0


def test_mapping_is_saved_and_checked_on_load(tmp_path) -> None:
    tokenizer = word_tokenizer([f"w{i}" for i in range(128)])
    target = make_target()
    draft = make_draft(target)
    reduce_draft_vocabulary(draft, torch.arange(0, 128, 3), tokenizer=tokenizer)
    draft.save_pretrained(tmp_path / "draft")
    saved = load_file(tmp_path / "draft" / "model.safetensors")
    assert {"d2t", "t2d"} <= set(saved)  # the head's rows are the target's: rebuilt on attach, not saved
    assert not {"lm_head.weight", "embed_tokens.weight"} & set(saved)
    loaded = ScyllaDraftModel.from_pretrained(tmp_path / "draft", target=target, target_tokenizer=tokenizer)
    assert loaded.config.draft_vocab_size == 43
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.lm_head.weight, draft.lm_head.weight)
    assert loaded.embed_tokens is target.get_input_embeddings()
    ids, features = prompt(1), torch.randn(1, 7, target.config.hidden_size)
    torch.testing.assert_close(loaded(ids, features).logits, draft(ids, features).logits)

    other_tokenizer = word_tokenizer([f"v{i}" for i in range(128)])
    with pytest.raises(ValueError, match="tokenizer fingerprint"):
        ScyllaDraftModel.from_pretrained(tmp_path / "draft", target=target, target_tokenizer=other_tokenizer)
    with pytest.raises(ValueError, match="vocab size 128, but this target has vocab size 256"):
        ScyllaDraftModel.from_pretrained(tmp_path / "draft", target=make_target(vocab_size=256))
    saved["d2t"] = saved["d2t"].flip(0)  # ids out of order: not a mapping save_pretrained writes
    save_file(saved, tmp_path / "draft" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="d2t"):
        ScyllaDraftModel.from_pretrained(tmp_path / "draft", target=target)


def test_speculative_sampling_with_reduced_vocabulary_keeps_the_target_distribution() -> None:
    """Vocabulary 4, draft head over 3 of them: the target's law of 3 new tokens, chi-square tested."""
    vocab, new_tokens, start = 4, 3, torch.tensor([[3, 1, 2, 0]])
    target, draft = peaky_sampling_pair(vocab)
    reduce_draft_vocabulary(draft, torch.tensor([0, 1, 3]))
    law = exact_sequence_law(lambda inputs: target(inputs).logits[:, -1], start, new_tokens, vocab)
    torch.manual_seed(4321)
    samples, stats = [], ScyllaStats()
    for _ in range(800):
        result = generate(target, draft, start, max_new_tokens=new_tokens + 1, do_sample=True, top_k=0)
        stats.merge(result.stats)
        samples.append(sequence_cell(result.output, start.shape[1], new_tokens, vocab))
    samples = torch.tensor(samples)
    assert 0.0 < sum(stats.accepted) / sum(stats.drafted) < 0.9
    assert chi_square_p_value(samples, law) > 1e-3
    broken = exact_sequence_law(draft_chain_logits(target, draft, start.shape[1]), start, new_tokens, vocab)
    assert chi_square_p_value(samples, broken) < 1e-6
    # Token 2 is outside the draft's subset, yet the target still emits it.
    assert any(2 in [cell // vocab**p % vocab for p in range(new_tokens)] for cell in samples.tolist())


def test_full_vocabulary_draft_undoes_the_reduction() -> None:
    target = make_target()
    draft = make_draft(target)
    ids, features = prompt(2), torch.randn(1, 7, target.config.hidden_size)
    expected = draft(ids, features).logits
    reduced = reduce_draft_vocabulary(clone_draft(draft, target), torch.arange(0, 128, 5))
    full = full_vocabulary_draft(reduced, target)
    assert full.config.draft_vocab_size is None and full.lm_head is target.get_output_embeddings()
    torch.testing.assert_close(full(ids, features).logits, expected)
    with pytest.raises(ValueError, match="already reads out through the target's full vocabulary"):
        full_vocabulary_draft(full, target)
