"""EAGLE-2 dynamic draft trees: lossless greedy (vs plain greedy and the cache-free reference), exact
sampling (chi-square), the public entry points, and clear errors for trees the target cannot verify."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_config
from scylla_models import make_draft, make_target, peaky_sampling_pair
from transformers import AutoModelForCausalLM

from hf_scylla import (
    CUSTOM_GENERATE_DIR,
    ScyllaStats,
    TreeConfig,
    generate,
    reference_tree_decode,
    scylla_generate,
)
from hf_scylla.bench.verify_cost import (
    acceptance_survival,
    clone_draft,
    draft_step_seconds,
    expected_chain_speedups,
    speedup_ceiling,
    teacher_forced_agreement,
    verification_cost,
)
from hf_scylla.distribution import chi_square_p_value, draft_chain_logits, exact_sequence_law, sequence_cell
from hf_scylla.tree import DraftTree
from hf_scylla.vocab import reduce_draft_vocabulary

TREES = [TreeConfig(1, 1, 1), TreeConfig(3, 2, 5), TreeConfig(4, 3, 12), TreeConfig(6, 4, 24)]


def prompt(seed: int, length: int = 7, vocab_size: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def qwen2_target() -> AutoModelForCausalLM:
    torch.manual_seed(0)
    config = make_tiny_config("qwen2", 16, num_hidden_layers=2, use_sliding_window=False)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("family", "oracle"),
    [("llama", True), ("llama", False), ("qwen2", False)],
    ids=["llama-oracle-draft", "llama-random-draft", "qwen2-random-draft"],
)
def test_greedy_tree_equals_plain_greedy_and_the_cache_free_reference(family: str, oracle: bool) -> None:
    """Same tokens as plain greedy ``generate()``, and the same (tree depth, accepted) per cycle as the
    reference that re-runs the target on the whole sequence for every root-to-leaf path."""
    target = make_target(context_scale=0.3) if family == "llama" else qwen2_target()
    draft = make_draft(target, oracle=oracle, oracle_context_scale=0.5)
    for seed in range(3 if oracle else 2):
        plain = target.generate(prompt(seed), max_new_tokens=16, do_sample=False)
        for tree in TREES:
            result = generate(target, draft, prompt(seed), max_new_tokens=16, do_sample=False, tree=tree)
            assert torch.equal(result.output, plain), f"prompt seed {seed}, {tree}"
            sequence, cycles = reference_tree_decode(target, draft, prompt(seed), tree, max_new_tokens=16)
            assert torch.equal(sequence, plain), f"prompt seed {seed}, {tree}"
            assert cycles == list(zip(result.stats.drafted, result.stats.accepted, strict=True)), tree
            assert max(result.stats.drafted) <= tree.depth


def test_wider_trees_accept_more_than_a_chain_of_the_same_depth() -> None:
    target = make_target(context_scale=0.5)
    draft = make_draft(target, oracle=True, oracle_context_scale=0.5)
    chain = generate(target, draft, prompt(0), max_new_tokens=40, tree=TreeConfig(4, 1, 4)).stats
    wide = generate(target, draft, prompt(0), max_new_tokens=40, tree=TreeConfig(4, 4, 24)).stats
    assert wide.tau > chain.tau > 1.0


def test_tree_with_reduced_vocabulary_stays_lossless() -> None:
    target = make_target(context_scale=0.3)
    draft = make_draft(target, oracle=True, oracle_context_scale=0.5)
    reduce_draft_vocabulary(draft, torch.arange(0, 128, 2))
    for seed in range(2):
        plain = target.generate(prompt(seed), max_new_tokens=20, do_sample=False)
        result = generate(target, draft, prompt(seed), max_new_tokens=20, tree=TreeConfig(4, 3, 10))
        assert torch.equal(result.output, plain)
        sequence, cycles = reference_tree_decode(target, draft, prompt(seed), TreeConfig(4, 3, 10), 20)
        assert torch.equal(sequence, plain)
        assert cycles == list(zip(result.stats.drafted, result.stats.accepted, strict=True))


@pytest.mark.parametrize(
    "custom_generate", [scylla_generate, CUSTOM_GENERATE_DIR], ids=["callable", "folder"]
)
def test_tree_through_custom_generate_stops_at_eos_like_greedy(custom_generate) -> None:
    target = make_target(context_scale=0.3)
    draft = make_draft(target, oracle=True)
    plain = target.generate(prompt(1), max_new_tokens=24, do_sample=False)
    eos = int(plain[0, prompt(1).shape[1] + 5])
    stats = ScyllaStats()
    output = target.generate(
        prompt(1),
        custom_generate=custom_generate,
        trust_remote_code=True,
        draft_model=draft,
        scylla_stats=stats,
        tree=TreeConfig(4, 3, 10),
        max_new_tokens=24,
        eos_token_id=eos,
        return_dict_in_generate=True,
    )
    expected = target.generate(prompt(1), max_new_tokens=24, eos_token_id=eos, do_sample=False)
    assert torch.equal(output.sequences, expected)
    assert stats.tau > 1.0


def test_draft_tree_structure_ancestry_and_paths() -> None:
    tree = DraftTree(tokens=[5, 6, 7, 8], parents=[-1, -1, 0, 2], depths=[1, 1, 2, 3])
    assert tree.children(-1) == [0, 1] and tree.children(0) == [2]
    assert tree.path(3) == [0, 2, 3]
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(tree.ancestry_mask(), expected)


@pytest.mark.parametrize(
    ("make_call", "message"),
    [
        (lambda: TreeConfig(total_tokens=0), r"total_tokens must be >= 1, got 0"),
        (lambda: TreeConfig(depth=0), r"depth must be >= 1"),
        (lambda: TreeConfig(top_k=-1), r"top_k must be >= 1"),
    ],
)
def test_bad_tree_shapes_are_clear_errors(make_call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_call()


def test_trees_the_target_cannot_verify_are_clear_errors() -> None:
    target = make_target(max_position_embeddings=32)
    draft = make_draft(target)
    with pytest.raises(ValueError, match=r"needs 33 positions in one verification.*context of 32"):
        generate(target, draft, prompt(0), max_new_tokens=4, tree=TreeConfig(2, 2, 25))
    with pytest.raises(ValueError, match=r"top_k=200 exceeds the draft's vocabulary of 128"):
        generate(target, draft, prompt(0), max_new_tokens=4, tree=TreeConfig(2, 200, 4))
    with pytest.raises(ValueError, match=r"batch size 1"):
        generate(target, draft, torch.cat([prompt(0), prompt(1)]), max_new_tokens=4, tree=TreeConfig())
    with pytest.raises(ValueError, match="output_scores"):
        generate(target, draft, prompt(0), max_new_tokens=4, tree=TreeConfig(), output_scores=True)
    with pytest.raises(ValueError, match="a tree takes TreeConfig"):
        generate(target, draft, prompt(0), max_new_tokens=4, tree=TreeConfig(), max_draft_tokens=3)


def test_sliding_window_target_is_refused_by_trees() -> None:
    torch.manual_seed(0)
    config = make_tiny_config(
        "qwen2", 16, num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=0
    )
    target = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        generate(target, make_draft(target), prompt(0), max_new_tokens=4, tree=TreeConfig())


@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "reduced-vocab"])
def test_tree_sampling_keeps_the_target_distribution(reduced: bool) -> None:
    """Vocabulary 4, trees of 2 children per node: the law of 3 new tokens, chi-square tested."""
    vocab, new_tokens, start = 4, 3, torch.tensor([[3, 1, 2, 0]])
    target, draft = peaky_sampling_pair(vocab)
    if reduced:
        reduce_draft_vocabulary(draft, torch.tensor([0, 1, 3]))
    law = exact_sequence_law(lambda inputs: target(inputs).logits[:, -1], start, new_tokens, vocab)
    torch.manual_seed(2024)
    samples, stats = [], ScyllaStats()
    for _ in range(600):
        result = generate(
            target,
            draft,
            start,
            max_new_tokens=new_tokens + 1,
            do_sample=True,
            top_k=0,
            tree=TreeConfig(2, 2, 4),
        )
        stats.merge(result.stats)
        samples.append(sequence_cell(result.output, start.shape[1], new_tokens, vocab))
    samples = torch.tensor(samples)
    assert 1.0 < stats.tau < 2.9, "the test needs both accepted and rejected branches"
    assert chi_square_p_value(samples, law) > 1e-3
    broken = exact_sequence_law(draft_chain_logits(target, draft, start.shape[1]), start, new_tokens, vocab)
    assert chi_square_p_value(samples, broken) < 1e-6


def test_speed_measurements_on_a_tiny_pair() -> None:
    """`hf_scylla.bench.verify_cost` measures what it says: costs per size, agreement that a subset head can only lose."""
    target = make_target(context_scale=0.05)
    draft = make_draft(target, oracle=True)
    context = prompt(0, length=40)
    costs = verification_cost(target, context, [1, 4, 8], repeats=2)
    assert sorted(costs) == [1, 4, 8] and all(seconds > 0 for seconds in costs.values())
    assert draft_step_seconds(draft, target, context, repeats=2) > 0
    tiny = reduce_draft_vocabulary(clone_draft(draft, target), torch.tensor([0, 1, 2]))
    agreement = teacher_forced_agreement(target, {"full": draft, "tiny": tiny}, [context, prompt(1, 30)])
    assert agreement["full"]["positions"] == 39 + 29
    assert agreement["full"]["agreement"] > 0.8 > agreement["tiny"]["agreement"]
    assert speedup_ceiling({1: 1.0, 4: 2.0}, 0.0) == {1: 1.0, 4: 2.0}
    assert speedup_ceiling({1: 1.0, 4: 2.0}, 0.5) == {1: 1.0, 4: 4 / 3.5}


@pytest.mark.parametrize(
    ("accepted", "length", "survival"),
    [
        ([0, 0, 0, 0], 2, [0.0, 0.0]),
        ([3, 3], 3, [1.0, 1.0, 1.0]),
        ([0, 1, 2, 3], 3, [0.75, 0.5, 0.25]),
        ([1, 0, 1, 0], 4, [0.5, 0.0, 0.0, 0.0]),
    ],
)
def test_acceptance_survival_counts_cycles_that_kept_at_least_i_tokens(accepted, length, survival) -> None:
    assert acceptance_survival(accepted, length) == survival


def test_acceptance_survival_refuses_no_cycles() -> None:
    with pytest.raises(ValueError, match="no draft-verify cycle"):
        acceptance_survival([], 3)


@pytest.mark.parametrize(
    ("costs", "draft_step", "survival", "expected"),
    [
        # Free verification and drafting, every token accepted: k + 1 tokens per cycle of t(1).
        ({1: 1.0, 2: 1.0, 3: 1.0}, 0.0, [1.0, 1.0], {1: 2.0, 2: 3.0}),
        # Nothing accepted: each cycle still yields the bonus token, at the verification's cost.
        ({1: 1.0, 2: 1.25, 3: 1.5}, 0.0, [0.0, 0.0], {1: 0.8, 2: 1 / 1.5}),
        # Drafting costs count per draft token; a size the curve lacks gives no prediction.
        ({1: 1.0, 2: 1.2, 4: 1.5}, 0.1, [0.5, 0.25, 0.1], {1: 1.5 / 1.3, 3: 1.85 / 1.8}),
    ],
)
def test_expected_chain_speedups(costs, draft_step, survival, expected) -> None:
    assert expected_chain_speedups(costs, draft_step, survival) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--tree", "0", "4", "4"], "--tree: tree depth must be >= 1, got 0"),
        (["bench", "--tree", "2", "2", "3", "--tree", "3", "0", "4"], "--tree: "),
        (["bench", "--chain", "0", "4"], "--chain: need DRAFT_TOKENS >= 1 and LOOKUP_TOKENS >= 0, got 0 4"),
        (["verify-cost", "--draft", "unused", "--max-chain", "0"], "--max-chain must be positive"),
        (["verify-cost", "--draft", "unused", "--acceptance-prompts", "missing.jsonl"], "is not a file"),
        (["bench", "--draft-vocab-size", "0"], "--draft-vocab-size must be >= 1"),
        (["bench", "--lookup-tokens", "-1"], "--lookup-tokens must be >= 0"),
        (["verify-cost", "--draft", "unused", "--new-tokens", "2", "4"], "include 1"),
    ],
)
def test_speed_commands_check_arguments_before_loading_a_model(argv, message, capsys) -> None:
    from hf_scylla.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_verify_cost_command_on_the_default_model(tmp_path) -> None:
    """``hf-scylla verify-cost`` end to end on SmolLM2 and the staged draft, with tiny settings."""
    import json
    from pathlib import Path

    from hf_scylla.cli import main

    root = Path(__file__).resolve().parent.parent
    draft = root / "model_cards" / "SmolLM2-135M-Instruct-scylla-D1"
    argv = ["verify-cost", "--draft", str(draft), "--new-tokens", "1", "4", "--vocab-sizes", "1024"]
    argv += ["--repeats", "1", "--limit", "1", "--context-tokens", "64", "--output-dir", str(tmp_path)]
    argv += [
        "--acceptance-prompts",
        str(root / "hf_scylla" / "bench" / "prompts" / "heldout.jsonl"),
        "--max-chain",
        "2",
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "verify_cost.json").read_text())
    # The chain prediction adds the verification sizes it needs (1..max_chain + 1).
    assert [row["new_tokens"] for row in report["verification_curve"]] == [1, 2, 3, 4]
    assert [row["draft_tokens"] for row in report["chain_lengths"]] == [1, 2]
    assert report["best_chain"]["draft_tokens"] in (1, 2) and report["best_chain"]["cycles"] > 0
    survival = [row["p_at_least_k_accepted"] for row in report["chain_lengths"]]
    assert 1 >= survival[0] >= survival[1] >= 0
    heads = {row["draft_head"]: row for row in report["draft_heads"]}
    assert heads["vocab1024"]["head_tokens"] == 1024 and heads["full"]["head_tokens"] == 49152
    assert (tmp_path / "verify_cost.png").stat().st_size > 0
    assert main(argv) == 2  # its own files exist: refused without --overwrite


def test_settings_table_script_predicts_from_the_benches_survival(tmp_path) -> None:
    """``scripts/scylla_settings_table.py``: one row per Scylla bench row, predicted with the curve."""
    import json

    from conftest import load_script

    curve = {
        "verification_curve": [
            {"new_tokens": n, "target_forward_ms": ms} for n, ms in [(1, 40), (2, 44), (3, 48)]
        ],
        "draft_heads": [
            {"draft_head": "full", "draft_step_ms": 5.0},
            {"draft_head": "own64", "draft_step_ms": 2.0},
        ],
    }
    (tmp_path / "curve.json").write_text(json.dumps(curve))
    rows = [
        {"set": "val", "method": "greedy", "speedup": 1.0, "tau": None, "lossless": True},
        {
            "set": "val",
            "method": "scylla:d",
            "speedup": 0.9,
            "tau": 1.6,
            "acceptance_per_position": [0.5, 0.25, 0.1],
            "lossless": True,
        },
    ]
    (tmp_path / "bench-a").mkdir()
    (tmp_path / "bench-a" / "bench.json").write_text(json.dumps({"rows": rows}))
    (row,) = load_script("scylla_settings_table").settings_rows(
        tmp_path / "curve.json", [tmp_path / "bench-a"]
    )
    assert row["run"] == "a" and row["p_at_least_2"] == 0.25
    assert row["predicted_speedup_k2"] == round(1.75 * 40 / (48 + 2 * 2.0), 3)  # the own head's step
