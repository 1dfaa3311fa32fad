"""The benchmark runs every method on every prompt set, reports speedups and checks losslessness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import chat_word_tokenizer
from scylla_models import make_draft, make_target

from hf_scylla.bench.speed import load_prompt_sets, run_benchmark
from hf_scylla.data import encode_prompt


@pytest.fixture
def prompt_dir(tmp_path: Path) -> Path:
    for name, questions in {
        "copy": ["w5 w6 w7 w5 w6 w7 w5 w6", "w9 w10 w9 w10"],
        "mixed": ["w20 w40 w60"],
    }.items():
        lines = [json.dumps({"question_id": i, "turns": [q]}) for i, q in enumerate(questions)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_load_prompt_sets_reads_first_turns(prompt_dir: Path) -> None:
    sets = load_prompt_sets(prompt_dir, limit=1)
    assert sets == {"copy": ["w5 w6 w7 w5 w6 w7 w5 w6"], "mixed": ["w20 w40 w60"]}
    with pytest.raises(FileNotFoundError, match=r"no \*\.jsonl prompt files"):
        load_prompt_sets(prompt_dir / "missing")


def test_encode_prompt_applies_the_chat_template() -> None:
    assert encode_prompt(chat_word_tokenizer(), "w5 w6").tolist() == [[5, 6, 3]]


def test_benchmark_rows_are_lossless_with_speedups(prompt_dir: Path) -> None:
    target = make_target(context_scale=0.3)
    draft = make_draft(target, oracle=True)
    rows = run_benchmark(
        target,
        chat_word_tokenizer(),
        load_prompt_sets(prompt_dir),
        draft=draft,
        draft_name="oracle",
        max_new_tokens=16,
    )
    assert [(row["set"], row["method"]) for row in rows] == [
        (prompt_set, method)
        for prompt_set in ("copy", "mixed")
        for method in ("greedy", "prompt_lookup_10", "oracle")
    ]
    assert all(row["lossless"] for row in rows)
    by_method = {(row["set"], row["method"]): row for row in rows}
    assert by_method["copy", "greedy"]["speedup"] == 1.0
    assert by_method["copy", "greedy"]["tokens_per_target_forward"] == 1.0
    assert by_method["copy", "oracle"]["tokens_per_target_forward"] > 1.5
    assert by_method["copy", "oracle"]["tau"] > 1.5
    assert by_method["copy", "oracle"]["new_tokens"] == 2 * 16
