"""Large-batch language modelling on real text: base vs VR AdamW and LAMB at three batch sizes.

A tiny Llama (random init, tied embeddings) learns next-token prediction on SmolLM2's tokens of two
real corpora: Shakespeare (``tinyshakespeare.txt``) and the Python standard library's ``*.py`` files.

* **Splits.** Python files are split by file (sorted by name: every tenth file from the first is test,
  every tenth from the sixth is validation, the rest train). The Shakespeare text is one document split
  by position: the last 10% is test, the 5% before it validation, the head train. Each split takes half
  its token budget from each corpus; documents are joined with the EOS token and cut into blocks.
* **Vocabulary.** Only the tokens that occur in the train split get an embedding row (ids remapped,
  49,152 -> a few thousand), which is what makes this CPU-sized. A held-out token outside that
  vocabulary is fed as one extra ``<unk>`` row and left out of the loss (its share is reported).
* **Plan.** At each batch (largest first) every optimizer runs a learning-rate grid at the first seed,
  centred on ``base_lr * sqrt(batch / smallest batch)``; the learning rate with the lowest *validation*
  loss is then run for the remaining seeds. The test loss (``eval_loss``) and the loss on a fixed train
  subset (``train_loss``) use the same routine, so ``gap = eval_loss - train_loss`` compares like with
  like. Every batch trains the same number of epochs (so a larger batch takes fewer steps), with linear
  warm-up and cosine decay, and no gradient clipping (it would rescale ``p.grad`` for the base
  optimizers but not the VR optimizers' group statistics).
* **Groups.** A global batch is ``batch / micro_batch`` micro-batch backward passes; each is one GSNR
  gradient group of the VR optimizers.

A plain training loop runs the optimizers (the same classes ``optimizer_cls_and_kwargs`` gives the HF
Trainer), so the GSNR statistics can be read after every step rather than at logging steps only.
Each finished run is one JSON record; a rerun skips the finished ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sysconfig
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_common.cli import CommandError
from hf_common.data import shared_data_file
from hf_common.outputs import claim_outputs
from hf_common.reporting import command_line, markdown_table, plt, save_figure, save_json, write_report
from hf_vrgd.bench.plan import RunSpec, config_fingerprint, tiny_llama

LM_OPTIMIZERS = ("adamw", "vr-adamw", "lamb", "vr-lamb")
SOURCES = ("shakespeare", "python")
SPLITS = ("train", "validation", "test")
REPORT_STEM = "lm_experiment"
IGNORE_INDEX = -100
GSNR_KEYS = ("gsnr/mean_multiplier", "gsnr/fraction_at_gamma", "gsnr/fraction_at_one")


@dataclass(frozen=True)
class LMConfig:
    """Everything that changes a run's result; its hash names the folder of finished runs."""

    corpus_key: str
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    seq_len: int = 64
    train_tokens: int = 32_768
    eval_tokens: int = 8_192
    epochs: float = 2.0
    micro_batch: int = 1
    evals_per_run: int = 3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01

    def fingerprint(self) -> str:
        return config_fingerprint(self)


# ---------------------------------------------------------------------------------------------- data


def split_python_files(files: Sequence[Path]) -> dict[str, list[Path]]:
    """Train / validation / test by file: sorted by name, index % 10 == 0 is test, == 5 validation."""
    ordered = sorted(files, key=lambda path: path.name)
    splits: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for index, path in enumerate(ordered):
        split = {0: "test", 5: "validation"}.get(index % 10, "train")
        splits[split].append(path)
    return splits


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    return hashlib.sha1(definition.encode()).hexdigest()


def corpus_key(tokenizer_hash: str, paths: Sequence[Path]) -> str:
    """Cache key of the token ids: the tokenizer's hash and each file's name and content hash."""
    digest = hashlib.sha1(tokenizer_hash.encode())
    for path in sorted(paths):
        digest.update(f"\0{path}\0{hashlib.sha1(path.read_bytes()).hexdigest()}".encode())
    return digest.hexdigest()[:16]


