"""Scaling sweep: drafts trained over training tokens and depth, each measured by speculative decoding.

Two axes of Scylla's log-linear laws (arXiv 2505.07858): (a) training tokens at a fixed depth, from
nested subsets of one cached feature set, and (b) depth D at fixed data (the third, decoding batch
size, needs no training: `hf_scylla.bench.batch_sweep`). Every point trains a fresh
draft with `train_draft`, then decodes the same held-out prompts with `hf_scylla.generate`; its tau is
the acceptance length of those real decodes (checked against plain greedy). Each finished point is
written to ``<output_dir>/points/<name>.json`` at once and skipped on a rerun, so an interrupted
sweep resumes where it stopped; the summary (JSON, Markdown, fits and plots) is rewritten after each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_utils import get_last_checkpoint

from hf_common.reporting import markdown_table, save_json, write_report
from hf_scylla import generation
from hf_scylla.bench.scaling import fit_log_linear, plot_log_linear
from hf_scylla.bench.speed import load_prompt_file
from hf_scylla.candidate_generator import ScyllaStats
from hf_scylla.config import ScyllaDraftConfig
from hf_scylla.data import encode_prompt
from hf_scylla.modeling import ScyllaDraftModel
from hf_scylla.training import FeatureDataset, train_draft

__all__ = [
    "SweepPoint",
    "SweepSettings",
    "encode_eval_prompts",
    "evaluate_tau",
    "plan_points",
    "run_sweep",
    "summarize",
]


@dataclass(frozen=True)
class SweepPoint:
    """One draft to train: depth D on the first ``samples`` cached conversations."""

    depth: int
    samples: int

    @property
    def name(self) -> str:
        return f"D{self.depth}-n{self.samples}"


@dataclass(frozen=True)
class SweepSettings:
    """Training and measurement settings shared by every point (recorded with the results)."""

    samples: tuple[int, ...] = (25, 50, 100, 200)
    tokens_depth: int = 1
    depths: tuple[int, ...] = (1, 2, 3, 4)
    depth_samples: int = 100
    epochs: float = 4.0
    batch_size: int = 4
    learning_rate: float = 1e-3
    unroll_steps: int = 1
    token_weight: float = 0.0
    eval_prompts: int = 8
    max_new_tokens: int = 48
    max_draft_tokens: int = 4

    def measurement(self) -> dict:
        """The settings a point's tau depends on besides its depth and data (training and decoding)."""
        axes = ("samples", "tokens_depth", "depths", "depth_samples")
        return {key: value for key, value in asdict(self).items() if key not in axes}

    def __post_init__(self) -> None:
        if min(self.samples, default=0) < 1 or min(self.depths, default=0) < 1 or self.depth_samples < 1:
            raise ValueError("sample counts and depths must be positive integers")
        if self.eval_prompts < 1 or self.max_new_tokens < 1 or self.max_draft_tokens < 1:
            raise ValueError("eval_prompts, max_new_tokens and max_draft_tokens must be >= 1")


def plan_points(settings: SweepSettings) -> list[SweepPoint]:
    """The tokens axis then the depth axis, without duplicates (a shared point is trained once)."""
    points = [SweepPoint(settings.tokens_depth, samples) for samples in settings.samples]
    points += [SweepPoint(depth, settings.depth_samples) for depth in settings.depths]
    return list(dict.fromkeys(points))


def training_tokens(features: FeatureDataset, samples: int, epochs: float) -> int:
    """Loss-bearing (response) token pairs the draft sees: ``epochs`` passes over the first ``samples``."""
    pairs = sum(int(record["loss_mask"][1:].sum()) for record in features.records[:samples])
    return round(pairs * epochs)


@torch.no_grad()
def evaluate_tau(
    target: PreTrainedModel,
    draft: ScyllaDraftModel,
    prompts: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor],
    max_new_tokens: int,
) -> dict:
    """Decode each prompt with the draft; tau over all cycles, and whether every output equals greedy."""
    total = ScyllaStats()
    mismatches = 0
    for ids, reference in zip(prompts, references, strict=True):
        result = generation.generate(target, draft, ids, max_new_tokens=max_new_tokens, do_sample=False)
        total.merge(result.stats)
        mismatches += int(not torch.equal(result.output, reference))
    return {**total.to_dict(), "lossless": mismatches == 0}


