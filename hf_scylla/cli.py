"""The ``hf-scylla`` command line."""

from __future__ import annotations

from collections.abc import Sequence

from hf_common.cli import COMMON_COMMANDS, run_cli

DESCRIPTION = "Scylla speculative decoding (arXiv 2505.07858) for transformers generate()."
COMMANDS = (*COMMON_COMMANDS,)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-scylla", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
