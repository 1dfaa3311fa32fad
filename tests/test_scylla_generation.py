"""Scylla decoding is lossless: greedy equals plain greedy, sampling keeps the target's distribution."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script
from scylla_models import make_draft, make_target

from hf_scylla import (
    CUSTOM_GENERATE_DIR,
    ScyllaStats,
    TreeConfig,
    generate,
    reference_speculative_decode,
    scylla_generate,
)
from hf_scylla.distribution import chi_square_p_value, draft_chain_logits, exact_sequence_law, sequence_cell

PROMPT_SEEDS = (0, 1, 2)


def random_prompt(seed: int, length: int = 7, vocab_size: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, length), generator=generator)


@pytest.mark.parametrize(
    ("context_scale", "oracle", "draft_context_scale", "depth", "threshold", "lookup"),
    [
        pytest.param(1.0, False, 1.0, 1, 0.0, 0, id="random-draft-D1"),
        pytest.param(0.3, True, 1.0, 2, 0.0, 0, id="oracle-draft-D2"),
        pytest.param(0.5, True, 0.5, 3, 0.0, 0, id="oracle-draft-D3"),
        pytest.param(0.3, True, 1.0, 2, 0.5, 0, id="oracle-draft-D2-adaptive"),
        pytest.param(0.5, True, 0.5, 2, 0.0, 3, id="oracle-draft-D2-prompt-lookup"),
    ],
)
def test_greedy_equals_plain_greedy_and_reference(
    context_scale, oracle, draft_context_scale, depth, threshold, lookup
):
    """Same tokens as plain greedy, and the same (drafted, accepted) per cycle as the cache-free reference.

    The oracle drafts keep part of their attention output, so a draft KV cache left uncropped after a
    rejection (or after a prompt-lookup cycle) changes their guesses and the per-cycle comparison fails.
    """
    target = make_target(context_scale=context_scale)
    draft = make_draft(
        target,
        depth=depth,
        oracle=oracle,
        oracle_context_scale=draft_context_scale,
        confidence_threshold=threshold,
        lookup_tokens=lookup,
    )
    lookup_cycles = 0
    for seed in PROMPT_SEEDS:
        prompt = random_prompt(seed)
        plain = target.generate(prompt, max_new_tokens=32, do_sample=False)
        result = generate(target, draft, prompt, max_new_tokens=32, do_sample=False)
        assert torch.equal(result.output, plain), f"prompt seed {seed}"
        sequence, cycles = reference_speculative_decode(target, draft, prompt, max_new_tokens=32)
        assert torch.equal(sequence, plain), f"prompt seed {seed}"
        assert cycles == list(zip(result.stats.drafted, result.stats.accepted, strict=True))
        assert result.stats.new_tokens == 32
        lookup_cycles += sum(result.stats.lookup)
    assert (lookup_cycles > 0) == bool(lookup)


def test_oracle_draft_is_accepted_and_adaptive_length_drafts_less() -> None:
    """The statistics see acceptance: an oracle draft on a near-bigram target keeps long chains."""
    target = make_target(context_scale=0.05)
    fixed = generate(target, make_draft(target, oracle=True), random_prompt(0), max_new_tokens=40).stats
    assert fixed.tau > 4.0
    assert all(rate > 0.8 for rate in fixed.acceptance_per_position)
    noisy_target = make_target(context_scale=0.5)
    adaptive_draft = make_draft(noisy_target, oracle=True, confidence_threshold=0.9)
    adaptive = generate(noisy_target, adaptive_draft, random_prompt(0), max_new_tokens=40).stats
    assert sum(adaptive.drafted) / adaptive.cycles < adaptive_draft.config.max_draft_tokens
    short = generate(
        noisy_target, adaptive_draft, random_prompt(0), max_new_tokens=40, max_draft_tokens=2
    ).stats
    assert max(short.drafted) <= 2


@pytest.mark.parametrize(
    "custom_generate", [scylla_generate, CUSTOM_GENERATE_DIR], ids=["callable", "folder"]
)
def test_custom_generate_entry_points_and_eos(custom_generate) -> None:
    """``generate(custom_generate=..., draft_model=...)`` as a callable or as the ``custom_generate/`` folder
    gives plain greedy's tokens and scores, and stops at EOS like it."""
    target = make_target(context_scale=0.3)
    draft = make_draft(target, oracle=True)
    prompt = random_prompt(1)
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    eos = int(plain[0, prompt.shape[1] + 5])  # a token greedy decoding emits: generation must stop there
    stats = ScyllaStats()
    output = target.generate(
        prompt,
        custom_generate=custom_generate,
        trust_remote_code=True,  # needed by the folder route, which executes custom_generate/generate.py
        draft_model=draft,
        scylla_stats=stats,
        max_new_tokens=24,
        eos_token_id=eos,
        return_dict_in_generate=True,
        output_scores=True,
    )
    expected = target.generate(prompt, max_new_tokens=24, eos_token_id=eos, do_sample=False)
    assert torch.equal(output.sequences, expected)
    assert len(output.scores) == expected.shape[1] - prompt.shape[1]
    assert stats.tau > 1.0
    assert "_get_candidate_generator" not in vars(target)


