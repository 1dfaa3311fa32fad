"""``hf-vrgd bench`` and ``hf-vrgd train`` end to end on tiny sizes, resume, and argument errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hf_vrgd import experiment
from hf_vrgd.bench.synthetic import optimizer_bytes
from hf_vrgd.cli import main

TINY_TRAIN = [
    "train",
    "--optimizers",
    "vr-adamw",
    "--small-batch",
    "4",
    "--micro-batch",
    "2",
    "--batch-ratio",
    "2",
    "--lr-multipliers",
    "1",
    "--seeds",
    "0",
    "--sweep-seeds",
    "--epochs",
    "1",
    "--hidden-size",
    "32",
    "--num-layers",
    "1",
    "--num-heads",
    "2",
    "--seq-len",
    "16",
    "--train-tokens",
    "1024",
    "--eval-tokens",
    "128",
]


def test_bench_writes_results(tmp_path: Path) -> None:
    argv = [
        "bench",
        "--params",
        "20000",
        "--repeats",
        "1",
        "--groups",
        "2",
        "--optimizers",
        "vr-sgd",
        "vr-adamw",
    ]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"bench_cpu.{suffix}").stat().st_size > 0
    payload = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert payload["command"].startswith("hf-vrgd bench") and payload["machine"]
    rows = {row["optimizer"]: row for row in payload["rows"]}
    assert set(rows) == {"vr-sgd", "vr-adamw"}
    for row in rows.values():
        assert row["total_ratio"] > 0 and row["step_ratio"] > 0
        # Between backward passes and the step a VR optimizer holds float32 sums of g and g^2.
        assert row["extra_bytes_per_param_before_step"] >= 8
    # AdamW keeps two float32 moments per parameter.
    assert rows["vr-adamw"]["base_bytes_per_param"] == pytest.approx(8, abs=0.1)


def test_optimizer_bytes_counts_state_not_parameters() -> None:
    params = [torch.nn.Parameter(torch.randn(100, 10)), torch.nn.Parameter(torch.randn(10))]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert optimizer_bytes(optimizer, params) == 0
    sum(p.sum() for p in params).backward()
    optimizer.step()
    assert optimizer_bytes(optimizer, params) == 4 * 1010  # one float32 momentum buffer per parameter


def test_train_writes_results_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [*TINY_TRAIN, "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    for name in ("large_batch.json", "large_batch.md", "large_batch_gap.png", "large_batch_eval_batch4.png"):
        assert (tmp_path / name).stat().st_size > 0
    payload = json.loads((tmp_path / "large_batch.json").read_text())
    records = {(r["optimizer"], r["batch"]): r for r in payload["records"]}
    assert set(records) == {("vr-adamw", 4), ("vr-adamw", 8)}
    for (_, batch), record in records.items():
        assert record["groups"] == batch // 2
        assert math.isfinite(record["eval_loss"]) and math.isfinite(record["train_loss"])
        assert record["gap"] == pytest.approx(record["eval_loss"] - record["train_loss"])
        assert record["eval_curve"], "no held-out evaluation was recorded"
    # Same epochs at twice the batch: half the steps, sqrt(2) times the learning rate.
    assert records[("vr-adamw", 8)]["steps"] * 2 == records[("vr-adamw", 4)]["steps"]
    assert records[("vr-adamw", 8)]["lr"] == pytest.approx(records[("vr-adamw", 4)]["lr"] * math.sqrt(2))
    assert any("gsnr/mean_multiplier" in entry for entry in records[("vr-adamw", 8)]["gsnr_log"])
    assert "| vr-adamw | 8 |" in (tmp_path / "large_batch.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiment, "train_one", no_training)
    assert main(argv) == 0
    assert len(json.loads((tmp_path / "large_batch.json").read_text())["records"]) == 2


def test_plan_runs_sweeps_only_sweep_seeds() -> None:
    runs = experiment.plan_runs(
        ["adamw", "vr-lamb"], 8, 16, {"adamw": 1e-3, "lamb": 1e-2}, [0.5, 1, 2], [0, 1], [0]
    )
    # Per optimizer: seed 0 has small + 3 large runs, seed 1 has small + 1 large.
    assert len(runs) == 2 * (4 + 2)
    large_lamb = sorted(r.lr for r in runs if r.optimizer == "vr-lamb" and r.batch == 128 and r.seed == 0)
    assert large_lamb == pytest.approx([2e-2, 4e-2, 8e-2])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--optimizers", "sgdx"], "invalid choice"),
        (["train", "--batch-ratio", "0"], "--batch-ratio must be >= 1"),
        (["train", "--small-batch", "12", "--micro-batch", "8"], "must be a multiple of --micro-batch"),
        (["train", "--small-batch", "8", "--micro-batch", "8"], "need >= 2 gradient groups"),
        (["bench", "--groups", "1"], "--groups must be >= 2"),
        (["bench", "--optimizers", "vr-rmsprop"], "invalid choice"),
    ],
)
def test_bad_arguments_fail_clearly(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--output-dir", str(tmp_path)])
    assert raised.value.code != 0
    assert message in str(raised.value.code) + capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing is written when the arguments are wrong"
