"""Batch-size axis of Scylla's laws: one trained draft decoded at several batch sizes and draft lengths.

Scylla's third law (arXiv 2505.07858, Thm 1.3) says the throughput-optimal draft width shrinks
log-linearly with the decoding batch size, and the acceptance length at that optimum falls with it.
For every batch size B the same prompts are split into left-padded batches of B; plain batched greedy
(``generate``) gives the baseline speed and the reference outputs, then `batched_generate` decodes
them with chains of each draft length k. A point records tau, tokens/s, speedup over greedy at the
same B and whether every output equalled greedy. The summary fits tau and the best k against ln B.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_common.reporting import markdown_table, plot_series, write_report
from hf_scylla.batched import batched_generate
from hf_scylla.bench.scaling import fit_log_linear, plot_log_linear
from hf_scylla.bench.speed import load_prompt_sets
from hf_scylla.candidate_generator import ScyllaStats
from hf_scylla.modeling import ScyllaDraftModel

__all__ = ["interleaved_prompts", "left_padded_batches", "run_batch_sweep", "summarize_batch_sweep"]


def left_padded_batches(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """One-turn chats with the generation prompt, in consecutive left-padded batches of ``batch_size``
    (``input_ids`` and ``attention_mask`` on ``device``)."""
    if batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size}")
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        encoded = [
            tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            for i in range(0, len(texts), batch_size)
        ]
    finally:
        tokenizer.padding_side = side
    return [
        {key: encoded_batch[key].to(device) for key in ("input_ids", "attention_mask")}
        for encoded_batch in encoded
    ]


def _greedy(
    target: PreTrainedModel, batches: list[dict], max_new_tokens: int, pad: int
) -> tuple[list, float, int]:
    """Plain batched greedy outputs, wall seconds, and new tokens (up to each row's EOS)."""
    eos = torch.tensor(target.generation_config.eos_token_id).flatten()
    outputs, tokens, start = [], 0, time.perf_counter()
    for batch in batches:
        output = target.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        outputs.append(output)
        for row in output[:, batch["input_ids"].shape[1] :]:
            stops = torch.isin(row, eos).nonzero()
            tokens += int(stops[0]) + 1 if len(stops) else len(row)
    return outputs, time.perf_counter() - start, tokens


@torch.no_grad()
def interleaved_prompts(prompts_dir: Path, limit: int | None = None) -> list[str]:
    """The first ``limit`` prompts of each set in ``prompts_dir``, interleaved so that every batch mixes
    the sets (as a server's batch would)."""
    prompt_sets = load_prompt_sets(prompts_dir, limit)
    return [question for group in zip(*prompt_sets.values(), strict=False) for question in group]


def run_batch_sweep(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    draft: ScyllaDraftModel,
    questions: Sequence[str],
    batch_sizes: Sequence[int],
    draft_lengths: Sequence[int],
    max_new_tokens: int,
    output_dir: Path,
    metadata: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every (batch size, draft length) point; writes and returns the summary after each B."""
    if not questions or min(batch_sizes, default=0) < 1 or min(draft_lengths, default=0) < 1:
        raise ValueError("need prompts, and batch sizes and draft lengths >= 1")
    pad = target.generation_config.pad_token_id
    pad = tokenizer.pad_token_id if pad is None else pad
    device = target.device
    warmup = left_padded_batches(tokenizer, questions[:1], 1, device)[0]
    target.generate(**warmup, max_new_tokens=4, do_sample=False, pad_token_id=pad)
    points = []
    progress = tqdm(total=len(batch_sizes) * (len(draft_lengths) + 1), desc="batch sweep", unit="run")
    for batch_size in batch_sizes:
        batches = left_padded_batches(tokenizer, questions, batch_size, device)
        references, greedy_seconds, greedy_tokens = _greedy(target, batches, max_new_tokens, pad)
        greedy_speed = greedy_tokens / greedy_seconds
        progress.update()
        log(f"B={batch_size}: greedy {greedy_speed:.2f} tok/s")
        for length in draft_lengths:
            total, mismatches = ScyllaStats(), 0
            for batch, reference in zip(batches, references, strict=True):
                result = batched_generate(
                    target,
                    draft,
                    **batch,
                    max_new_tokens=max_new_tokens,
                    draft_tokens=length,
                    pad_token_id=pad,
                )
                total.merge(result.stats)
                mismatches += int(not torch.equal(result.sequences, reference))
            point = {
                "batch_size": batch_size,
                "draft_tokens": length,
                **total.to_dict(),
                "greedy_tokens_per_second": greedy_speed,
                "speedup": total.tokens_per_second / greedy_speed,
                "lossless": mismatches == 0 and total.new_tokens == greedy_tokens,
            }
            points.append(point)
            progress.update()
            log(f"B={batch_size} k={length}: tau {point['tau']:.3f}, speedup {point['speedup']:.2f}")
        summary = summarize_batch_sweep(
            output_dir,
            points,
            {**(metadata or {}), "prompts": len(questions), "max_new_tokens": max_new_tokens},
        )
    progress.close()
    return summary


def summarize_batch_sweep(output_dir: Path, points: list[dict], metadata: dict) -> dict:
    """Fits against ln B (tau per draft length; the throughput-optimal k and its tau), JSON, Markdown, plots.

    ``metadata["command"]`` (if any) heads the report with the machine; its other keys go into the JSON.
    """
    batch_sizes = sorted({p["batch_size"] for p in points})
    lengths = sorted({p["draft_tokens"] for p in points})
    best = [max((p for p in points if p["batch_size"] == b), key=lambda p: p["speedup"]) for b in batch_sizes]

    def fit(xs: list[float], ys: list[float]) -> dict | None:
        return fit_log_linear(xs, ys).to_dict() if len(set(xs)) >= 2 else None

    fits = {
        f"tau_k{k}": fit(
            [p["batch_size"] for p in points if p["draft_tokens"] == k],
            [p["tau"] for p in points if p["draft_tokens"] == k],
        )
        for k in lengths
    }
    fits["best_draft_tokens"] = fit(batch_sizes, [p["draft_tokens"] for p in best])
    fits["tau_at_best"] = fit(batch_sizes, [p["tau"] for p in best])
    extra = dict(metadata)
    command = extra.pop("command", "")
    summary = {**extra, "fits": fits, "best": best, "points": points}
    per_k = {f"k={k}": [p for p in points if p["draft_tokens"] == k] for k in lengths}
    plot_series(
        output_dir / "speedup_vs_batch.png",
        {name: ([p["batch_size"] for p in ps], [p["speedup"] for p in ps]) for name, ps in per_k.items()},
        "Scylla batched decoding: speedup over batched greedy",
        "batch size B",
        "speedup",
        baselines={"greedy": 1.0},
        log_x=True,
    )
    plot_series(
        output_dir / "tau_vs_batch.png",
        {name: ([p["batch_size"] for p in ps], [p["tau"] for p in ps]) for name, ps in per_k.items()},
        "Scylla batched decoding: acceptance length per row",
        "batch size B",
        "acceptance length τ",
        log_x=True,
    )
    if len(batch_sizes) >= 2:
        best_fit = fit_log_linear(batch_sizes, [p["tau"] for p in best])
        plot_log_linear(
            output_dir / "tau_at_best_vs_batch.png",
            batch_sizes,
            [p["tau"] for p in best],
            best_fit,
            "τ at the throughput-optimal draft length",
            "batch size B",
        )
    json_path, _ = write_report(
        output_dir, "batch_sweep", command, summary, "Scylla batch-size sweep", _markdown(summary)
    )
    return json.loads(json_path.read_text())


def _markdown(summary: dict) -> str:
    lines = []
    for key in ("draft", "prompts", "max_new_tokens"):
        if key in summary:
            lines.append(f"{key.replace('_', ' ').capitalize()}: `{summary[key]}`\n")
    columns = ["batch_size", "draft_tokens", "tau", "tokens_per_target_forward", "tokens_per_second"]
    lines += [
        markdown_table(summary["points"], [*columns, "greedy_tokens_per_second", "speedup", "lossless"]),
        "Throughput-optimal draft length per batch size:",
        "",
        markdown_table(summary["best"], ["batch_size", "draft_tokens", "tau", "speedup"]),
        "| fit vs ln B | a | b | R² |",
        "|---|---|---|---|",
    ]
    for name, fit in summary["fits"].items():
        cells = [f"{fit['a']:.4f}", f"{fit['b']:.4f}", f"{fit['r2']:.3f}"] if fit else ["n/a"] * 3
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])
