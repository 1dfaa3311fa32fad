"""Speed and acceptance benchmark: Scylla and prompt lookup against plain greedy, checked for losslessness.

Per prompt set (EAGLE's ``question.jsonl`` format: first turn, chat template, temperature 0) every
method decodes the same prompts; a method's output must equal plain greedy's token for token. Speed
is total new tokens over total wall time; ``tokens_per_target_forward`` counts the target's forward
passes with a hook, so it compares drafting methods on equal terms (plain greedy: 1.0).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from hf_common.data import SHARED_DATA_DIR
from hf_common.default_model import load_model_and_tokenizer
from hf_common.few_rows_linear import few_rows_linear_layers
from hf_common.reporting import markdown_table, plot_series, write_report
from hf_scylla import generation
from hf_scylla.candidate_generator import ScyllaStats
from hf_scylla.data import encode_prompt
from hf_scylla.modeling import ScyllaDraftModel
from hf_scylla.training import make_draft
from hf_scylla.tree import TreeConfig

__all__ = [
    "PROMPTS_DIR",
    "MethodResult",
    "bench_draft",
    "bench_report",
    "load_prompt_file",
    "load_prompt_sets",
    "plot_speedups",
    "run_benchmark",
]

PROMPTS_DIR = SHARED_DATA_DIR / "prompts"


def load_prompt_file(path: Path, limit: int | None = None) -> list[str]:
    """The first user turn of each line of one ``question.jsonl``-style file (the first ``limit``)."""
    with path.open() as lines:
        questions = [json.loads(line)["turns"][0] for line in lines if line.strip()]
    return questions[:limit] if limit else questions


def load_prompt_sets(directory: Path, limit: int | None = None) -> dict[str, list[str]]:
    """The first user turn of each line of every ``*.jsonl`` in ``directory``, keyed by file stem."""
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl prompt files in {directory}")
    return {path.stem: load_prompt_file(path, limit) for path in files}


@dataclass
class MethodResult:
    """Totals of one method over one prompt set."""

    method: str
    prompt_set: str
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    target_forwards: int = 0
    mismatches: int = 0
    stats: ScyllaStats = field(default_factory=ScyllaStats)

    def row(self, baseline_tokens_per_second: float) -> dict:
        tokens_per_second = self.new_tokens / self.seconds
        return {
            "set": self.prompt_set,
            "method": self.method,
            "prompts": self.prompts,
            "new_tokens": self.new_tokens,
            "tokens_per_second": tokens_per_second,
            "speedup": tokens_per_second / baseline_tokens_per_second,
            "tokens_per_target_forward": self.new_tokens / self.target_forwards,
            "tau": self.stats.tau if self.stats.cycles else None,
            "acceptance_per_position": self.stats.acceptance_per_position or None,
            "lookup_share": sum(self.stats.lookup) / self.stats.cycles if self.stats.cycles else None,
            "lossless": self.mismatches == 0,
        }


class _ForwardCounter:
    """Counts the target's forward passes through a forward pre-hook."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1


def _methods(
    target: PreTrainedModel,
    draft: ScyllaDraftModel | None,
    draft_name: str,
    prompt_lookup_tokens: int,
    assistant: PreTrainedModel | None,
    assistant_name: str,
    variants: dict[str, tuple[ScyllaDraftModel, dict[str, Any]]],
    few_rows_linear_rows: bool = False,
) -> dict[str, Callable[[torch.Tensor, int], tuple[torch.Tensor, ScyllaStats | None]]]:
    """Name -> ``decode(ids, max_new_tokens) -> (sequence, stats)``; plain greedy first (the baseline).

    ``few_rows_linear_rows`` adds greedy and prompt lookup on `hf_common.few_rows_linear` for every
    input of 1-16 rows (the fairest baselines for drafts, which use it from 2 rows on).
    """

    def transformers_decoder(few_rows: bool, **options: Any):
        def decode(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, None]:
            layers = few_rows_linear_layers(target, min_rows=1) if few_rows else contextlib.nullcontext()
            with layers:
                return target.generate(ids, max_new_tokens=n, do_sample=False, **options), None

        return decode

    lookup = {"prompt_lookup_num_tokens": prompt_lookup_tokens}
    methods = {
        "greedy": transformers_decoder(False),
        f"prompt_lookup_{prompt_lookup_tokens}": transformers_decoder(False, **lookup),
    }
    if few_rows_linear_rows:
        methods["greedy+few-rows-linear"] = transformers_decoder(True)
        methods[f"prompt_lookup_{prompt_lookup_tokens}+few-rows-linear"] = transformers_decoder(
            True, **lookup
        )

    def decoder(variant: ScyllaDraftModel, options: dict[str, Any]):
        def decode_with_draft(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, ScyllaStats]:
            result = generation.generate(target, variant, ids, max_new_tokens=n, do_sample=False, **options)
            return result.output, result.stats

        return decode_with_draft

    if draft is not None:
        methods[draft_name] = decoder(draft, {})
    for name, (variant, options) in variants.items():  # e.g. reduced-vocabulary heads, dynamic trees
        methods[name] = decoder(variant, options)
    if assistant is not None:  # transformers' assisted generation with its default draft-length schedule
        methods[assistant_name] = lambda ids, n: (
            target.generate(ids, max_new_tokens=n, do_sample=False, assistant_model=assistant),
            None,
        )
    return methods


