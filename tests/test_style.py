"""The code base stays ruff-clean (lint and format), as the style guide asks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, str(ROOT)], capture_output=True, text=True
    )
    assert "No module named ruff" not in result.stderr, (
        "ruff is part of the dev extra: pip install -e '.[dev]'"
    )
    assert result.returncode == 0, result.stdout + result.stderr
