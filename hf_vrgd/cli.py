"""The ``hf-vrgd`` command line: bench, bench-model, small-k, train (plus demo and env)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from hf_common.cli import COMMON_COMMANDS, Command, run_cli
from hf_common.demo import demo_command

DESCRIPTION = "VRGD variance-reduced optimizers (arXiv 2309.13681) for the Hugging Face Trainer."


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_vrgd.bench.micro import add_bench_arguments

    add_bench_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.micro import run_bench

    return run_bench(args)


def _add_real_model_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_vrgd.bench.real_model import add_real_model_arguments

    add_real_model_arguments(parser)


def _run_real_model(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.real_model import run_real_model_bench

    return run_real_model_bench(args)


def _add_small_k_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_vrgd.bench.small_k import add_small_k_arguments

    add_small_k_arguments(parser)


def _run_small_k(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.small_k import run_small_k

    return run_small_k(args)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_vrgd.experiment import add_train_arguments

    add_train_arguments(parser)


def _run_train(args: argparse.Namespace) -> int:
    from hf_vrgd.experiment import run_experiment

    return run_experiment(args)


COMMANDS = (
    *COMMON_COMMANDS,
    demo_command("VRGD demo: a few steps of VR-AdamW vs AdamW fine-tuning on GSM8K.", "hf_vrgd.demo"),
    Command(
        "bench",
        "Micro-benchmark: step time and memory of each VR optimizer against its base (synthetic loss).",
        _add_bench_arguments,
        _run_bench,
    ),
    Command(
        "bench-model",
        "Real fine-tuning step (SmolLM2-135M, chat GSM8K, 4 micro-batches): base vs VR time and memory.",
        _add_real_model_arguments,
        _run_real_model,
    ),
    Command(
        "small-k",
        "How many multipliers clip to gamma with few gradient groups K (Gaussian group gradients).",
        _add_small_k_arguments,
        _run_small_k,
    ),
    Command(
        "train",
        "Large-batch experiment: base vs VR optimizers at a small and a 16x batch (resumable).",
        _add_train_arguments,
        _run_train,
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-vrgd", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
