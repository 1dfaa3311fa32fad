"""The batch-size sweep decodes the same prompts at every batch size, checks them and fits against ln B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import chat_word_tokenizer
from scylla_models import make_draft, make_target

from hf_scylla.bench.batch_sweep import left_padded_batches, run_batch_sweep

QUESTIONS = ["w5 w6 w7 w5 w6 w7", "w9 w10", "w20 w40 w60 w80", "w11", "w30 w31 w32"]


def padded_tokenizer():
    tokenizer = chat_word_tokenizer()
    tokenizer.pad_token = "w0"  # id 0, the tiny target's pad
    return tokenizer


def test_left_padded_batches() -> None:
    tokenizer = padded_tokenizer()
    batches = left_padded_batches(tokenizer, QUESTIONS, 2)
    assert [batch["input_ids"].shape for batch in batches] == [(2, 7), (2, 5), (1, 4)]
    assert batches[0]["input_ids"][1].tolist() == [0, 0, 0, 0, 9, 10, 3]
    assert batches[0]["attention_mask"][1].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert tokenizer.padding_side == "right"  # restored
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        left_padded_batches(tokenizer, QUESTIONS, 0)


def test_batch_sweep_points_are_lossless_and_fitted(tmp_path: Path) -> None:
    target = make_target(context_scale=0.3)
    draft = make_draft(target, oracle=True)
    summary = run_batch_sweep(
        target, padded_tokenizer(), draft, QUESTIONS, [1, 2, 4], [1, 3], 16, tmp_path, {"command": "test"}
    )
    assert [(p["batch_size"], p["draft_tokens"]) for p in summary["points"]] == [
        (b, k) for b in (1, 2, 4) for k in (1, 3)
    ]
    assert all(p["lossless"] for p in summary["points"])
    assert all(p["tau"] > 1.0 for p in summary["points"])  # the oracle draft is accepted
    # Each row keeps its own accepted tokens, so tau at one draft length barely depends on B.
    for k in (1, 3):
        taus = [p["tau"] for p in summary["points"] if p["draft_tokens"] == k]
        assert max(taus) - min(taus) < 0.5
    for best in summary["best"]:
        same_batch = [p for p in summary["points"] if p["batch_size"] == best["batch_size"]]
        assert best["speedup"] == max(p["speedup"] for p in same_batch)
    assert set(summary["fits"]) == {"tau_k1", "tau_k3", "best_draft_tokens", "tau_at_best"}
    saved = json.loads((tmp_path / "batch_sweep.json").read_text())
    assert saved["command"] == "test" and saved["prompts"] == len(QUESTIONS)
    for name in ("batch_sweep.md", "speedup_vs_batch.png", "tau_vs_batch.png", "tau_at_best_vs_batch.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_batch_sweep_rejects_bad_axes(tmp_path: Path) -> None:
    target = make_target()
    draft = make_draft(target)
    with pytest.raises(ValueError, match="batch sizes and draft lengths >= 1"):
        run_batch_sweep(target, padded_tokenizer(), draft, QUESTIONS, [1, 0], [1], 4, tmp_path)
    with pytest.raises(ValueError, match="need prompts"):
        run_batch_sweep(target, padded_tokenizer(), draft, [], [1], [1], 4, tmp_path)
    assert not any(tmp_path.iterdir())