def test_batch_above_one_is_a_clear_error() -> None:
    target = make_target()
    draft = make_draft(target)
    with pytest.raises(ValueError, match=r"batch size 1.*got batch size 2"):
        generate(target, draft, torch.cat([random_prompt(0), random_prompt(1)]), max_new_tokens=4)


def test_prompt_longer_than_context_is_a_clear_error() -> None:
    target = make_target(max_position_embeddings=32)
    draft = make_draft(target)
    with pytest.raises(ValueError, match="prompt has 40 tokens but the target's context is 32"):
        generate(target, draft, random_prompt(0, length=40), max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the target's context of 32"):
        generate(target, draft, random_prompt(0, length=20), max_new_tokens=20)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_draft_tokens": 0}, "max_draft_tokens must be >= 1"),
        ({"confidence_threshold": 1.2}, r"in \[0, 1\)"),
    ],
)
def test_bad_per_call_draft_settings_are_clear_errors(override: dict, message: str) -> None:
    target = make_target()
    with pytest.raises(ValueError, match=message):
        generate(target, make_draft(target), random_prompt(0), max_new_tokens=4, **override)


def test_draft_without_target_is_a_clear_error() -> None:
    target = make_target()
    draft = make_draft(target)
    draft.is_attached = False
    with pytest.raises(ValueError, match="attach_target"):
        generate(target, draft, random_prompt(0), max_new_tokens=4)


# Sampling: Leviathan et al.'s rule keeps the target's distribution. Vocabulary of 4, so the joint
# law of the first three new tokens (64 cells) is computed exactly and compared by a chi-square test.
SAMPLING_VOCAB = 4
SAMPLING_PROMPT = torch.tensor([[3, 1, 2, 0]])


def sampling_pair():
    """A peaky target and a draft that disagrees with it about half the time (rejections happen)."""
    target = make_target(vocab_size=SAMPLING_VOCAB, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)
    draft = make_draft(target, max_draft_tokens=2)
    with torch.no_grad():
        draft.fc.weight.mul_(10.0)
    return target, draft


def target_next_logits(target):
    return lambda inputs: target(inputs).logits[:, -1]


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_speculative_sampling_keeps_the_target_distribution(path: str) -> None:
    target, draft = sampling_pair()
    probs = exact_sequence_law(target_next_logits(target), SAMPLING_PROMPT, 3, SAMPLING_VOCAB)
    torch.manual_seed(1234)
    rng = torch.Generator().manual_seed(1234)
    samples, stats = [], ScyllaStats()
    for _ in range(800):
        if path == "fast":
            result = generate(target, draft, SAMPLING_PROMPT, max_new_tokens=4, do_sample=True, top_k=0)
            sequence = result.output
            stats.merge(result.stats)
        else:
            sequence, cycles = reference_speculative_decode(
                target, draft, SAMPLING_PROMPT, max_new_tokens=4, do_sample=True, rng=rng
            )
            for drafted, accepted in cycles:
                stats.record(drafted, accepted)
        samples.append(sequence_cell(sequence, SAMPLING_PROMPT.shape[1], 3, SAMPLING_VOCAB))
    samples = torch.tensor(samples)
    assert 0.0 < sum(stats.accepted) / sum(stats.drafted) < 0.9, "the test needs both accepts and rejects"
    assert chi_square_p_value(samples, probs) > 1e-3
    # The same test rejects the law of a sampler that keeps every draft token: it has power.
    broken_sampler = draft_chain_logits(target, draft, SAMPLING_PROMPT.shape[1])
    broken = exact_sequence_law(broken_sampler, SAMPLING_PROMPT, 3, SAMPLING_VOCAB)
    assert chi_square_p_value(samples, broken) < 1e-6


