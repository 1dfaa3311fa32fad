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


def test_agreement_command_compares_drafts_per_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hf_scylla.cli import main

    target_dir, prompts = tmp_path / "target", tmp_path / "prompts"
    target = make_target(context_scale=0.3)
    target.save_pretrained(target_dir)
    chat_word_tokenizer().save_pretrained(target_dir)
    make_draft(target, oracle=True).save_pretrained(tmp_path / "oracle")
    make_draft(target).save_pretrained(tmp_path / "random")
    prompts.mkdir()
    (prompts / "tiny.jsonl").write_text(
        json.dumps({"turns": ["w7 w8 w9 w10"], "reference": ["w11 w12 w13"]}) + "\n"
    )
    command = ["agreement", "--model", str(target_dir), "--prompts-dir", str(prompts)]
    command += ["--draft", str(tmp_path / "oracle"), "--draft", str(tmp_path / "random")]
    command += ["--output-dir", str(tmp_path / "out")]
    assert main(command) == 0
    rows = {
        row["draft"]: row for row in json.loads((tmp_path / "out" / "agreement.json").read_text())["rows"]
    }
    assert rows["oracle"]["agreement"] > rows["random"]["agreement"]  # the oracle draft mostly agrees
    assert rows["oracle"]["positions"] == rows["random"]["positions"] > 0
    assert main(command) == 2 and "already exist" in capsys.readouterr().err  # never replaced unasked
    assert main([*command[:5], "--draft", str(tmp_path / "absent")]) == 2
