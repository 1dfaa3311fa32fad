"""The three console scripts: --help at both levels, the env command, argument errors."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hf_adamas.cli import main as adamas_main
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


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_console_script_is_installed(prog: str) -> None:
    script = Path(sysconfig.get_path("scripts")) / prog
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {prog}")