def test_sampling_check_script_accepts_scylla_and_rejects_the_broken_law(tmp_path) -> None:
    """``scripts/scylla_sampling_check.py`` (the committed evidence) on fewer samples."""
    check = load_script("scylla_sampling_check")
    assert check.main(["--samples", "300", "--output-dir", str(tmp_path)]) == 0
    rows = {row["sampler"]: row for row in json.loads((tmp_path / "sampling.json").read_text())["rows"]}
    scylla_samplers = (
        "scylla",
        "scylla_reduced_vocab",
        "scylla_tree",
        "scylla_tree_reduced_vocab",
        "scylla_prompt_lookup",
    )
    for sampler in ("plain", *scylla_samplers, "reference"):
        assert rows[sampler]["p_value_target_law"] > 1e-3
    for sampler in (*scylla_samplers, "reference"):
        assert rows[sampler]["p_value_keep_every_draft_law"] < 1e-6
        assert 0.0 < rows[sampler]["draft_acceptance"] < 0.9
    assert rows["scylla_prompt_lookup"]["lookup_cycles"] > 0 and rows["scylla"]["lookup_cycles"] == 0
    assert (tmp_path / "sampling.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        check.main(["--samples", "50"])
    before = (tmp_path / "sampling.json").read_text()
    with pytest.raises(SystemExit):  # a second run never replaces results without --overwrite
        check.main(["--samples", "300", "--output-dir", str(tmp_path)])
    assert (tmp_path / "sampling.json").read_text() == before


def test_a_user_cache_holding_a_prefix_is_refused_before_decoding() -> None:
    """Issue 16 item 20: the draft needs the target's features of the whole prompt; a cache that already
    holds a prefix used to fail deep inside the candidate generator."""
    from transformers import DynamicCache

    from hf_common.compat import cache_kwargs

    target = make_target(context_scale=0.3)
    draft = make_draft(target, oracle=True)
    prompt = random_prompt(0, length=9)
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(prompt[:, :5], **cache_kwargs(cache))
    with pytest.raises(ValueError, match="already holds 5 tokens"):
        target.generate(
            prompt,
            **cache_kwargs(cache),
            custom_generate=scylla_generate,
            draft_model=draft,
            max_new_tokens=8,
        )
    assert cache.get_seq_length() == 5, "the user's cache is left as it was"
    empty = DynamicCache(config=target.config)  # an empty user cache is fine
    output = target.generate(
        prompt, **cache_kwargs(empty), custom_generate=scylla_generate, draft_model=draft, max_new_tokens=8
    )
    assert torch.equal(output, target.generate(prompt, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("tree", [None, TreeConfig(3, 2, 6)], ids=["chain", "tree"])
def test_verification_runs_on_the_few_rows_kernel_unless_turned_off(tree, monkeypatch) -> None:
    """By default the target's multi-row forwards use `hf_common.few_rows_linear` (its twin F.linear is
    what plain greedy runs); ``few_rows_linear=False`` keeps F.linear; both equal plain greedy, and the
    layers are plain ``nn.Linear`` again afterwards."""
    from hf_common import few_rows_linear as frl

    if not frl.few_rows_linear_available():
        pytest.skip("the kernel cannot run here")
    rows_seen = []
    original = frl._kernel
    monkeypatch.setattr(
        frl, "_kernel", lambda ext, x, *a: rows_seen.append(x.numel() // x.shape[-1]) or original(ext, x, *a)
    )
    target = make_target(context_scale=0.3)
    draft = make_draft(target, depth=2, oracle=True)
    prompt = random_prompt(0)
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    for enabled in (True, False):
        rows_seen.clear()
        result = generate(
            target, draft, prompt, max_new_tokens=24, do_sample=False, tree=tree, few_rows_linear=enabled
        )
        assert torch.equal(result.output, plain)
        assert bool(rows_seen) == enabled and all(2 <= rows <= 16 for rows in rows_seen)
        assert all(
            type(module) is torch.nn.Linear
            for module in target.modules()
            if isinstance(module, torch.nn.Linear)
        )


@pytest.mark.parametrize("enabled", [True, False])
def test_the_kernel_is_built_before_the_timed_call(enabled, monkeypatch) -> None:
    """`generate` builds the few-rows kernel (about 30 s on a fresh machine) before it starts its clock,
    so that a first run's tokens/s (the demo's, on a fresh clone) is not the compiler's; with
    ``few_rows_linear=False`` it does not build it at all."""
    import hf_scylla.generation

    events = []
    monkeypatch.setattr(hf_scylla.generation, "few_rows_linear_available", lambda: events.append("build"))
    target = make_target(context_scale=0.3)
    original = target.generate
    monkeypatch.setattr(
        target, "generate", lambda *a, **k: events.append("timed generate") or original(*a, **k)
    )
    generate(target, make_draft(target, depth=1), random_prompt(0), max_new_tokens=4, do_sample=False,
             few_rows_linear=enabled)  # fmt: skip
    assert events == (["build", "timed generate"] if enabled else ["timed generate"])