@torch.no_grad()
def run_benchmark(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_sets: dict[str, list[str]],
    draft: ScyllaDraftModel | None = None,
    draft_name: str = "scylla",
    max_new_tokens: int = 128,
    prompt_lookup_tokens: int = 10,
    assistant: PreTrainedModel | None = None,
    assistant_name: str = "assisted",
    variants: dict[str, tuple[ScyllaDraftModel, dict[str, Any]]] | None = None,
    few_rows_linear_rows: bool = False,
) -> list[dict]:
    """One summary row per (prompt set, method), with speedup against plain greedy on the same prompts.

    ``assistant``: a standalone draft LM (e.g. `hf_scylla.standalone`) run through transformers'
    assisted generation, as a baseline next to the Scylla draft and prompt lookup. ``variants``: more
    Scylla methods by name, each a draft and its `hf_scylla.generate` options (``tree=``,
    ``lookup_tokens=``, ``few_rows_linear=False``). ``few_rows_linear_rows``: see `_methods`.
    """
    methods = _methods(
        target,
        draft,
        draft_name,
        prompt_lookup_tokens,
        assistant,
        assistant_name,
        variants or {},
        few_rows_linear_rows,
    )
    counter = _ForwardCounter(target)
    warmup = encode_prompt(tokenizer, "Hello")
    rows = []
    try:
        for decode in methods.values():  # first calls pay one-off costs (allocations, lazy imports)
            decode(warmup, 4)
        for set_name, questions in prompt_sets.items():
            results = {name: MethodResult(name, set_name) for name in methods}
            for question in tqdm(questions, desc=set_name, unit="prompt"):
                ids = encode_prompt(tokenizer, question).to(target.device)
                reference = None
                for name, decode in methods.items():
                    result, forwards_before = results[name], counter.count
                    start = time.perf_counter()
                    sequence, stats = decode(ids, max_new_tokens)
                    result.seconds += time.perf_counter() - start
                    result.target_forwards += counter.count - forwards_before
                    result.prompts += 1
                    result.new_tokens += sequence.shape[1] - ids.shape[1]
                    if stats is not None:
                        result.stats.merge(stats)
                    reference = sequence if reference is None else reference
                    result.mismatches += int(not torch.equal(sequence, reference))
            baseline = results["greedy"].new_tokens / results["greedy"].seconds
            rows += [result.row(baseline) for result in results.values()]
    finally:
        counter.handle.remove()
    return rows


