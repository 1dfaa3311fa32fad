"""Where a command's results go, and the rule that they never replace other files silently.

Every command that writes results takes ``--output-dir`` (default under ``runs/``, which git ignores,
so a plain run never touches the committed ``results/``) and ``--overwrite``. Before any slow work,
the command *claims* the exact files it will write: a claim fails at once when one of them already
exists and ``--overwrite`` was not given, and creates the folder otherwise. Nothing but the claimed
files is ever written or replaced, and nothing is ever deleted.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

__all__ = ["RUNS_DIR", "OutputPathError", "add_output_arguments", "claim_outputs"]

RUNS_DIR = Path("runs")


class OutputPathError(ValueError):
    """A results path cannot be written: the file exists (and no ``--overwrite``), or the path is blocked."""


def add_output_arguments(parser: argparse.ArgumentParser, default: Path, what: str = "results") -> None:
    """``--output-dir`` (default ``default``, normally under ``runs/``) and ``--overwrite``."""
    parser.add_argument("--output-dir", type=Path, default=default, help=f"Folder the {what} go to.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace this command's own files in --output-dir if they exist (nothing else is touched).",
    )


def claim_outputs(paths: Iterable[Path], overwrite: bool) -> list[Path]:
    """Check that ``paths`` may be written, then create their folders; call before any slow work.

    Raises ``OutputPathError`` naming every existing file when ``overwrite`` is false, or when a path
    or a parent is not what it must be (a folder where a file goes, a file where a folder goes), so a
    run never ends by losing its results.
    """
    paths = [Path(path) for path in paths]
    for path in paths:
        if path.is_dir():
            raise OutputPathError(f"{path} is a folder; a results file of that name cannot be written")
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                raise OutputPathError(f"{parent} is a file, so {path} cannot be written under it")
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        names = ", ".join(str(path) for path in existing)
        raise OutputPathError(
            f"{names} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite to replace "
            "(only these files), or choose another --output-dir"
        )
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    return paths
