"""Prompt lookup next to the draft: the n-gram search, lossless greedy and sampling, settings and bench rows."""

from __future__ import annotations

import pytest
import torch
from helpers import chat_word_tokenizer
from scylla_models import make_draft, make_target, peaky_sampling_pair

from hf_common.few_rows_linear import FewRowsLinear
from hf_scylla import ScyllaDraftConfig, ScyllaStats, TreeConfig, generate
from hf_scylla.bench.speed import run_benchmark, speed_variants
from hf_scylla.candidate_generator import ngram_continuation
from hf_scylla.distribution import chi_square_p_value, exact_sequence_law, sequence_cell
from hf_scylla.naive import lookup_continuation


@pytest.mark.parametrize(
    ("vocab", "num_tokens", "min_ngram", "max_ngram"),
    [(2, 4, 1, 1), (3, 4, 2, 3), (5, 1, 1, 4), (8, 6, 2, 2), (3, 10, 3, 5)],
)
def test_ngram_continuation_matches_the_reference_definition(vocab, num_tokens, min_ngram, max_ngram) -> None:
    generator = torch.Generator().manual_seed(vocab * 10 + num_tokens)
    for length in range(1, 40):
        tokens = torch.randint(0, vocab, (length,), generator=generator)
        found = ngram_continuation(tokens, num_tokens, min_ngram, max_ngram)
        expected = lookup_continuation(tokens.tolist(), num_tokens, min_ngram, max_ngram)
        assert (None if found is None else found.tolist()) == expected, tokens.tolist()


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        pytest.param([1, 2, 3, 4, 1, 2], [3, 4, 1], id="copies-what-followed"),
        pytest.param([5, 1, 2, 9, 7, 1, 2, 8, 1, 2], [8, 1, 2], id="latest-occurrence"),
        pytest.param([7, 7, 7, 7], [7], id="run-overlapping-the-suffix"),
        pytest.param([1, 2, 3, 4, 5, 6], None, id="no-repeat"),
        pytest.param([1, 2, 4, 2], None, id="one-token-repeat-below-min-ngram"),
        pytest.param([9, 1, 2, 3, 8, 2, 3, 5, 1, 2, 3], [8, 2, 3], id="longest-suffix-first"),
    ],
)
def test_ngram_continuation_cases(tokens, expected) -> None:
    found = ngram_continuation(torch.tensor(tokens), 3, 2, 3)
    assert (None if found is None else found.tolist()) == expected


def test_greedy_with_lookup_equals_plain_greedy_and_uses_lookup() -> None:
    """A random draft is rarely right, so the accepted runs come from lookup; the output is plain greedy's
    for 3, 25 and 40 new tokens and with an EOS the answer reaches."""
    target = make_target(context_scale=0.3)  # close to a bigram model: greedy decoding soon repeats itself
    draft = make_draft(target, lookup_tokens=5)
    prompt = torch.tensor([[5, 17, 3, 99, 42, 17, 3]])
    for max_new_tokens in (3, 25, 40):
        plain = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
        result = generate(target, draft, prompt, max_new_tokens=max_new_tokens, do_sample=False)
        assert torch.equal(result.output, plain)
    stats = result.stats
    assert 0 < sum(stats.lookup) < stats.cycles
    lookup_kept = [a for a, used in zip(stats.accepted, stats.lookup, strict=True) if used]
    assert max(lookup_kept) >= 2, "lookup proposals of several tokens are accepted"
    assert stats.to_dict()["lookup_cycles"] == sum(stats.lookup)
    off = generate(target, draft, prompt, max_new_tokens=40, do_sample=False, lookup_tokens=0)
    assert torch.equal(off.output, plain) and not any(off.stats.lookup)
    assert result.stats.tau > off.stats.tau
    eos = int(plain[0, -3])
    with_eos = target.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos)
    assert torch.equal(generate(target, draft, prompt, max_new_tokens=40, eos_token_id=eos).output, with_eos)


