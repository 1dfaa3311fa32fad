"""The console scripts: --help at both levels, env, argument errors, each demo, scripts/bootstrap.py."""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import load_script

import hf_common.default_model
import hf_common.demo
from hf_adamas.cli import main as adamas_main
from hf_demo.cli import main as hf_demo_main
from hf_scylla.cli import main as scylla_main
from hf_vrgd.cli import main as vrgd_main

CLIS = {"hf-adamas": adamas_main, "hf-vrgd": vrgd_main, "hf-scylla": scylla_main}


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_help(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        CLIS[prog](["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog}")
    assert "demo" in out and "env" in out


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_every_subcommand_has_help(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_common.cli import build_parser

    module = sys.modules[CLIS[prog].__module__]
    for command in module.COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            build_parser(prog, module.DESCRIPTION, module.COMMANDS).parse_args([command.name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: {prog} {command.name}" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        vrgd_main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_env_reports_versions(capsys: pytest.CaptureFixture[str]) -> None:
    assert adamas_main(["env"]) == 0
    out = capsys.readouterr().out
    assert "transformers: 5." in out
    assert "default model cache:" in out


@pytest.mark.parametrize("prog", [*sorted(CLIS), "hf-demo"])
def test_console_script_is_installed(prog: str) -> None:
    script = Path(sysconfig.get_path("scripts")) / prog
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {prog}")


# ---------------------------------------------------------------- demos


DEMO_OPTIONS = {"hf-adamas": "--budget", "hf-scylla": "--draft", "hf-vrgd": "--steps"}


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_each_cli_demo_runs_its_own_part(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        CLIS[prog](["demo", "--help"])
    out = capsys.readouterr().out
    for other, option in DEMO_OPTIONS.items():
        assert (option in out) == (other == prog), (prog, option)


def test_hf_demo_runs_all_three_parts() -> None:
    result = subprocess.run([sys.executable, "-m", "hf_demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hf-demo")
    assert all(option in result.stdout for option in DEMO_OPTIONS.values())


class ModelLoaded(Exception):
    """Stands in for minutes of demo work: raised where the model would load."""


def stop_at_model_load(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    def load(model_id, **kwargs):
        seen.append(model_id)
        raise ModelLoaded

    monkeypatch.setattr(hf_common.demo, "load_model_and_tokenizer", load)


def test_demo_json_folder_is_created_before_the_model_loads(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16 item 4: the --json path is claimed up front, so its folder exists before any slow work."""
    seen = []
    stop_at_model_load(monkeypatch, seen)
    target = tmp_path / "new" / "deeper" / "demo.json"
    with pytest.raises(ModelLoaded):
        vrgd_main(["demo", "--json", str(target)])
    assert seen and target.parent.is_dir()


@pytest.mark.parametrize("blocked", ["a-file/demo.json", "existing.json"])
def test_demo_json_that_cannot_be_written_is_refused_before_the_model_loads(
    blocked: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = []
    stop_at_model_load(monkeypatch, seen)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "existing.json").write_text("keep")
    assert scylla_main(["demo", "--json", str(tmp_path / blocked)]) == 2
    assert "error:" in capsys.readouterr().err
    assert seen == [] and (tmp_path / "existing.json").read_text() == "keep"
    assert hf_demo_main(["--json", str(tmp_path / blocked)]) == 2
    assert seen == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--groups", "1"], "--groups must be >= 2"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--steps", "0"], "--steps and --rows must be at least 1"),
        (["--train-layers", "-1"], "--train-layers must be >= 0"),
    ],
)
def test_vrgd_demo_checks_its_options_before_loading(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = []
    stop_at_model_load(monkeypatch, seen)
    assert vrgd_main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err and seen == []


def test_vrgd_demo_part_fine_tunes_and_restores_the_weights(tiny_target_dir: Path) -> None:
    """The VRGD part on a tiny Llama: both optimizers take their steps, VR-AdamW reports its GSNR."""
    from hf_vrgd.demo import FineTuneResult, run_demo_part, trained_parameters

    model, tokenizer = hf_common.default_model.load_model_and_tokenizer(tiny_target_dir, device="cpu")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    args = argparse.Namespace(steps=2, groups=2, rows=1, train_length=16, lr=1e-2, train_layers=1)
    adamw, vr = run_demo_part(model, tokenizer, args)
    assert isinstance(adamw, FineTuneResult) and (adamw.label, vr.label) == ("AdamW", "VR-AdamW")
    assert len(adamw.losses) == len(vr.losses) == 2
    assert adamw.losses[0] == pytest.approx(vr.losses[0])  # same weights, same first batch
    assert adamw.mean_gsnr_multiplier is None and 0.0 < vr.mean_gsnr_multiplier <= 1.0
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not model.training and all(parameter.requires_grad for parameter in model.parameters())
    top = trained_parameters(model, 1)
    assert top and len(top) < len(list(model.parameters()))
    assert len(trained_parameters(model, 0)) == len(list(model.parameters()))


# ---------------------------------------------------------------- scripts/bootstrap.py


def test_bootstrap_stage_prints_one_line_and_keeps_the_log(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap = load_script("bootstrap")
    log = tmp_path / "bootstrap.log"
    bootstrap.stage("package", [sys.executable, "-c", "print('Collecting x\\n' * 300)"], "done", log=log)
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{'package':<14}done"] and captured.err == ""
    assert log.read_text().count("Collecting x\n") == 300  # the output lines (the command line is there too)


def test_bootstrap_stage_failure_shows_its_output(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bootstrap = load_script("bootstrap")
    log = tmp_path / "bootstrap.log"
    log.write_text("an earlier stage's output\n")
    failing = [
        sys.executable,
        "-c",
        "print('ERROR: No matching distribution found for torch'); raise SystemExit(1)",
    ]
    with pytest.raises(bootstrap.StageFailed):
        bootstrap.stage("torch", failing, "installed", log=log)
    captured = capsys.readouterr()
    assert captured.out == f"{'torch':<14}FAILED\n"
    assert "No matching distribution found for torch" in captured.err
    assert "an earlier stage's output" not in captured.err  # only the failed stage's output
    assert f"full log: {log}" in captured.err
