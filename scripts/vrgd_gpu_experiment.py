"""``hf-vrgd lm`` at GPU scale: the same plan as the committed CPU experiment, a larger model and batch.

Sized for one GPU call of about 8 minutes (not yet run: no GPU was lent when it was written). The model is
a 4-layer, 256-wide Llama; the global batches are 64, 256 and 1024 sequences of 128 tokens (4, 16 and 64
GSNR groups of 16 sequences) over 4 epochs of 524,288 train tokens. Runs are resumable, so a call that
runs out of time continues where it stopped when it is started again with the same arguments.

    python scripts/vrgd_gpu_experiment.py --dry-run          # the plan: runs, steps, micro-batch passes
    python scripts/vrgd_gpu_experiment.py --output-dir results/vrgd/lm_gpu --overwrite
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_common.cli import build_parser
from hf_vrgd import cli

SCALES = {
    "gpu": [
        "--batches", "64", "256", "1024", "--micro-batch", "16",
        "--hidden-size", "256", "--num-layers", "4", "--num-heads", "8", "--seq-len", "128",
        "--train-tokens", "524288", "--eval-tokens", "32768", "--epochs", "4", "--evals-per-run", "4",
    ],
    "tiny": [
        "--batches", "4", "16", "--micro-batch", "2",
        "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2", "--seq-len", "8",
        "--train-tokens", "256", "--eval-tokens", "64", "--epochs", "1", "--evals-per-run", "1",
    ],
}  # fmt: skip
"""The experiment's arguments per scale; ``tiny`` checks the plan on a CPU in seconds."""


def experiment_arguments(scale: str, extra: Sequence[str] = ()) -> list[str]:
    """The ``hf-vrgd lm`` command line of ``scale``; ``extra`` (e.g. ``--output-dir``) goes last and wins."""
    return ["lm", *SCALES[scale], *extra]


def plan_summary(arguments: Sequence[str]) -> dict:
    """How many runs the command trains, the optimizer steps per run at each batch, and the micro-batch
    forward/backward passes of the whole plan (evaluation not counted)."""
    args = build_parser("hf-vrgd", cli.DESCRIPTION, cli.COMMANDS).parse_args(list(arguments))
    blocks = args.train_tokens // args.seq_len
    runs_per_batch = len(args.optimizers) * (len(args.lr_multipliers) + len(args.seeds) - 1)
    steps = {batch: max(1, round(args.epochs * (blocks // batch))) for batch in args.batches}
    passes = sum(runs_per_batch * steps[batch] * batch // args.micro_batch for batch in args.batches)
    return {
        "runs": runs_per_batch * len(args.batches),
        "steps_per_run": steps,
        "groups": {batch: batch // args.micro_batch for batch in args.batches},
        "micro_batch_passes": passes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="gpu")
    parser.add_argument("--dry-run", action="store_true", help="Print the plan and stop.")
    args, extra = parser.parse_known_args(argv)
    default_output = [] if "--output-dir" in extra else ["--output-dir", "runs/vrgd/lm_gpu"]
    arguments = experiment_arguments(args.scale, [*default_output, *extra])
    print(f"hf-vrgd {' '.join(arguments)}\nplan: {plan_summary(arguments)}")
    if args.dry_run:
        return 0
    return cli.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