def bench_draft(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint: Path | None = None,
    untrained_depth: int = 1,
    max_draft_tokens: int | None = None,
    confidence_threshold: float | None = None,
    lookup_tokens: int | None = None,
) -> tuple[ScyllaDraftModel, str]:
    """The draft to benchmark and its row name: ``checkpoint``'s, else an untrained one of
    ``untrained_depth`` layers (which measures the drafting overhead), with the given overrides."""
    draft = make_draft(target, tokenizer, untrained_depth, checkpoint).eval()
    overrides = {
        "max_draft_tokens": max_draft_tokens,
        "confidence_threshold": confidence_threshold,
        "lookup_tokens": lookup_tokens,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(draft.config, name, value)
    name = f"scylla:{checkpoint.name}" if checkpoint is not None else f"scylla-untrained-D{untrained_depth}"
    return draft, name


def plot_speedups(path: Path, rows: list[dict], title: str) -> Path:
    """One line per method: speedup against plain greedy on each prompt set."""
    methods = dict.fromkeys(row["method"] for row in rows)
    series = {
        method: (
            [r["set"] for r in rows if r["method"] == method],
            [r["speedup"] for r in rows if r["method"] == method],
        )
        for method in methods
    }
    return plot_series(path, series, title, "prompt set", "speedup vs greedy")


def speed_variants(
    draft: ScyllaDraftModel,
    draft_name: str,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    trees: Sequence[tuple[int, int, int]] = (),
    draft_vocab_size: int | None = None,
    few_rows_linear_rows: bool = False,
    chains: Sequence[tuple[int, int]] = (),
) -> dict[str, tuple[ScyllaDraftModel, dict[str, Any]]]:
    """The extra methods of the bench: name -> (draft, `hf_scylla.generate` options) for the chain
    without prompt lookup (when the draft's config uses it), the draft on ``F.linear`` alone
    (``few_rows_linear_rows``), each ``chains`` shape (draft tokens, lookup tokens), each tree shape
    (depth, top_k, total_tokens), a reduced head, and the trees with it."""
    from hf_scylla.bench.verify_cost import reduced_draft, training_token_counts

    variants = (
        {f"{draft_name}-no-lookup": (draft, {"lookup_tokens": 0})} if draft.config.lookup_tokens else {}
    )
    if few_rows_linear_rows:
        variants[f"{draft_name}-F.linear"] = (draft, {"few_rows_linear": False})
    for draft_tokens, lookup_tokens in chains:
        options = {
            "max_draft_tokens": draft_tokens,
            "confidence_threshold": 0.0,
            "lookup_tokens": lookup_tokens,
        }
        variants[f"{draft_name}+chain{draft_tokens}-lookup{lookup_tokens}"] = (draft, options)
    tree_options = {"x".join(map(str, shape)): {"tree": TreeConfig(*shape)} for shape in trees}
    for shape, options in tree_options.items():
        variants[f"{draft_name}+tree{shape}"] = (draft, options)
    if draft_vocab_size:
        reduced = reduced_draft(draft, target, tokenizer, training_token_counts(tokenizer), draft_vocab_size)
        variants[f"{draft_name}+vocab{draft_vocab_size}"] = (reduced, {})
        for shape, options in tree_options.items():
            variants[f"{draft_name}+vocab{draft_vocab_size}+tree{shape}"] = (reduced, options)
    return variants


def bench_report(
    model_name: str,
    prompts_dir: Path,
    output_dir: Path,
    command: str,
    *,
    draft: Path | None = None,
    untrained_depth: int = 1,
    max_draft_tokens: int | None = None,
    confidence_threshold: float | None = None,
    lookup_tokens: int | None = None,
    assistant: Path | None = None,
    limit: int | None = None,
    max_new_tokens: int = 128,
    prompt_lookup_tokens: int = 10,
    chains: Sequence[tuple[int, int]] = (),
    trees: Sequence[tuple[int, int, int]] = (),
    draft_vocab_size: int | None = None,
    few_rows_linear_rows: bool = False,
) -> tuple[list[dict], str]:
    """Load the target, run `run_benchmark` on the prompt sets of ``prompts_dir`` and write
    ``bench.json``, ``bench.md`` and ``bench.png`` into ``output_dir``; returns the rows and the table.

    ``chains``, ``trees`` and ``draft_vocab_size`` add `speed_variants` of the draft;
    ``few_rows_linear_rows`` adds greedy and prompt lookup on `hf_common.few_rows_linear` and the draft
    without it."""
    target, tokenizer = load_model_and_tokenizer(model_name)
    scylla_draft, draft_name = bench_draft(
        target, tokenizer, draft, untrained_depth, max_draft_tokens, confidence_threshold, lookup_tokens
    )
    assistant_model = None
    if assistant is not None:
        assistant_model = AutoModelForCausalLM.from_pretrained(assistant, dtype=target.dtype)
        assistant_model = assistant_model.to(target.device).eval()
    rows = run_benchmark(
        target,
        tokenizer,
        load_prompt_sets(prompts_dir, limit),
        draft=scylla_draft,
        draft_name=draft_name,
        max_new_tokens=max_new_tokens,
        prompt_lookup_tokens=prompt_lookup_tokens,
        assistant=assistant_model,
        assistant_name=f"assisted:{assistant.name}" if assistant is not None else "assisted",
        variants=speed_variants(
            scylla_draft,
            draft_name,
            target,
            tokenizer,
            trees=trees,
            draft_vocab_size=draft_vocab_size,
            few_rows_linear_rows=few_rows_linear_rows,
            chains=chains,
        ),
        few_rows_linear_rows=few_rows_linear_rows,
    )
    columns = [
        "set",
        "method",
        "prompts",
        "tokens_per_second",
        "speedup",
        "tokens_per_target_forward",
        "tau",
        "lookup_share",
    ]
    table = markdown_table(rows, [*columns, "lossless"])
    title = f"Speculative decoding on {model_name}, greedy, {max_new_tokens} new tokens"
    write_report(output_dir, "bench", command, {"rows": rows}, title, table)
    plot_title = f"{model_name.split('/')[-1]}, greedy, {max_new_tokens} new tokens"
    plot_speedups(output_dir / "bench.png", rows, plot_title)
    return rows, table
