"""The ``hf-vrgd`` command line: bench, train, lm (plus demo and env)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from hf_common.cli import COMMON_COMMANDS, Command, run_cli

DESCRIPTION = "VRGD variance-reduced optimizers (arXiv 2309.13681) for the Hugging Face Trainer."


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_vrgd.bench.synthetic import add_bench_arguments

    add_bench_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.synthetic import run_bench

    return run_bench(args)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_vrgd.experiment import add_train_arguments

    add_train_arguments(parser)


def _run_train(args: argparse.Namespace) -> int:
    from hf_vrgd.experiment import run_experiment

    return run_experiment(args)


def _add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_vrgd.bench.lm_experiment import add_lm_arguments

    add_lm_arguments(parser)


def _run_lm(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.lm_experiment import run_lm_experiment

    return run_lm_experiment(args)


COMMANDS = (
    *COMMON_COMMANDS,
    Command(
        "bench",
        "Step time and memory of each VR optimizer against its base on a ~100M-parameter Llama.",
        _add_bench_arguments,
        _run_bench,
    ),
    Command(
        "train",
        "Large-batch experiment: base vs VR optimizers at a small and a 16x batch (resumable).",
        _add_train_arguments,
        _run_train,
    ),
    Command(
        "lm",
        "Large-batch language modelling on real text: base vs VR AdamW/LAMB at 3 batches, 3 seeds (resumable).",
        _add_lm_arguments,
        _run_lm,
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-vrgd", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
