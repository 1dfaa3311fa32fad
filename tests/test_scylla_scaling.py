"""The log-linear fit tau = a + b ln x, its plot, and the resumable sweep on a tiny target."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import chat_word_tokenizer
from scylla_models import make_target

import hf_scylla.bench.sweep
from hf_scylla.bench.scaling import fit_log_linear, plot_log_linear
from hf_scylla.bench.sweep import SweepPoint, SweepSettings, plan_points
from hf_scylla.cli import main


@pytest.mark.parametrize(
    ("a", "b"), [(1.2, 0.15), (3.0, -0.4), (0.0, 2.0)], ids=["rising", "falling", "zero-a"]
)
def test_fit_recovers_exact_log_linear_data(a: float, b: float) -> None:
    x = [1e3, 1e4, 1e5, 1e6]
    fit = fit_log_linear(x, [a + b * math.log(value) for value in x])
    assert fit.a == pytest.approx(a, abs=1e-9)
    assert fit.b == pytest.approx(b, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.points == 4
    np.testing.assert_allclose(fit.predict([10.0]), a + b * math.log(10.0))


def test_fit_on_noisy_data_matches_the_definition_of_r2() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    tau = np.array([1.0, 1.3, 1.25, 1.6])
    fit = fit_log_linear(x, tau)
    log_x = np.log(x)
    b = ((log_x - log_x.mean()) * (tau - tau.mean())).sum() / ((log_x - log_x.mean()) ** 2).sum()
    a = tau.mean() - b * log_x.mean()
    r2 = 1 - ((tau - a - b * log_x) ** 2).sum() / ((tau - tau.mean()) ** 2).sum()
    assert (fit.a, fit.b) == pytest.approx((a, b))
    assert fit.r2 == pytest.approx(r2)
    assert 0.0 < fit.r2 < 1.0


def test_fit_of_constant_tau_has_zero_slope_and_undefined_r2() -> None:
    fit = fit_log_linear([1, 2, 4], [1.1, 1.1, 1.1])
    assert fit.b == pytest.approx(0.0, abs=1e-12)
    assert fit.a == pytest.approx(1.1)
    assert math.isnan(fit.r2)


@pytest.mark.parametrize(
    ("x", "tau", "message"),
    [
        ([10.0], [1.2], "at least 2 points"),
        ([], [], "at least 2 points"),
        ([1.0, 2.0], [1.0], "same length"),
        ([0.0, 2.0], [1.0, 1.1], "must be positive"),
        ([-1.0, 2.0], [1.0, 1.1], "must be positive"),
        ([1.0, float("nan")], [1.0, 1.1], "finite"),
        ([1.0, 2.0], [1.0, float("inf")], "finite"),
        ([5.0, 5.0, 5.0], [1.0, 1.1, 1.2], "2 distinct values"),
    ],
    ids=["one-point", "empty", "lengths", "zero-x", "negative-x", "nan-x", "inf-tau", "one-distinct-x"],
)
def test_fit_rejects_bad_input(x: list[float], tau: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_log_linear(x, tau)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    x, tau = [1, 2, 3, 4], [1.0, 1.1, 1.15, 1.2]
    path = plot_log_linear(tmp_path / "fit.png", x, tau, fit_log_linear(x, tau), "title", "depth")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_shares_the_point_on_both_axes() -> None:
    settings = SweepSettings(samples=(25, 50, 100), tokens_depth=1, depths=(1, 2), depth_samples=50)
    assert plan_points(settings) == [
        SweepPoint(1, 25),
        SweepPoint(1, 50),
        SweepPoint(1, 100),
        SweepPoint(2, 50),
    ]
    with pytest.raises(ValueError, match="positive"):
        SweepSettings(depths=(0, 1))


def test_sweep_cli_writes_fits_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, data, prompts = tmp_path / "target", tmp_path / "train.jsonl", tmp_path / "prompts.jsonl"
    make_target(context_scale=0.3).save_pretrained(model_dir)
    chat_word_tokenizer().save_pretrained(model_dir)
    pairs = [{"question": f"w{i} w{i + 1}", "answer": f"w{i + 2} w{i + 3} w{i + 4}"} for i in range(5, 13)]
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    prompts.write_text("".join(json.dumps({"turns": [f"w{i} w{i + 1}"]}) + "\n" for i in (7, 20)))
    output = tmp_path / "results"
    argv = [
        "sweep",
        *("--model", str(model_dir), "--data", str(data), "--max-length", "16"),
        *("--samples", "2", "4", "8", "--depths", "1", "2", "--depth-samples", "4"),
        *("--epochs", "1", "--batch-size", "2", "--eval-prompts-file", str(prompts)),
        *("--eval-prompts", "2", "--max-new-tokens", "6", "--max-draft-tokens", "3"),
        *("--work-dir", str(tmp_path / "work"), "--output-dir", str(output)),
    ]
    assert main(argv) == 0
    summary = json.loads((output / "sweep.json").read_text())
    assert {point["name"] for point in summary["points"]} == {"D1-n2", "D1-n4", "D1-n8", "D2-n4"}
    assert all(point["lossless"] and point["tau"] >= 1.0 for point in summary["points"])
    tokens = [point["training_tokens"] for point in sorted(summary["points"], key=lambda p: p["samples"])]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert set(summary["fits"]) == {"tokens", "depth_n4"}
    for axis, count in (("tokens", 3), ("depth_n4", 2)):
        assert len(summary["fits"][axis]["points"]) == count
        assert (output / f"tau_vs_{axis}.png").is_file()
    assert "batch-sweep" in summary["batch_size_axis"]
    assert "| tokens | training_tokens | 3 |" in (output / "sweep.md").read_text()

    # A rerun trains nothing: every point is already measured.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(hf_scylla.bench.sweep, "_train_point", no_training)
    assert main(argv) == 2, "a plain rerun may not replace the summary: it needs --resume or --overwrite"
    (output / "sweep.json").unlink()
    assert main([*argv, "--resume"]) == 0
    assert len(json.loads((output / "sweep.json").read_text())["points"]) == 4
    # Points measured with other training settings are not mixed into one fit.
    assert main([*argv, "--epochs", "2", "--resume"]) == 2
    assert "measured with other settings" in capsys.readouterr().err


def test_sweep_cli_pretraining_stage_sweeps_text_windows(tmp_path: Path) -> None:
    """``--stage pretrain``: the tokens axis counts general-text windows, every token of them learned."""
    model_dir, text, prompts = tmp_path / "target", tmp_path / "corpus.txt", tmp_path / "prompts.jsonl"
    make_target(context_scale=0.3).save_pretrained(model_dir)
    chat_word_tokenizer().save_pretrained(model_dir)
    text.write_text(" ".join(f"w{5 + i % 40}" for i in range(200)))
    prompts.write_text("".join(json.dumps({"turns": [f"w{i} w{i + 1}"]}) + "\n" for i in (7, 20)))
    output = tmp_path / "results"
    argv = [
        "sweep",
        *("--model", str(model_dir), "--stage", "pretrain", "--text", str(text), "--max-length", "8"),
        *("--samples", "2", "4", "--depths", "1", "--depth-samples", "4"),
        *("--epochs", "1", "--batch-size", "2", "--eval-prompts-file", str(prompts)),
        *("--eval-prompts", "2", "--max-new-tokens", "6", "--max-draft-tokens", "3"),
        *("--work-dir", str(tmp_path / "work"), "--output-dir", str(output)),
    ]
    assert main(argv) == 0
    assert len(list((tmp_path / "work").glob("features-text-32x8-*.pt"))) == 1
    summary = json.loads((output / "sweep.json").read_text())
    assert summary["stage"] == "pretrain"
    by_windows = {point["samples"]: point for point in summary["points"]}
    assert {n: point["training_tokens"] for n, point in by_windows.items()} == {2: 2 * 7, 4: 4 * 7}
    assert all(point["lossless"] for point in summary["points"])
    assert (
        main([*argv[:6], str(tmp_path / "missing.txt"), *argv[7:], "--work-dir", str(tmp_path / "w2")]) == 2
    )
