"""The output rule: a run claims its exact files first, refuses to replace any without --overwrite."""

import argparse

import pytest

from hf_common.cli import Command, CommandError, run_cli
from hf_common.outputs import OutputPathError, add_output_arguments, claim_outputs
from hf_common.reporting import command_line, write_report


def test_claim_creates_the_folder_and_refuses_existing_files(tmp_path):
    target = tmp_path / "new" / "deeper" / "result.json"
    assert claim_outputs([target], overwrite=False) == [target]
    assert target.parent.is_dir() and not target.exists()
    target.write_text("committed")
    with pytest.raises(OutputPathError, match=r"result\.json already exists; pass --overwrite"):
        claim_outputs([target, tmp_path / "other.md"], overwrite=False)
    assert target.read_text() == "committed"
    claim_outputs([target], overwrite=True)
    assert target.read_text() == "committed"  # claiming never deletes; only the writer replaces


def test_claim_refuses_blocked_paths(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        claim_outputs([tmp_path / "afile" / "r.json"], overwrite=True)
    (tmp_path / "adir.json").mkdir()
    with pytest.raises(OutputPathError, match="is a folder"):
        claim_outputs([tmp_path / "adir.json"], overwrite=True)


def test_run_cli_reports_command_errors_with_exit_2(tmp_path, capsys):
    def add(parser: argparse.ArgumentParser) -> None:
        add_output_arguments(parser, tmp_path)

    def run(args: argparse.Namespace) -> int:
        claim_outputs([args.output_dir / "r.json"], args.overwrite)
        raise CommandError("bad budget")

    (tmp_path / "r.json").write_text("keep")
    assert run_cli("prog", "d", [Command("go", "help", add, run)], ["go"]) == 2
    assert "prog go: error:" in capsys.readouterr().err
    assert run_cli("prog", "d", [Command("go", "help", add, run)], ["go", "--overwrite"]) == 2
    assert "bad budget" in capsys.readouterr().err
    assert (tmp_path / "r.json").read_text() == "keep"


def test_write_report_records_command_and_machine(tmp_path):
    command = command_line("hf-x", ["bench", "--name", "a b"])
    assert command == "hf-x bench --name 'a b'"
    json_path, md_path = write_report(tmp_path, "bench", command, {"rows": [1]}, "Bench", "body\n")
    assert '"rows"' in json_path.read_text() and '"machine"' in json_path.read_text()
    assert md_path.read_text().startswith("# Bench\n\nCommand: `hf-x bench --name 'a b'`\n\nMachine: ")