def _greedy_references(
    target: PreTrainedModel, prompts: Sequence[torch.Tensor], max_new_tokens: int, path: Path
) -> list[torch.Tensor]:
    """Plain greedy outputs of ``prompts``, cached at ``path`` (they are the same for every point)."""
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if len(cached) == len(prompts) and all(
            torch.equal(ref[:, : ids.shape[1]], ids) for ref, ids in zip(cached, prompts, strict=True)
        ):
            return cached
    references = [target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False) for ids in prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(references, path)
    return references


def _train_point(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    features: FeatureDataset,
    point: SweepPoint,
    settings: SweepSettings,
    run_dir: Path,
) -> tuple[ScyllaDraftModel, float | None]:
    """Train (or finish training) the point's draft in ``run_dir``; returns it and the training seconds
    (``None`` when a finished draft from an interrupted run is reused)."""
    if (run_dir / "model.safetensors").is_file() and get_last_checkpoint(str(run_dir)) is None:
        draft = ScyllaDraftModel.from_pretrained(run_dir, target=target, target_tokenizer=tokenizer)
        return draft.to(target.device).eval(), None
    torch.manual_seed(0)
    config = ScyllaDraftConfig.from_target_config(target.config, point.depth, tokenizer)
    draft = ScyllaDraftModel(config)
    draft.attach_target(target, tokenizer)
    draft.to(target.device)
    steps = max(1, round(point.samples / settings.batch_size * settings.epochs))
    start = time.perf_counter()
    train_draft(
        draft,
        FeatureDataset(features.records[: point.samples]),
        run_dir,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        unroll_steps=settings.unroll_steps,
        token_weight=settings.token_weight,
        resume=get_last_checkpoint(str(run_dir)) is not None if run_dir.is_dir() else False,
        warmup_steps=max(1, steps // 20),
        save_steps=max(25, steps // 4),
        save_total_limit=1,
        disable_tqdm=True,
    )
    for checkpoint in run_dir.glob("checkpoint-*"):  # the final draft is saved; a finished point needs none
        for file in sorted(checkpoint.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        checkpoint.rmdir()
    return draft.eval(), time.perf_counter() - start


def encode_eval_prompts(
    tokenizer: PreTrainedTokenizerBase, path: Path, count: int, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """The first ``count`` prompts of ``path`` (EAGLE ``question.jsonl`` format) as chat ids on ``device``."""
    return [encode_prompt(tokenizer, question).to(device) for question in load_prompt_file(path, count)]


def run_sweep(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    features: FeatureDataset,
    prompts: Sequence[torch.Tensor],
    settings: SweepSettings,
    work_dir: Path,
    output_dir: Path,
    metadata: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train and measure every planned point not yet in ``output_dir/points``; returns the summary."""
    needed = max(point.samples for point in plan_points(settings))
    if len(features) < needed:
        raise ValueError(f"the sweep needs {needed} cached conversations, got {len(features)}")
    prompts = list(prompts)[: settings.eval_prompts]
    references = _greedy_references(
        target,
        prompts,
        settings.max_new_tokens,
        work_dir / f"greedy-{len(prompts)}x{settings.max_new_tokens}.pt",
    )
    points_dir = output_dir / "points"
    for point in plan_points(settings):
        result_path = points_dir / f"{point.name}.json"
        if result_path.is_file():
            recorded = json.loads(result_path.read_text()).get("settings", settings.measurement())
            if recorded != settings.measurement():
                raise ValueError(
                    f"{result_path} was measured with other settings ({recorded}); use another output folder"
                )
            log(f"{point.name}: done already, skipped")
            continue
        log(f"{point.name}: training depth {point.depth} on {point.samples} conversations")
        draft, train_seconds = _train_point(
            target, tokenizer, features, point, settings, work_dir / point.name
        )
        draft.config.max_draft_tokens = settings.max_draft_tokens
        draft.config.confidence_threshold = 0.0  # fixed-length chains: tau is not shaped by a threshold
        measured = evaluate_tau(target, draft, prompts, references, settings.max_new_tokens)
        record = {
            **asdict(point),
            "name": point.name,
            "training_tokens": training_tokens(features, point.samples, settings.epochs),
            "draft_parameters": sum(
                p.numel()
                for n, p in draft.named_parameters()
                if not n.startswith(("embed_tokens", "lm_head"))
            ),
            "train_seconds": train_seconds,
            **measured,
            "settings": settings.measurement(),
        }
        save_json(result_path, record)
        log(f"{point.name}: tau {record['tau']:.3f}, lossless {record['lossless']}")
        summarize(output_dir, settings, metadata)
    return summarize(output_dir, settings, metadata)


def _axis(records: list[dict], key: str, keep: Callable[[dict], bool]) -> tuple[list[float], list[float]]:
    chosen = sorted((r for r in records if keep(r)), key=lambda r: r[key])
    return [float(r[key]) for r in chosen], [float(r["tau"]) for r in chosen]


def summarize(output_dir: Path, settings: SweepSettings, metadata: dict | None = None) -> dict:
    """Fit both axes from the finished points; write ``sweep.json``, ``sweep.md`` and the PNG plots.

    ``metadata["command"]`` (if any) heads the report with the machine; its other keys go into the JSON.
    """
    records = [json.loads(path.read_text()) for path in (output_dir / "points").glob("*.json")]
    records.sort(key=lambda record: (record["depth"], record["samples"]))
    # Points of earlier runs in the same folder count too: one tokens series at the tokens-axis depth,
    # one depth series per conversation count (e.g. a second run with another --depth-samples).
    axes = {
        "tokens": (
            "training_tokens",
            lambda r: r["depth"] == settings.tokens_depth,
            f"training tokens (depth D={settings.tokens_depth})",
        )
    }
    depth_samples = {settings.depth_samples} | {
        n
        for n in {r["samples"] for r in records}
        if len({r["depth"] for r in records if r["samples"] == n}) > 1
    }
    for n in sorted(depth_samples):
        axes[f"depth_n{n}"] = (
            "depth",
            lambda r, n=n: r["samples"] == n,
            f"draft depth D ({n} conversations)",
        )
    fits = {}
    for axis, (key, keep, label) in axes.items():
        xs, taus = _axis(records, key, keep)
        fit = fit_log_linear(xs, taus) if len(set(xs)) >= 2 else None
        fits[axis] = {"x": key, "points": list(zip(xs, taus, strict=True)), "fit": fit and fit.to_dict()}
        if len(set(xs)) >= 2:  # a single point has no trend to plot
            title = f"Scylla drafts: τ vs {label.split(' (')[0]}"
            plot_log_linear(output_dir / f"tau_vs_{axis}.png", xs, taus, fit, title, label)
    extra = dict(metadata or {})
    command = extra.pop("command", "")
    payload = {
        **extra,
        "settings": asdict(settings),
        "tau_measurement": "speculative decoding (greedy, batch 1, fixed chains of max_draft_tokens) of the "
        "first eval_prompts held-out prompts, max_new_tokens each; tau = tokens per draft-verify cycle",
        "batch_size_axis": "measured with one trained draft by `hf-scylla batch-sweep` (batched decoding, "
        "results/scylla/batch/); training does not depend on it",
        "fits": fits,
        "points": records,
    }
    json_path, _ = write_report(
        output_dir, "sweep", command, payload, "Scylla scaling sweep", _markdown(payload)
    )
    return json.loads(json_path.read_text())


def _markdown(summary: dict) -> str:
    columns = ["name", "depth", "samples", "training_tokens", "draft_parameters", "tau", "cycles"]
    lines = [
        f"tau: {summary['tau_measurement']}.",
        "",
        markdown_table(summary["points"], [*columns, "lossless", "train_seconds"]),
        "| axis | x | points | a | b | R² |",
        "|---|---|---|---|---|---|",
    ]
    for axis, entry in summary["fits"].items():
        fit = entry["fit"]
        cells = [f"{fit['a']:.4f}", f"{fit['b']:.4f}", f"{fit['r2']:.3f}"] if fit else ["n/a", "n/a", "n/a"]
        lines.append(f"| {axis} | {entry['x']} | {len(entry['points'])} | " + " | ".join(cells) + " |")
    lines += ["", f"Batch-size axis: {summary['batch_size_axis']}.", ""]
    return "\n".join(lines)
