"""scripts/adamas_gpu_bench.py: the tiny CPU run of its code path, its reports and time guard, the no-CUDA refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

BREAKDOWN = ("estimate_ms", "topk_ms", "attention_ms", "adamas_ms", "sdpa_ms", "sdpa_repeat_kv_ms")


def test_tiny_cpu_run_writes_the_breakdown(tmp_path: Path) -> None:
    bench = load_script("adamas_gpu_bench")
    args = ["--device", "cpu", "--tiny", "--repeats", "1", "--warmup", "0", "--output-dir", str(tmp_path)]
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "adamas_gpu_bench.json").read_text())
    assert report["command"].startswith("python scripts/adamas_gpu_bench.py --device cpu --tiny")
    assert report["ops"].startswith("PyTorch reference ops") and report["skipped"] == []
    points = {(row["context"], row["budget"], row["selection"]) for row in report["rows"]}
    selections = ("per_query_head", "shared_per_kv_group")
    assert points == {(c, b, s) for c in (256, 512) for b in (16, 64) for s in selections}
    for row in report["rows"]:
        assert all(row[name] > 0 for name in BREAKDOWN), row
        assert row["estimate_code_gbps"] > 0 and row["estimate_code_fraction_of_copy"] > 0
        assert row["speedup_vs_sdpa"] == pytest.approx(row["sdpa_ms"] / row["adamas_ms"])
    assert report["copy_bandwidth_gbps"] > 0
    markdown = (tmp_path / "adamas_gpu_bench.md").read_text()
    assert "| context | budget | selection | estimate_ms | topk_ms | attention_ms |" in markdown
    for name in ("time", "speedup"):
        assert (tmp_path / f"adamas_gpu_bench_{name}.png").stat().st_size > 0


def test_time_guard_records_what_it_skipped(tmp_path: Path) -> None:
    args = [
        "--device",
        "cpu",
        "--tiny",
        "--repeats",
        "1",
        "--time-limit-s",
        "0",
        "--output-dir",
        str(tmp_path),
    ]
    assert load_script("adamas_gpu_bench").main(args) == 0
    report = json.loads((tmp_path / "adamas_gpu_bench.json").read_text())
    assert report["rows"] == [] and len(report["skipped"]) == 2 * 2 * 2
    assert "Skipped by the time guard: 8 points" in (tmp_path / "adamas_gpu_bench.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "CUDA is not available"), (["--device", "cpu"], "--device cpu runs only with --tiny")],
)
def test_refuses_without_cuda(tmp_path: Path, monkeypatch, capsys, args: list[str], message: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        load_script("adamas_gpu_bench").main([*args, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