def tokenize_files(tokenizer, paths: Sequence[Path], cache_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Token ids of every file (by path string), cached once in ``cache_dir`` under `corpus_key`."""
    key = corpus_key(tokenizer_fingerprint(tokenizer), paths)
    cache = cache_dir / f"lm-tokens-{key}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True), key
    tokens = {
        str(path): torch.tensor(tokenizer(path.read_text(errors="replace"))["input_ids"], dtype=torch.int32)
        for path in tqdm(paths, desc="tokenizing", unit="file")
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    torch.save(tokens, partial)
    partial.rename(cache)  # an interrupted write never leaves a cache that looks finished
    return tokens, key


def _blocks(documents: Iterator[torch.Tensor], eos: int, tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the documents joined by ``eos``, as ``(n, seq_len)`` blocks."""
    pieces, total = [], 0
    for document in documents:
        pieces += [document.long(), torch.tensor([eos])]
        total += document.numel() + 1
        if total >= tokens:
            break
    joined = torch.cat(pieces)[: tokens // seq_len * seq_len]
    if joined.numel() < seq_len * max(1, tokens // seq_len):
        raise CommandError(f"a split has only {joined.numel()} tokens; {tokens} were asked for")
    return joined.view(-1, seq_len)


def build_splits(
    tokens: dict[str, torch.Tensor],
    text_path: Path,
    python_splits: dict[str, list[Path]],
    config: LMConfig,
    eos: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{split: {source: (n, seq_len) token blocks}}``, half of each split's budget from each source.

    Python files of a split are taken in a fixed shuffled order (seed 0) until the budget is reached.
    """
    text = tokens[str(text_path)]
    cut_validation, cut_test = int(0.85 * text.numel()), int(0.9 * text.numel())
    text_parts = {"train": text[:cut_validation], "validation": text[cut_validation:cut_test]}
    text_parts["test"] = text[cut_test:]
    generator = torch.Generator().manual_seed(0)
    splits = {}
    for split in SPLITS:
        budget = (config.train_tokens if split == "train" else config.eval_tokens) // 2
        files = python_splits[split]
        order = torch.randperm(len(files), generator=generator).tolist()
        python = (tokens[str(files[i])] for i in order)
        splits[split] = {
            "shakespeare": _blocks(iter([text_parts[split]]), eos, budget, config.seq_len),
            "python": _blocks(python, eos, budget, config.seq_len),
        }
    return splits


@dataclass
class Vocabulary:
    """The token ids seen in the train split, renumbered 0..n-1; every other id maps to ``unk`` = n."""

    kept: torch.Tensor
    table: torch.Tensor = field(repr=False)

    @classmethod
    def from_train(cls, train_blocks: torch.Tensor, tokenizer_size: int) -> Vocabulary:
        kept = torch.unique(train_blocks)
        table = torch.full((tokenizer_size,), kept.numel(), dtype=torch.long)
        table[kept] = torch.arange(kept.numel())
        return cls(kept, table)

    @property
    def size(self) -> int:
        """Rows of the model's embedding: the kept tokens plus ``<unk>``."""
        return self.kept.numel() + 1

    def encode(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``: remapped ids, and labels with ``<unk>`` left out of the loss."""
        input_ids = self.table[blocks]
        labels = input_ids.masked_fill(input_ids == self.kept.numel(), IGNORE_INDEX)
        return input_ids, labels


@dataclass
class LMData:
    """Encoded splits: train blocks, the train subset, and per-source validation and test sets."""

    vocabulary: Vocabulary
    train: tuple[torch.Tensor, torch.Tensor]
    eval_sets: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    summary: dict


def prepare_data(
    tokenizer, text_path: Path, python_dir: Path, config_for: Callable[[str], LMConfig], cache_dir: Path
) -> tuple[LMData, LMConfig]:
    """Tokenizes (or loads the cache), splits, restricts the vocabulary and encodes every split."""
    python_files = sorted(python_dir.glob("*.py"))
    if len(python_files) < 10:
        raise CommandError(f"{python_dir} holds {len(python_files)} *.py files; the split needs at least 10")
    tokens, key = tokenize_files(tokenizer, [text_path, *python_files], cache_dir)
    config = config_for(key)
    python_splits = split_python_files(python_files)
    blocks = build_splits(tokens, text_path, python_splits, config, tokenizer.eos_token_id)
    train_blocks = torch.cat([blocks["train"][source] for source in SOURCES])
    vocabulary = Vocabulary.from_train(train_blocks, len(tokenizer))
    subset = torch.randperm(train_blocks.shape[0], generator=torch.Generator().manual_seed(0))
    subset_blocks = train_blocks[subset[: config.eval_tokens // config.seq_len]]
    eval_sets = {"train": {"mixed": vocabulary.encode(subset_blocks)}}
    for split in ("validation", "test"):
        eval_sets[split] = {source: vocabulary.encode(blocks[split][source]) for source in SOURCES}
    oov = {
        f"{split}/{source}": float((labels == IGNORE_INDEX).float().mean())
        for split in ("validation", "test")
        for source, (_, labels) in eval_sets[split].items()
    }
    summary = {
        "tokenizer_vocabulary": len(tokenizer),
        "model_vocabulary": vocabulary.size,
        "held_out_tokens_outside_vocabulary": oov,
        "tokens": {split: {s: int(b.numel()) for s, b in blocks[split].items()} for split in SPLITS},
        "python_files": {split: len(files) for split, files in python_splits.items()},
        "text": str(text_path),
        "python_dir": str(python_dir),
    }
    return LMData(vocabulary, vocabulary.encode(train_blocks), eval_sets, summary), config


# --------------------------------------------------------------------------------------------- model


def build_model(config: LMConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """A small Llama with tied embeddings over the restricted vocabulary, initialised from ``seed``."""
    return tiny_llama(config, vocab_size, seed)


@torch.no_grad()
def mean_token_loss(
    model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], device: torch.device, batch: int = 32
) -> tuple[float, int]:
    """Mean next-token cross entropy (nats) over the scored tokens, and how many tokens were scored."""
    input_ids, labels = data
    total, count = 0.0, 0
    model.eval()
    for start in range(0, input_ids.shape[0], batch):
        ids = input_ids[start : start + batch].to(device)
        targets = labels[start : start + batch, 1:].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        count += int((targets != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1), count


def split_loss(
    model: torch.nn.Module, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Loss of each source and of all of them together (weighted by scored tokens, key ``loss``)."""
    results = {source: mean_token_loss(model, data, device) for source, data in sets.items()}
    tokens = sum(count for _, count in results.values())
    losses = {source: loss for source, (loss, _) in results.items()}
    losses["loss"] = sum(loss * count for loss, count in results.values()) / max(tokens, 1)
    return losses


def build_optimizer(spec: RunSpec, model: torch.nn.Module, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` from hf_vrgd's registry (``adamw`` is torch's, ``lamb`` hf_vrgd's)."""
    from hf_vrgd.optimizers import load_optimizer

    return load_optimizer(spec.optimizer)(model.parameters(), lr=spec.lr, weight_decay=weight_decay)


def train_run(spec: RunSpec, config: LMConfig, data: LMData, device: torch.device) -> dict:
    """Trains one run and returns its record: final losses, gap, the test-loss curve and GSNR statistics."""
    from transformers import get_cosine_schedule_with_warmup

    input_ids, labels = data.train
    steps_per_epoch = input_ids.shape[0] // spec.batch
    if steps_per_epoch < 1:
        raise CommandError(f"batch {spec.batch} is larger than the {input_ids.shape[0]}-block train set")
    groups = spec.batch // config.micro_batch
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    eval_at = {
        max(1, round(total_steps * i / config.evals_per_run)) for i in range(1, config.evals_per_run + 1)
    }
    model = build_model(config, data.vocabulary.size, spec.seed).to(device).train()
    optimizer = build_optimizer(spec, model, config.weight_decay)
    warmup = max(1, round(config.warmup_fraction * total_steps))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    generator = torch.Generator().manual_seed(spec.seed)
    gsnr_sums: dict[str, float] = defaultdict(float)
    curve, window_losses, order = [], [], torch.empty(0, dtype=torch.long)
    start = time.perf_counter()
    for step in range(1, total_steps + 1):
        position = (step - 1) % steps_per_epoch
        if position == 0:
            order = torch.randperm(input_ids.shape[0], generator=generator)
        rows = order[position * spec.batch : (position + 1) * spec.batch]
        step_loss = 0.0
        for micro in rows.split(config.micro_batch):
            ids, targets = input_ids[micro].to(device), labels[micro].to(device)
            loss = model(input_ids=ids, labels=targets).loss / groups
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_losses.append(step_loss)
        if hasattr(optimizer, "gsnr_summary"):
            summary = optimizer.gsnr_summary(per_layer=False)
            for key in GSNR_KEYS:
                gsnr_sums[key] += summary[key]
        if step in eval_at:
            test = split_loss(model, data.eval_sets["test"], device)
            curve.append(
                {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "eval_loss": test["loss"],
                    "batch_loss": statistics.fmean(window_losses),
                }
            )
            window_losses = []
    seconds = time.perf_counter() - start
    test = split_loss(model, data.eval_sets["test"], device)
    validation = split_loss(model, data.eval_sets["validation"], device)
    train = split_loss(model, data.eval_sets["train"], device)
    finite = math.isfinite(test["loss"]) and math.isfinite(train["loss"])
    return {
        **asdict(spec),
        "groups": groups,
        "steps": total_steps,
        "warmup_steps": warmup,
        "eval_loss": test["loss"],
        "eval_loss_per_source": {source: test[source] for source in SOURCES},
        "validation_loss": validation["loss"],
        "train_loss": train["loss"],
        "gap": test["loss"] - train["loss"] if finite else float("nan"),
        "gsnr": {key.removeprefix("gsnr/"): value / total_steps for key, value in gsnr_sums.items()},
        "train_seconds": seconds,
        "eval_curve": curve,
    }


# ---------------------------------------------------------------------------------------------- plan


def lr_grid(
    optimizers: Sequence[str],
    batch: int,
    smallest_batch: int,
    base_lrs: dict[str, float],
    multipliers: Sequence[float],
    seed: int,
) -> list[RunSpec]:
    """The learning-rate grid of one batch: ``base * sqrt(batch / smallest) * m`` for each multiplier."""
    return [
        RunSpec(
            name, batch, base_lrs[name.removeprefix("vr-")] * math.sqrt(batch / smallest_batch) * m, m, seed
        )
        for name in optimizers
        for m in multipliers
    ]


def _selection_loss(record: dict) -> float:
    loss = record["validation_loss"]
    return loss if math.isfinite(loss) else math.inf


def seed_runs(grid_records: Sequence[dict], seeds: Sequence[int]) -> list[RunSpec]:
    """Each (optimizer, batch) at its grid learning rate with the lowest validation loss, for ``seeds``."""
    best: dict[tuple[str, int], dict] = {}
    for record in grid_records:
        key = (record["optimizer"], record["batch"])
        if key not in best or _selection_loss(record) < _selection_loss(best[key]):
            best[key] = record
    return [
        RunSpec(
            optimizer, batch, best[(optimizer, batch)]["lr"], best[(optimizer, batch)]["lr_multiplier"], seed
        )
        for (optimizer, batch) in best
        for seed in seeds
    ]


def run_plan(
    optimizers: Sequence[str],
    batches: Sequence[int],
    base_lrs: dict[str, float],
    multipliers: Sequence[float],
    seeds: Sequence[int],
    run_dir: Path,
    train: Callable[[RunSpec], dict],
) -> list[dict]:
    """Runs the plan, largest batch first: per batch the grid at ``seeds[0]``, then the chosen LRs for the
    other seeds. Runs whose record exists in ``run_dir`` are read, not trained again."""
    total = len(batches) * len(optimizers) * (len(multipliers) + len(seeds) - 1)
    progress = tqdm(total=total, desc="lm runs", unit="run")
    records = []

    def run(specs: list[RunSpec]) -> list[dict]:
        done = []
        for spec in specs:
            path = run_dir / f"{spec.name}.json"
            progress.set_postfix_str(spec.name)
            if path.is_file():
                record = json.loads(path.read_text())
            else:
                record = train(spec)
                save_json(path, record)
                tqdm.write(
                    f"{spec.name}: eval {record['eval_loss']:.4f} val {record['validation_loss']:.4f} "
                    f"gap {record['gap']:.4f} ({record['train_seconds']:.0f} s)"
                )
            progress.update()
            done.append(record)
        return done

    for batch in sorted(batches, reverse=True):
        grid = run(lr_grid(optimizers, batch, min(batches), base_lrs, multipliers, seeds[0]))
        records += grid + run(seed_runs(grid, seeds[1:]))
    progress.close()
    return records


# -------------------------------------------------------------------------------------------- report


def chosen_runs(records: Sequence[dict]) -> list[dict]:
    """The runs at each (optimizer, batch)'s chosen learning rate: the one that ran more than one seed,
    or the grid's best by validation loss when only one seed was run."""
    seeds = {r["seed"] for r in records}
    chosen = {
        (s.optimizer, s.batch): s.lr for s in seed_runs([r for r in records if r["seed"] == min(seeds)], [0])
    }
    return [r for r in records if chosen.get((r["optimizer"], r["batch"])) == r["lr"]]


def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: Sequence[dict]) -> list[dict]:
    """Mean and seed standard deviation of the chosen-LR runs per (optimizer, batch)."""
    grouped: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for record in chosen_runs(records):
        grouped[(record["optimizer"], record["batch"])].append(record)
    rows = []
    for (optimizer, batch), group in sorted(grouped.items(), key=lambda item: (item[0][1], item[0][0])):
        row = {"optimizer": optimizer, "batch": batch, "lr": group[0]["lr"], "steps": group[0]["steps"]}
        row["groups"], row["seeds"] = group[0]["groups"], len(group)
        for key in ("eval_loss", "train_loss", "gap"):
            values = [r[key] for r in group]
            row[key], row[f"{key}_std"] = statistics.fmean(values), _spread(values)
        for source in SOURCES:
            row[f"eval_{source}"] = statistics.fmean(r["eval_loss_per_source"][source] for r in group)
        for key in ("mean_multiplier", "fraction_at_gamma"):
            if group[0]["gsnr"]:
                row[f"gsnr_{key}"] = statistics.fmean(r["gsnr"][key] for r in group)
        rows.append(row)
    return rows


def compare(summary: Sequence[dict], records: Sequence[dict]) -> list[dict]:
    """VR minus base per batch at each one's chosen LR, paired by seed; ``clear`` when the VR optimizer
    is lower in both eval loss and gap by more than the larger of the two seed spreads."""
    by_key = {(row["optimizer"], row["batch"]): row for row in summary}
    runs = {(r["optimizer"], r["batch"], r["seed"]): r for r in chosen_runs(records)}
    rows = []
    for (optimizer, batch), vr in by_key.items():
        base = by_key.get((optimizer.removeprefix("vr-"), batch))
        if not optimizer.startswith("vr-") or base is None:
            continue
        row = {"comparison": f"{optimizer} - {base['optimizer']}", "batch": batch}
        seeds = sorted(
            s for (o, b, s) in runs if (o, b) == (optimizer, batch) and (base["optimizer"], b, s) in runs
        )
        clear = True
        for key in ("eval_loss", "gap"):
            deltas = [
                runs[(optimizer, batch, s)][key] - runs[(base["optimizer"], batch, s)][key] for s in seeds
            ]
            spread = max(vr[f"{key}_std"], base[f"{key}_std"])
            row[f"{key}_delta"], row[f"{key}_spread"] = vr[key] - base[key], spread
            row[f"{key}_delta_per_seed"] = " ".join(f"{d:+.3f}" for d in deltas)
            clear = clear and vr[key] - base[key] < -spread
        row["vr_better_beyond_spread"] = clear and len(seeds) > 1
        rows.append(row)
    return sorted(rows, key=lambda row: (row["batch"], row["comparison"]))


def plot_results(path: Path, summary: Sequence[dict], records: Sequence[dict]) -> Path:
    """Test-loss curves (mean over seeds at the chosen LR) per batch, and final test loss vs batch."""
    batches = sorted({row["batch"] for row in summary})
    optimizers = list(
        dict.fromkeys(row["optimizer"] for row in sorted(summary, key=lambda r: r["optimizer"]))
    )
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.2 * (len(batches) + 1), 4.0))
    curves: dict[tuple[str, int], dict[int, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for record in chosen_runs(records):
        for point in record["eval_curve"]:
            curves[(record["optimizer"], record["batch"])][point["step"]].append(
                (point["epoch"], point["eval_loss"])
            )
    for ax, batch in zip(axes, batches, strict=False):
        for index, optimizer in enumerate(optimizers):
            points = curves.get((optimizer, batch), {})
            xs = [points[s][0][0] for s in sorted(points)]
            ys = [statistics.fmean(loss for _, loss in points[s]) for s in sorted(points)]
            ax.plot(xs, ys, marker="o", color=f"C{index}", label=optimizer)
        ax.set(title=f"batch {batch} sequences", xlabel="epoch", ylabel="test loss (nats/token)")
        ax.grid(alpha=0.3)
    final = axes[-1]
    for index, optimizer in enumerate(optimizers):
        rows = [row for row in summary if row["optimizer"] == optimizer]
        final.errorbar(
            [row["batch"] for row in rows],
            [row["eval_loss"] for row in rows],
            yerr=[row["eval_loss_std"] for row in rows],
            marker="o",
            capsize=4,
            color=f"C{index}",
            label=optimizer,
        )
    final.set_xscale("log", base=2)
    final.set(
        title="final test loss (mean ± seed std)", xlabel="global batch (sequences)", ylabel="test loss"
    )
    final.grid(alpha=0.3)
    return save_figure(fig, path)


def _report_body(payload: dict) -> str:
    config, data = payload["config"], payload["data"]
    summary_columns = ["optimizer", "batch", "groups", "steps", "lr", "seeds", "eval_loss", "eval_loss_std"]
    summary_columns += ["train_loss", "gap", "gap_std", "eval_shakespeare", "eval_python"]
    summary_columns += ["gsnr_mean_multiplier", "gsnr_fraction_at_gamma"]
    compare_columns = [
        "comparison",
        "batch",
        "eval_loss_delta",
        "eval_loss_spread",
        "eval_loss_delta_per_seed",
    ]
    compare_columns += ["gap_delta", "gap_spread", "gap_delta_per_seed", "vr_better_beyond_spread"]
    grid = [r for r in payload["records"] if r["seed"] == min(r["seed"] for r in payload["records"])]
    grid_columns = ["optimizer", "batch", "lr_multiplier", "lr", "validation_loss", "eval_loss", "gap"]
    return (
        f"Model: Llama, {payload['parameters']:,} parameters (hidden {config['hidden_size']}, "
        f"{config['num_layers']} layers, tied embeddings over {data['model_vocabulary']:,} of the tokenizer's "
        f"{data['tokenizer_vocabulary']:,} tokens: those in the train split, plus `<unk>`).\n\n"
        f"Data (tokens per split and source): {json.dumps(data['tokens'])}; Python files per split: "
        f"{json.dumps(data['python_files'])}; held-out tokens outside the vocabulary (not scored): "
        f"{json.dumps({k: round(v, 4) for k, v in data['held_out_tokens_outside_vocabulary'].items()})}.\n\n"
        f"Config: {json.dumps(config)}\n\n"
        "Losses are nats per token. `eval_loss` is the test split, `gap` = test - train-subset loss, the "
        "learning rate is chosen on the validation split at the first seed; `_std` is the standard "
        "deviation over seeds. GSNR columns: the mean over all steps of the step's mean multiplier and of "
        "the fraction of elements clipped to gamma.\n\n"
        f"## At the chosen learning rate\n\n{markdown_table(payload['summary'], summary_columns)}\n"
        "## VR minus base (negative favours VR), paired by seed\n\n"
        f"{markdown_table(payload['vr_minus_base'], compare_columns)}\n"
        f"## Learning-rate grid (first seed)\n\n{markdown_table(grid, grid_columns)}\n"
        f"![curves]({REPORT_STEM}.png)\n\n![gap]({REPORT_STEM}_gap.png)\n"
    )


def write_lm_report(args: argparse.Namespace, config: LMConfig, data: LMData, records: list[dict]) -> None:
    """``lm_experiment.{json,md,png}`` and ``lm_experiment_gap.png`` in the output folder."""
    from hf_vrgd.plots import plot_grouped_bars

    summary = summarize(records)
    payload = {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in build_model(config, data.vocabulary.size, 0).parameters()),
        "data": data.summary,
        "summary": summary,
        "vr_minus_base": compare(summary, records),
        "records": records,
    }
    command = command_line("hf-vrgd", getattr(args, "argv", []))
    title = "Large-batch language modelling: base vs VR optimizers"
    write_report(args.output_dir, REPORT_STEM, command, payload, title, _report_body(payload))
    plot_results(args.output_dir / f"{REPORT_STEM}.png", summary, records)
    optimizers = list(dict.fromkeys(row["optimizer"] for row in summary))
    gaps = {(row["optimizer"], row["batch"]): row["gap"] for row in summary}
    bars = {
        f"batch {b}": [gaps.get((o, b), float("nan")) for o in optimizers]
        for b in sorted({row["batch"] for row in summary})
    }
    plot_grouped_bars(
        args.output_dir / f"{REPORT_STEM}_gap.png",
        optimizers,
        bars,
        "Generalisation gap (test - train)",
        "nats",
    )
    print(markdown_table(payload["vr_minus_base"], ["comparison", "batch", "eval_loss_delta", "gap_delta"]))
    print(f"Saved {args.output_dir}/{REPORT_STEM}.json, .md, .png and {REPORT_STEM}_gap.png")


# ----------------------------------------------------------------------------------------------- CLI


def _check_arguments(args: argparse.Namespace) -> None:
    problems = []
    if min(args.batches) < 1 or args.micro_batch < 1:
        problems.append("--batches and --micro-batch must be >= 1")
    elif any(batch % args.micro_batch for batch in args.batches):
        problems.append(f"every batch must be a multiple of --micro-batch {args.micro_batch}")
    elif any(name.startswith("vr-") for name in args.optimizers) and min(args.batches) < 2 * args.micro_batch:
        problems.append("VR optimizers need >= 2 gradient groups: every batch >= 2 x --micro-batch")
    if args.epochs <= 0 or min(args.lr_multipliers) <= 0 or min(args.lr_adamw, args.lr_lamb) <= 0:
        problems.append("--epochs, the learning rates and --lr-multipliers must be positive")
    if len(set(args.seeds)) != len(args.seeds):
        problems.append("--seeds must be distinct")
    if args.evals_per_run < 1 or not 0 <= args.warmup_fraction < 1:
        problems.append("--evals-per-run must be >= 1 and --warmup-fraction in [0, 1)")
    if args.hidden_size % args.num_heads:
        problems.append(
            f"--hidden-size {args.hidden_size} must be a multiple of --num-heads {args.num_heads}"
        )
    if problems:
        raise CommandError("; ".join(problems))


def run_lm_experiment(args: argparse.Namespace) -> int:
    """Run (or resume) the plan, then write the report."""
    from transformers import AutoTokenizer

    _check_arguments(args)
    claim_outputs(
        [args.output_dir / f"{REPORT_STEM}{suffix}" for suffix in (".json", ".md", ".png", "_gap.png")],
        args.overwrite,
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    text = args.text if args.text is not None else shared_data_file("text", "tinyshakespeare.txt")
    python_dir = args.python_dir if args.python_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    if args.tokenizer is None:
        from hf_common.default_model import default_model_path

        args.tokenizer = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    def config_for(key: str) -> LMConfig:
        return LMConfig(
            corpus_key=key,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            seq_len=args.seq_len,
            train_tokens=args.train_tokens,
            eval_tokens=args.eval_tokens,
            epochs=args.epochs,
            micro_batch=args.micro_batch,
            evals_per_run=args.evals_per_run,
            warmup_fraction=args.warmup_fraction,
            weight_decay=args.weight_decay,
        )

    data, config = prepare_data(tokenizer, text, python_dir, config_for, args.cache_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    records = run_plan(
        args.optimizers,
        args.batches,
        {"adamw": args.lr_adamw, "lamb": args.lr_lamb},
        args.lr_multipliers,
        args.seeds,
        args.output_dir / "runs" / config.fingerprint(),
        lambda spec: train_run(spec, config, data, device),
    )
    write_lm_report(args, config, data, records)
    return 0
