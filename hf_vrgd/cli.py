"""The ``hf-vrgd`` command line: bench, bench-model, small-k, train, lm (plus demo and env).

This module only parses and calls: each command's arguments are declared here, and its ``run_*``
function lives in `hf_vrgd.bench` (imported when the command runs). The ``demo`` command comes from
`hf_common.demo`, whose parts declare their own arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hf_common.cli import COMMON_COMMANDS, Command, run_cli
from hf_common.demo import demo_command
from hf_common.outputs import RUNS_DIR, add_output_arguments

DESCRIPTION = "VRGD variance-reduced optimizers (arXiv 2309.13681) for the Hugging Face Trainer."


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-vrgd bench``."""
    from hf_vrgd.bench.micro import BENCH_OPTIMIZERS

    parser.add_argument("--params", type=int, default=100_000_000, help="Target model size (parameters).")
    parser.add_argument("--groups", type=int, default=4, help="Gradient groups (backward passes) per step.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed iterations per optimizer.")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=BENCH_OPTIMIZERS,
        default=list(BENCH_OPTIMIZERS),
        help="VR optimizers.",
    )
    parser.add_argument("--cpu", action="store_true", help="Benchmark on the CPU even when CUDA is present.")
    add_output_arguments(parser, RUNS_DIR / "vrgd" / "bench")


def add_real_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-vrgd bench-model``."""
    from hf_vrgd.bench.real_model import DEFAULT_DATA, PAIR_SETTINGS

    parser.add_argument(
        "--model", default=None, help="Model id or folder (default: the embedded SmolLM2-135M)."
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K train.jsonl.")
    parser.add_argument(
        "--optimizers", nargs="+", choices=tuple(PAIR_SETTINGS), default=["adamw"], help="Base/VR pairs."
    )
    parser.add_argument(
        "--micro-batches", type=int, default=4, help="Micro-batches (gradient groups) per step."
    )
    parser.add_argument("--rows", type=int, default=2, help="Rows per micro-batch.")
    parser.add_argument("--max-length", type=int, default=256, help="Tokens per row at most.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed iterations per configuration.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed iterations per configuration.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    add_output_arguments(parser, RUNS_DIR / "vrgd" / "real_model")


def add_small_k_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-vrgd small-k``."""
    parser.add_argument("--elements", type=int, default=200_000, help="Elements of the synthetic tensor.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds averaged per point.")
    parser.add_argument("--gamma", type=float, default=0.1, help="Lower clip of the multiplier.")
    add_output_arguments(parser, RUNS_DIR / "vrgd" / "small_k")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-vrgd train``; the defaults are the committed experiment."""
    from hf_vrgd.bench.byte_experiment import TRAIN_OPTIMIZERS, ExperimentConfig

    defaults = ExperimentConfig()
    parser.add_argument(
        "--optimizers", nargs="+", choices=TRAIN_OPTIMIZERS, default=["adamw", "vr-adamw", "lamb", "vr-lamb"]
    )
    parser.add_argument("--small-batch", type=int, default=16, help="Small global batch (sequences).")
    parser.add_argument("--batch-ratio", type=int, default=16, help="Large batch = small batch x this.")
    parser.add_argument("--micro-batch", type=int, default=defaults.micro_batch, help="Sequences per group.")
    parser.add_argument("--lr-adamw", type=float, default=2e-3, help="Small-batch LR of AdamW/VR-AdamW.")
    parser.add_argument("--lr-adam", type=float, default=2e-3, help="Small-batch LR of Adam/VR-Adam.")
    parser.add_argument("--lr-lamb", type=float, default=2e-2, help="Small-batch LR of LAMB/VR-LAMB.")
    parser.add_argument(
        "--lr-multipliers",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 2.0],
        help="Large-batch sweep around base * sqrt(ratio).",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the 1x-LR runs.")
    parser.add_argument(
        "--sweep-seeds", type=int, nargs="*", default=[0], help="Seeds that also run the LR sweep."
    )
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--train-tokens", type=int, default=defaults.train_tokens, help="Train bytes.")
    parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens, help="Held-out bytes.")
    parser.add_argument("--evals-per-epoch", type=int, default=defaults.evals_per_epoch)
    add_output_arguments(parser, RUNS_DIR / "vrgd" / "large_batch")


def add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-vrgd lm``; the defaults are the committed CPU experiment."""
    from hf_vrgd.bench.lm_experiment import LM_OPTIMIZERS, LMConfig

    defaults = LMConfig(corpus_key="")
    parser.add_argument("--optimizers", nargs="+", choices=LM_OPTIMIZERS, default=list(LM_OPTIMIZERS))
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[4, 16, 64], help="Global batches (sequences)."
    )
    parser.add_argument(
        "--micro-batch", type=int, default=defaults.micro_batch, help="Sequences per GSNR group."
    )
    parser.add_argument(
        "--lr-adamw", type=float, default=2e-3, help="AdamW/VR-AdamW LR at the smallest batch."
    )
    parser.add_argument("--lr-lamb", type=float, default=2e-2, help="LAMB/VR-LAMB LR at the smallest batch.")
    parser.add_argument(
        "--lr-multipliers",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 2.0],
        help="Grid around the sqrt-scaled LR.",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="The first also runs the grid."
    )
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="Tokens per sequence.")
    parser.add_argument("--train-tokens", type=int, default=defaults.train_tokens)
    parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens, help="Per held-out split.")
    parser.add_argument(
        "--evals-per-run", type=int, default=defaults.evals_per_run, help="Test-curve points."
    )
    parser.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument(
        "--text", type=Path, default=None, help="Text corpus (default: shared tinyshakespeare)."
    )
    parser.add_argument("--python-dir", type=Path, default=None, help="*.py corpus (default: the stdlib).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder or Hub ID (default: SmolLM2's).")
    parser.add_argument("--cache-dir", type=Path, default=RUNS_DIR / "vrgd" / "cache", help="Token-id cache.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present).")
    add_output_arguments(parser, RUNS_DIR / "vrgd" / "lm")


def _run_bench(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.micro import run_bench

    return run_bench(args)


def _run_real_model(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.real_model import run_real_model_bench

    return run_real_model_bench(args)


def _run_small_k(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.small_k import run_small_k

    return run_small_k(args)


def _run_train(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.byte_experiment import run_experiment

    return run_experiment(args)


def _run_lm(args: argparse.Namespace) -> int:
    from hf_vrgd.bench.lm_experiment import run_lm_experiment

    return run_lm_experiment(args)


COMMANDS = (
    *COMMON_COMMANDS,
    demo_command("VRGD demo: a few steps of VR-AdamW vs AdamW fine-tuning on GSM8K.", "hf_vrgd.demo"),
    Command(
        "bench",
        "Micro-benchmark: step time and memory of each VR optimizer against its base (synthetic loss).",
        add_bench_arguments,
        _run_bench,
    ),
    Command(
        "bench-model",
        "Real fine-tuning step (SmolLM2-135M, chat GSM8K, 4 micro-batches): base vs VR time and memory.",
        add_real_model_arguments,
        _run_real_model,
    ),
    Command(
        "small-k",
        "How many multipliers clip to gamma with few gradient groups K (Gaussian group gradients).",
        add_small_k_arguments,
        _run_small_k,
    ),
    Command(
        "train",
        "Large-batch experiment: base vs VR optimizers at a small and a 16x batch (resumable).",
        add_train_arguments,
        _run_train,
    ),
    Command(
        "lm",
        "Large-batch language modelling on real text: base vs VR AdamW/LAMB at 3 batches, 3 seeds (resumable).",
        add_lm_arguments,
        _run_lm,
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-vrgd", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
