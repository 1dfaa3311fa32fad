"""The ``hf-demo`` command: each method's demo part on one loaded model (see `hf_demo`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_common.cli import CommandError
from hf_common.default_model import ModelNotFoundError
from hf_common.demo import add_demo_arguments, run_demo
from hf_common.outputs import OutputPathError

DEMO_PARTS = ("hf_scylla.demo", "hf_adamas.demo", "hf_vrgd.demo")
"""The demo parts ``hf-demo`` runs, in order (VRGD last: it fine-tunes, then restores the weights)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-demo",
        description="Scylla speculative decoding, Adamas sparse attention and VRGD fine-tuning on one model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_demo_arguments(parser, DEMO_PARTS)
    args = parser.parse_args(argv)
    try:
        return run_demo(args, DEMO_PARTS)
    except (CommandError, OutputPathError, ModelNotFoundError) as error:
        print(f"hf-demo: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
