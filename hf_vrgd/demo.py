"""VRGD's demo part: a few steps of VR-AdamW against AdamW fine-tuning the model on GSM8K examples.

By default only the top four decoder layers are trained (``--train-layers``), which keeps the backward
pass short enough for a CPU demo.

Both optimizers start from the same weights and see the same batches: each step sums the gradients of
``--groups`` micro-batches (the gradient groups VRGD measures its GSNR across), then steps. It prints
the loss of every step, the time per step and VR-AdamW's mean GSNR multiplier, and restores the weights
afterwards. Run by ``hf-vrgd demo`` and by ``hf-demo`` (see `hf_common.demo` for the part protocol).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_common.cli import CommandError
from hf_common.data import shared_data_file
from hf_vrgd.optimizers import VRAdamW

__all__ = [
    "FineTuneResult",
    "add_demo_arguments",
    "check_demo_arguments",
    "gsm8k_batches",
    "run_demo_part",
    "trained_parameters",
]


@dataclass
class FineTuneResult:
    """What a few fine-tuning steps with one optimizer measured."""

    label: str
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float = float("nan")
    mean_gsnr_multiplier: float | None = None


def gsm8k_batches(
    tokenizer: PreTrainedTokenizerBase, steps: int, groups: int, rows: int, max_length: int
) -> list[list[dict[str, torch.Tensor]]]:
    """``steps`` x ``groups`` micro-batches of ``rows`` GSM8K training examples (question and answer)."""
    needed = steps * groups * rows
    with shared_data_file("gsm8k", "train.jsonl").open(encoding="utf-8") as lines:
        examples = [json.loads(line) for _, line in zip(range(needed), lines, strict=False)]
    texts = [f"Question: {ex['question']}\nAnswer: {ex['answer']}" for ex in examples]
    if len(texts) < needed:
        raise CommandError(f"the GSM8K training file holds {len(texts)} examples, {needed} are needed")
    batches = []
    for start in range(0, needed, rows):
        batch = tokenizer(
            texts[start : start + rows],
            max_length=max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append({**batch, "labels": labels})
    return [batches[step * groups : (step + 1) * groups] for step in range(steps)]


def trained_parameters(model: PreTrainedModel, top_layers: int) -> list[torch.nn.Parameter]:
    """The parameters of the top ``top_layers`` decoder layers (all parameters for 0 or a model without
    a ``layers`` list)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if top_layers == 0 or layers is None:
        return list(model.parameters())
    return [parameter for layer in layers[-top_layers:] for parameter in layer.parameters()]


def _fine_tune(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer, batches: list, label: str
) -> FineTuneResult:
    """One optimizer step per entry of ``batches`` (its micro-batch gradients summed), timed."""
    result = FineTuneResult(label)
    seconds = 0.0
    for step, groups in enumerate(batches, start=1):
        start = time.perf_counter()
        loss_sum = 0.0
        for batch in groups:
            loss = model(**{name: tensor.to(model.device) for name, tensor in batch.items()}).loss
            (loss / len(groups)).backward()
            loss_sum += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        result.losses.append(loss_sum / len(groups))
        print(f"  {label} step {step}: loss {result.losses[-1]:.4f}", flush=True)
    result.seconds_per_step = seconds / len(batches)
    if hasattr(optimizer, "gsnr_summary"):
        result.mean_gsnr_multiplier = optimizer.gsnr_summary(per_layer=False)["gsnr/mean_multiplier"]
    return result


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=3, help="Fine-tuning steps per optimizer.")
    parser.add_argument(
        "--groups",
        type=int,
        default=4,
        help="Gradient groups (micro-batches) per step; VRGD needs 2 or more and warns below 4.",
    )
    parser.add_argument("--rows", type=int, default=1, help="GSM8K examples per micro-batch.")
    parser.add_argument("--train-length", type=int, default=64, help="Tokens kept of each example.")
    parser.add_argument("--lr", type=float, default=1e-5, help="Learning rate of both optimizers.")
    parser.add_argument(
        "--train-layers",
        type=int,
        default=4,
        help="Fine-tune only the top N decoder layers (the backward pass stops there); 0 trains all weights.",
    )


def check_demo_arguments(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.rows < 1 or args.train_length < 2:
        raise CommandError("--steps and --rows must be at least 1, --train-length at least 2")
    if args.groups < 2:
        raise CommandError(
            f"VRGD measures the GSNR across gradient groups: --groups must be >= 2, got {args.groups}"
        )
    if args.train_layers < 0:
        raise CommandError(f"--train-layers must be >= 0 (0 trains every weight), got {args.train_layers}")
    if not args.lr > 0:
        raise CommandError(f"--lr must be a positive number, got {args.lr}")


def run_demo_part(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace
) -> list[FineTuneResult]:
    """AdamW, then VR-AdamW, from the same weights on the same batches; the weights are restored after."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = gsm8k_batches(tokenizer, args.steps, args.groups, args.rows, args.train_length)
    layers = f"the top {args.train_layers} decoder layers" if args.train_layers else "every weight"
    print(
        f"Fine-tuning {layers}: {args.steps} steps of {args.groups} x {args.rows} GSM8K examples "
        f"({args.train_length} tokens), lr {args.lr:g}.",
        flush=True,
    )
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trained = trained_parameters(model, args.train_layers)
    trained_ids = {id(parameter) for parameter in trained}
    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    was_training = model.training
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trained_ids)
    results = []
    try:
        for label, optimizer_cls in (("AdamW", torch.optim.AdamW), ("VR-AdamW", VRAdamW)):
            optimizer = optimizer_cls(trained, lr=args.lr, weight_decay=0.01)
            results.append(_fine_tune(model, optimizer, batches, label))
            model.load_state_dict(weights)
    finally:
        model.train(was_training)
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    print(f"{'optimizer':<12}{'first loss':>12}{'last loss':>12}{'s/step':>9}  mean GSNR multiplier")
    for result in results:
        multiplier = "-" if result.mean_gsnr_multiplier is None else f"{result.mean_gsnr_multiplier:.3f}"
        print(
            f"{result.label:<12}{result.losses[0]:>12.4f}{result.losses[-1]:>12.4f}"
            f"{result.seconds_per_step:>9.2f}  {multiplier}"
        )
    print()
    return results