def test_sampling_with_lookup_keeps_the_target_distribution() -> None:
    """Lookup proposals come without logits, so transformers samples the target at each position and
    keeps the proposal while they agree: exact. Chi-square on the law of the first three new tokens."""
    vocab, prompt = 4, torch.tensor([[3, 1, 2, 0]])
    target, draft = peaky_sampling_pair(vocab)
    draft.config.lookup_tokens = 2
    probs = exact_sequence_law(lambda inputs: target(inputs).logits[:, -1], prompt, 3, vocab)
    torch.manual_seed(4321)
    samples, stats = [], ScyllaStats()
    for _ in range(800):
        result = generate(target, draft, prompt, max_new_tokens=4, do_sample=True, top_k=0)
        stats.merge(result.stats)
        samples.append(sequence_cell(result.output, prompt.shape[1], 3, vocab))
    assert 0 < sum(stats.lookup) < stats.cycles, "the test needs lookup and draft cycles"
    lookup_drafted = sum(d for d, used in zip(stats.drafted, stats.lookup, strict=True) if used)
    lookup_kept = sum(a for a, used in zip(stats.accepted, stats.lookup, strict=True) if used)
    assert 0 < lookup_kept < lookup_drafted, "the test needs accepted and rejected lookup tokens"
    assert chi_square_p_value(torch.tensor(samples), probs) > 1e-3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lookup_tokens": -1}, "lookup_tokens must be >= 0"),
        ({"lookup_min_ngram": 0}, "1 <= lookup_min_ngram <= lookup_max_ngram"),
        ({"lookup_min_ngram": 4, "lookup_max_ngram": 3}, "1 <= lookup_min_ngram <= lookup_max_ngram"),
    ],
)
def test_bad_lookup_settings_are_clear_errors(fields, message) -> None:
    target = make_target()
    with pytest.raises(ValueError, match=message):
        ScyllaDraftConfig.from_target_config(target.config, **fields)


def test_bad_per_call_lookup_settings_are_clear_errors() -> None:
    target = make_target()
    draft = make_draft(target)
    prompt = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="lookup_tokens must be >= 0"):
        generate(target, draft, prompt, max_new_tokens=4, lookup_tokens=-2)
    with pytest.raises(ValueError, match="shape chains; a tree takes TreeConfig"):
        generate(target, draft, prompt, max_new_tokens=4, lookup_tokens=3, tree=TreeConfig(2, 2, 4))


def test_config_lookup_survives_save_and_load(tmp_path) -> None:
    target = make_target()
    draft = make_draft(target, lookup_tokens=4, lookup_min_ngram=1)
    draft.save_pretrained(tmp_path)
    loaded = ScyllaDraftConfig.from_pretrained(tmp_path)
    assert (loaded.lookup_tokens, loaded.lookup_min_ngram, loaded.lookup_max_ngram) == (4, 1, 3)


def test_bench_adds_the_draft_without_lookup_and_the_few_rows_linear_rows() -> None:
    target = make_target(context_scale=0.3)
    draft = make_draft(target, oracle=True, lookup_tokens=4)
    assert speed_variants(make_draft(target), "plain", target, None) == {}
    rows = run_benchmark(
        target,
        chat_word_tokenizer(),
        {"copy": ["one two three one two three one two"]},
        draft=draft,
        draft_name="oracle",
        max_new_tokens=16,
        variants=speed_variants(
            draft, "oracle", target, None, few_rows_linear_rows=True, chains=[(3, 0), (1, 6)]
        ),
        few_rows_linear_rows=True,
    )
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {
        "greedy",
        "prompt_lookup_10",
        "greedy+few-rows-linear",
        "prompt_lookup_10+few-rows-linear",
        "oracle",
        "oracle-no-lookup",
        "oracle-F.linear",
        "oracle+chain3-lookup0",
        "oracle+chain1-lookup6",
    }
    assert all(row["lossless"] for row in rows)
    assert not any(isinstance(module, FewRowsLinear) for module in target.modules()), "switched back"
    assert by_method["oracle-no-lookup"]["lookup_share"] == 0.0
    assert by_method["oracle"]["lookup_share"] > 0.0
    assert by_method["oracle+chain3-lookup0"]["lookup_share"] == 0.0
    assert by_method["oracle+chain1-lookup6"]["lookup_share"] > 0.0


def test_code_prompt_script_builds_the_committed_set_and_never_overwrites(tmp_path, capsys) -> None:
    """``scripts/scylla_code_prompts.py`` rebuilds the prompts of ``hf_scylla/bench/prompts/code.jsonl``
    (same ids, tasks and functions; the sources are those of the running Python), and refuses an output
    that exists (exit 2, the file untouched)."""
    import json
    from pathlib import Path

    from conftest import load_script

    def outline(path: Path) -> list[tuple[int, str]]:
        """Per prompt: its id, and its text up to the function's ``(`` (the task and ``def <name>``)."""
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [(record["question_id"], record["turns"][0].split("(")[0]) for record in records]

    script = load_script("scylla_code_prompts")
    output = tmp_path / "code.jsonl"
    assert script.main(["--output", str(output)]) == 0
    committed = Path(__file__).resolve().parents[1] / "hf_scylla" / "bench" / "prompts" / "code.jsonl"
    assert outline(output) == outline(committed)
    assert len(outline(output)) >= 20
    output.write_text("mine\n")
    assert script.main(["--output", str(output)]) == 2
    assert "exists" in capsys.readouterr().err
    assert output.read_text() == "mine\n"
