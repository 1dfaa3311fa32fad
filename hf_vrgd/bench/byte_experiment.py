"""``hf-vrgd train``, the large-batch experiment: a byte-level Llama trained from scratch on Python standard-library source.

Each optimizer is trained at a small global batch and at a batch ``ratio`` times larger for the same number
of epochs (so ``ratio`` times fewer steps), with the learning rate scaled by ``sqrt(ratio)`` and swept at the
large batch. Every global batch is ``k = batch / micro_batch`` micro-batches through the HF ``Trainer``'s
``gradient_accumulation_steps``; for the VR optimizers each micro-batch backward is one gradient group.
Held-out loss and the loss on a fixed train subset are measured with the same evaluation routine, so
``gap = eval - train`` compares like with like.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_common.cli import CommandError
from hf_common.outputs import claim_outputs
from hf_common.reporting import command_line, markdown_table, save_json, write_report
from hf_vrgd.bench.plan import RunSpec, config_fingerprint, tiny_llama
from hf_vrgd.optimizers import load_optimizer

BYTE_VOCAB = 256
STEM = "large_batch"
TRAIN_OPTIMIZERS = ("adamw", "vr-adamw", "lamb", "vr-lamb", "adam", "vr-adam")
"""The optimizers ``hf-vrgd train`` compares, as names of the one table (`hf_vrgd.optimizers.load_optimizer`)."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that changes a run's result; its hash names the folder that holds finished runs."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    seq_len: int = 64
    train_tokens: int = 98_304
    eval_tokens: int = 16_384
    epochs: float = 4.0
    micro_batch: int = 8
    evals_per_epoch: int = 2
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01

    def fingerprint(self) -> str:
        return config_fingerprint(self)


