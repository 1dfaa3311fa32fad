"""The ``hf-vrgd`` command line."""

from __future__ import annotations

from collections.abc import Sequence

from hf_common.cli import COMMON_COMMANDS, run_cli

DESCRIPTION = "VRGD variance-reduced optimizers (arXiv 2309.13681) for the Hugging Face Trainer."
COMMANDS = (*COMMON_COMMANDS,)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-vrgd", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
