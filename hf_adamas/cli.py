"""The ``hf-adamas`` command line."""

from __future__ import annotations

from collections.abc import Sequence

from hf_common.cli import COMMON_COMMANDS, run_cli

DESCRIPTION = "Adamas sparse attention (arXiv 2510.18413) for transformers models."
COMMANDS = (*COMMON_COMMANDS,)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-adamas", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