class ByteBlocks(torch.utils.data.Dataset):
    """Fixed-length byte blocks as causal-LM examples (the labels are the inputs)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}


def stdlib_blocks(seq_len: int, train_tokens: int, eval_tokens: int) -> dict[str, ByteBlocks]:
    """Train, held-out and train-subset byte blocks from the standard library's top-level ``*.py`` files.

    The split is by file: every tenth file (sorted by name) is held out. Each split's files are cut into
    ``seq_len``-byte blocks, pooled and shuffled with a fixed seed, so a few hundred blocks still cover many
    modules. The train subset is the first held-out-sized slice of the train set: seen data, scored by the
    same evaluation routine as the held-out blocks.
    """
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held_out = files[::10]
    train = [f for f in files if f not in held_out]
    generator = torch.Generator().manual_seed(0)

    def shuffled_blocks(paths: list[Path], tokens: int) -> torch.Tensor:
        data = bytearray()
        for path in paths:
            text = path.read_bytes()
            data += text[: len(text) // seq_len * seq_len]
        blocks = torch.frombuffer(data, dtype=torch.uint8).long().view(-1, seq_len)
        wanted = tokens // seq_len
        if wanted > blocks.shape[0]:
            raise ValueError(f"the standard library has {blocks.shape[0]} blocks; {wanted} were asked for")
        return blocks[torch.randperm(blocks.shape[0], generator=generator)[:wanted]]

    train_blocks = shuffled_blocks(train, train_tokens)
    return {
        "train": ByteBlocks(train_blocks),
        "heldout": ByteBlocks(shuffled_blocks(held_out, eval_tokens)),
        "train_subset": ByteBlocks(train_blocks[: eval_tokens // seq_len]),
    }


def build_model(config: ExperimentConfig, seed: int) -> torch.nn.Module:
    """A small byte-level Llama with tied embeddings, initialised from ``seed``."""
    return tiny_llama(config, BYTE_VOCAB, seed)


def plan_runs(
    optimizers: Sequence[str],
    small_batch: int,
    ratio: int,
    base_lrs: dict[str, float],
    lr_multipliers: Sequence[float],
    seeds: Sequence[int],
    sweep_seeds: Sequence[int],
) -> list[RunSpec]:
    """Small batch at the base LR; large batch at ``base * sqrt(ratio) * m`` for each sweep multiplier ``m``.

    The sweep multipliers other than 1 run only for ``sweep_seeds``, to keep the grid affordable.
    """
    large = small_batch * ratio
    runs = []
    for seed in seeds:
        for name in optimizers:
            base = base_lrs[name.removeprefix("vr-")]
            runs.append(RunSpec(name, small_batch, base, 1.0, seed))
            for multiplier in lr_multipliers:
                if multiplier == 1.0 or seed in sweep_seeds:
                    lr = base * math.sqrt(ratio) * multiplier
                    runs.append(RunSpec(name, large, lr, multiplier, seed))
    return list(dict.fromkeys(runs))  # a batch ratio of 1 plans the small-batch runs twice


def train_one(
    spec: RunSpec,
    config: ExperimentConfig,
    train_set: ByteBlocks,
    eval_sets: dict[str, ByteBlocks],
    work_dir: str,
) -> dict:
    """Train one run with the HF Trainer and return its curves and final losses."""
    from transformers import Trainer, TrainingArguments

    if spec.batch % config.micro_batch:
        raise ValueError(f"batch {spec.batch} is not a multiple of the micro-batch {config.micro_batch}")
    groups = spec.batch // config.micro_batch
    steps_per_epoch = len(train_set) // spec.batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch {spec.batch} is larger than the {len(train_set)}-block train set")
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    eval_steps = max(1, steps_per_epoch // config.evals_per_epoch)
    args = TrainingArguments(
        output_dir=work_dir,
        per_device_train_batch_size=config.micro_batch,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=groups,
        max_steps=total_steps,
        learning_rate=spec.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(config.warmup_fraction * total_steps)),
        # No clipping: it would rescale p.grad for the base optimizers but not the VR optimizers'
        # per-group sums, so the comparison would not be like for like.
        max_grad_norm=0.0,
        eval_strategy="steps",
        eval_steps=eval_steps,
        logging_steps=eval_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=spec.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=build_model(config, spec.seed),
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sets,
        # The Trainer passes only these kwargs (not args.learning_rate) to the optimizer class.
        optimizer_cls_and_kwargs=(load_optimizer(spec.optimizer), {"lr": spec.lr}),
    )
    if spec.optimizer.startswith("vr-"):
        from hf_vrgd import GSNRLoggingCallback

        GSNRLoggingCallback.install(trainer, per_layer=False)
    start = time.perf_counter()
    trainer.train()
    final = trainer.evaluate()
    seconds = time.perf_counter() - start
    return _run_record(spec, groups, steps_per_epoch, total_steps, trainer.state.log_history, final, seconds)


def _run_record(
    spec: RunSpec,
    groups: int,
    steps_per_epoch: int,
    total_steps: int,
    history: list[dict],
    final: dict,
    seconds: float,
) -> dict:
    curve = [
        {"step": h["step"], "epoch": h["step"] / steps_per_epoch, "eval_loss": h["eval_heldout_loss"]}
        for h in history
        if "eval_heldout_loss" in h
    ]
    train_curve = [
        {"step": h["step"], "train_loss": h["eval_train_loss"]} for h in history if "eval_train_loss" in h
    ]
    gsnr = [
        {k: v for k, v in h.items() if "gsnr" in k.lower() or k == "step"}
        for h in history
        if any("gsnr" in k.lower() for k in h)
    ]
    eval_loss, train_loss = final["eval_heldout_loss"], final["eval_train_loss"]
    finite = math.isfinite(eval_loss) and math.isfinite(train_loss)
    return {
        **asdict(spec),
        "groups": groups,
        "steps": total_steps,
        "eval_loss": eval_loss,
        "train_loss": train_loss,
        "gap": eval_loss - train_loss if finite else float("nan"),
        "seconds": seconds,
        "eval_curve": curve,
        "train_curve": train_curve,
        "gsnr_log": gsnr,
    }


def _check_arguments(args: argparse.Namespace) -> None:
    problems = []
    if args.batch_ratio < 1:
        problems.append(f"--batch-ratio must be >= 1, got {args.batch_ratio}")
    if args.micro_batch < 1 or args.small_batch < 1:
        problems.append("--micro-batch and --small-batch must be >= 1")
    elif args.small_batch % args.micro_batch:
        problems.append(f"--small-batch {args.small_batch} must be a multiple of --micro-batch")
    if any(name.startswith("vr-") for name in args.optimizers) and args.small_batch < 2 * args.micro_batch:
        problems.append("VR optimizers need >= 2 gradient groups: --small-batch >= 2 x --micro-batch")
    if args.epochs <= 0 or any(m <= 0 for m in args.lr_multipliers):
        problems.append("--epochs and --lr-multipliers must be positive")
    if problems:
        raise CommandError("; ".join(problems))


def run_experiment(args: argparse.Namespace) -> int:
    """Run (or resume) the grid, then write ``large_batch.{json,md}`` and the plots."""
    _check_arguments(args)
    config = ExperimentConfig(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        seq_len=args.seq_len,
        train_tokens=args.train_tokens,
        eval_tokens=args.eval_tokens,
        epochs=args.epochs,
        micro_batch=args.micro_batch,
        evals_per_epoch=args.evals_per_epoch,
    )
    base_lrs = {"adamw": args.lr_adamw, "adam": args.lr_adam, "lamb": args.lr_lamb}
    runs = plan_runs(
        args.optimizers,
        args.small_batch,
        args.batch_ratio,
        base_lrs,
        args.lr_multipliers,
        args.seeds,
        args.sweep_seeds,
    )
    claim_outputs(report_paths(args.output_dir, runs), args.overwrite)
    data = stdlib_blocks(config.seq_len, config.train_tokens, config.eval_tokens)
    train_set = data["train"]
    eval_sets = {"heldout": data["heldout"], "train": data["train_subset"]}
    run_dir = args.output_dir / f"{STEM}_runs" / config.fingerprint()
    records = []
    progress = tqdm(runs, desc="large-batch runs", unit="run")
    for spec in progress:
        path = run_dir / f"{spec.name}.json"
        progress.set_postfix_str(spec.name)
        if path.is_file():
            records.append(json.loads(path.read_text()))
            continue
        with tempfile.TemporaryDirectory() as work_dir:  # the Trainer's output_dir; nothing is kept
            record = train_one(spec, config, train_set, eval_sets, work_dir)
        save_json(path, record)
        records.append(record)
        tqdm.write(f"{spec.name}: eval {record['eval_loss']:.4f} gap {record['gap']:.4f}")
    _write_report(args, config, records)
    return 0


def report_paths(output_dir: Path, runs: Sequence[RunSpec]) -> list[Path]:
    """The files `_write_report` writes: ``large_batch.{json,md}``, the gap plot, one curve plot per batch."""
    batches = sorted({spec.batch for spec in runs if spec.lr_multiplier == 1.0})
    names = [f"{STEM}.json", f"{STEM}.md", f"{STEM}_gap.png", *(f"{STEM}_eval_batch{b}.png" for b in batches)]
    return [output_dir / name for name in names]


def _write_report(args: argparse.Namespace, config: ExperimentConfig, records: list[dict]) -> None:
    from hf_vrgd.plots import plot_eval_curves, plot_gaps

    out = args.output_dir
    n_params = sum(p.numel() for p in build_model(config, 0).parameters())
    payload = {
        "config": asdict(config),
        "parameters": n_params,
        "records": records,
        "summary": summarize(records),
        "vr_minus_base": paired_differences(records),
    }
    columns = ["optimizer", "batch", "groups", "lr", "seed", "steps", "eval_loss", "train_loss", "gap"]
    summary_columns = [
        "optimizer",
        "batch",
        "lr_multiplier",
        "seeds",
        "eval_loss",
        "eval_std",
        "gap",
        "gap_std",
    ]
    paired_columns = ["comparison", "batch", "lr_multiplier", "seeds", "eval_delta", "eval_delta_per_seed"]
    paired_columns += ["gap_delta", "gap_delta_per_seed"]
    body = (
        f"Model: byte-level Llama, {n_params} parameters; config {json.dumps(asdict(config))}\n\n"
        f"## Mean over seeds\n\n{markdown_table(payload['summary'], summary_columns)}\n"
        f"## VR minus base, paired by seed (negative favours VR)\n\n"
        f"{markdown_table(payload['vr_minus_base'], paired_columns)}\n"
        f"## All runs\n\n{markdown_table(records, columns)}"
    )
    command = command_line("hf-vrgd", args.argv)
    write_report(out, STEM, command, payload, "Large-batch experiment", body)
    plot_eval_curves(out / f"{STEM}_eval", records)
    plot_gaps(out / f"{STEM}_gap.png", payload["summary"])
    print(markdown_table(payload["summary"], summary_columns))
    print(markdown_table(payload["vr_minus_base"], paired_columns))
    print(f"Saved {out}/{STEM}.json, .md and {STEM}_*.png")


def summarize(records: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of final eval loss and gap per (optimizer, batch, LR)."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        grouped[(record["optimizer"], record["batch"], record["lr_multiplier"], record["lr"])].append(record)
    rows = []
    for (optimizer, batch, multiplier, lr), group in sorted(grouped.items()):
        eval_losses = [r["eval_loss"] for r in group]
        gaps = [r["gap"] for r in group]
        rows.append(
            {
                "optimizer": optimizer,
                "batch": batch,
                "lr": lr,
                "lr_multiplier": multiplier,
                "seeds": len(group),
                "eval_loss": _mean(eval_losses),
                "eval_std": _std(eval_losses),
                "train_loss": _mean([r["train_loss"] for r in group]),
                "gap": _mean(gaps),
                "gap_std": _std(gaps),
            }
        )
    return rows


def paired_differences(records: list[dict]) -> list[dict]:
    """VR minus base, per (base optimizer, batch, LR multiplier), paired by seed: eval loss and gap.

    Negative numbers favour the VR optimizer. Only seeds that both optimizers ran are paired.
    """
    by_key = {(r["optimizer"], r["batch"], r["lr_multiplier"], r["seed"]): r for r in records}
    rows = []
    for optimizer, batch, multiplier in sorted(
        {(r["optimizer"], r["batch"], r["lr_multiplier"]) for r in records}
    ):
        if not optimizer.startswith("vr-"):
            continue
        base = optimizer.removeprefix("vr-")
        seeds = sorted(
            seed
            for (name, b, m, seed) in by_key
            if (name, b, m) == (optimizer, batch, multiplier) and (base, batch, multiplier, seed) in by_key
        )
        if not seeds:
            continue
        pairs = [
            (by_key[(optimizer, batch, multiplier, s)], by_key[(base, batch, multiplier, s)]) for s in seeds
        ]
        eval_deltas = [vr["eval_loss"] - b["eval_loss"] for vr, b in pairs]
        gap_deltas = [vr["gap"] - b["gap"] for vr, b in pairs]
        rows.append(
            {
                "comparison": f"{optimizer} - {base}",
                "batch": batch,
                "lr_multiplier": multiplier,
                "seeds": len(seeds),
                "eval_delta": _mean(eval_deltas),
                "eval_delta_per_seed": " ".join(f"{d:+.3f}" for d in eval_deltas),
                "gap_delta": _mean(gap_deltas),
                "gap_delta_per_seed": " ".join(f"{d:+.3f}" for d in gap_deltas),
            }
        )
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
