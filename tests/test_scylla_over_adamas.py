"""scripts/scylla_over_adamas.py on a tiny target and its oracle draft: the four methods, their reports, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script
from helpers import random_words
from transformers import AutoTokenizer


@pytest.fixture
def chat_target_dir(tiny_target_dir: Path) -> Path:
    """The tiny target with a chat template (the script asks its question as a user turn)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_target_dir)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }} {% endfor %}w3"
    tokenizer.save_pretrained(tiny_target_dir)
    return tiny_target_dir


def test_four_methods_reported(tmp_path: Path, chat_target_dir: Path, tiny_draft_dir: Path) -> None:
    text = tmp_path / "words.txt"
    text.write_text(random_words(0, 200))
    out = tmp_path / "out"
    script = load_script("scylla_over_adamas")
    args = ["--model", str(chat_target_dir), "--draft", str(tiny_draft_dir), "--text", str(text)]
    args += ["--context-tokens", "120", "--instruction", "w5 w6", "--budget", "16", "--dense-layers", "0"]
    args += ["--max-new-tokens", "12", "--repeats", "2", "--output-dir", str(out)]
    assert script.main(args) == 0
    report = json.loads((out / "scylla_over_adamas.json").read_text())
    methods = report["methods"]
    assert list(methods) == ["greedy sdpa", "greedy adamas", "scylla sdpa", "scylla adamas"]
    assert report["prompt"]["prompt_tokens"] == 120 + 2 + 1  # passage, instruction, the template's w3
    for label, record in methods.items():
        assert 1 <= record["new_tokens"] <= 12 and record["tokens_per_second"] > 0, label
        assert record["tokens_per_cpu_second"] > 0, label
        assert len(record["seconds_per_run"]) == 2 and record["same_tokens_every_run"], label
    # Greedy decoding forwards one token at a time after the prefill; Adamas makes every such step sparse.
    greedy = methods["greedy adamas"]
    assert greedy["sparse_forwards"] == greedy["one_token_forwards"] == greedy["new_tokens"] - 1
    assert methods["greedy sdpa"]["sparse_forwards"] == 0
    # The oracle draft is often right: Scylla verifies several tokens per forward, and those run dense.
    scylla = methods["scylla adamas"]
    assert scylla["tau"] > 1 and scylla["multi_token_forwards"] > 0
    assert scylla["sparse_forwards"] == scylla["one_token_forwards"] < scylla["new_tokens"] - 1
    assert methods["scylla sdpa"]["first_difference_vs_greedy_sdpa"] is None  # lossless
    # Tokens from dense verification are sdpa's: only the tail after the first sparse step may differ.
    differs_at = scylla["first_difference_vs_scylla_sdpa"]
    assert differs_at is None or differs_at >= scylla["new_tokens"] - scylla["sparse_forwards"]
    assert "| scylla adamas |" in (out / "scylla_over_adamas.md").read_text()
    assert (out / "scylla_over_adamas.png").stat().st_size > 0

    with pytest.raises(SystemExit) as exit_info:  # the files exist now: refused without --overwrite
        script.main(args)
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--budget", "0", "--budget must be at least 1"), ("--draft", "/nonexistent", "no Scylla draft")],
)
def test_bad_input_is_refused(tmp_path: Path, capsys, flag: str, value: str, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script("scylla_over_adamas").main([flag, value, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
