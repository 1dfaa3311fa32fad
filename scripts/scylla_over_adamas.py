"""Scylla speculative decoding over an Adamas target: tau, tokens/s, output equality; four methods, one run.

A long chat prompt (the first ``--context-tokens`` tokens of ``--text``, then ``--instruction``) is
answered greedily with ``--max-new-tokens`` tokens by: greedy sdpa, greedy Adamas (``--budget``), Scylla
over sdpa and Scylla over Adamas (the draft in ``--draft``, by default the staged
``model_cards/SmolLM2-135M-Instruct-scylla-D1``).

Adamas runs sparse only for one-token forwards; a Scylla verification forward carries the drafted tokens
plus one, so it runs dense (exact sdpa). The script counts the target's forwards by length to show which
tokens came from sparse steps, and compares every output with the greedy outputs of both attentions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import PreTrainedModel

from hf_adamas import AdamasConfig, apply_adamas
from hf_adamas.cli import SHAKESPEARE
from hf_common import load_model_and_tokenizer
from hf_common.cli import CommandError
from hf_common.demo import GenerationResult, timed_chat_generation
from hf_common.outputs import RUNS_DIR, OutputPathError, add_output_arguments, claim_outputs
from hf_common.reporting import command_line, markdown_table, save_figure, write_report
from hf_scylla.demo import STAGED_DRAFT_NAME, find_staged_draft, scylla_chat

STEM = "scylla_over_adamas"
DEFAULT_INSTRUCTION = "Who speaks first in the passage above, and what do they ask for? Answer briefly."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scylla_over_adamas.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="Target model (default: SmolLM2-135M-Instruct).")
    parser.add_argument(
        "--draft",
        type=Path,
        default=None,
        help=f"Scylla draft folder (default: model_cards/{STAGED_DRAFT_NAME} of this checkout).",
    )
    parser.add_argument(
        "--text", type=Path, default=SHAKESPEARE, help="Text whose first tokens form the passage."
    )
    parser.add_argument("--context-tokens", type=int, default=3072, help="Tokens of --text in the prompt.")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="Question after the passage.")
    parser.add_argument("--budget", type=int, default=256, help="Adamas token budget.")
    parser.add_argument(
        "--dense-layers", type=int, default=AdamasConfig.dense_layers, help="Adamas dense layers."
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate per method.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per method (median time).")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)."
    )
    add_output_arguments(parser, RUNS_DIR / "adamas" / STEM)
    return parser


def check_args(args: argparse.Namespace) -> Path:
    """Validate the arguments before anything loads; returns the draft folder."""
    for name in ("context_tokens", "budget", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.dense_layers < 0 or args.threads < 0:
        raise CommandError("--dense-layers and --threads must not be negative")
    if not args.text.is_file():
        raise CommandError(f"--text {args.text}: no such file")
    draft = args.draft or find_staged_draft()
    if draft is None or not (draft / "config.json").is_file():
        raise CommandError(f"no Scylla draft at {draft or 'model_cards/' + STAGED_DRAFT_NAME} (pass --draft)")
    return draft


class ForwardLengths:
    """Records the number of new tokens of every target forward (a pre-hook on the base model)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.lengths: list[int] = []
        self._handle = model.get_decoder().register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = (
            kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        )
        self.lengths.append(int((tokens if tokens is not None else args[0]).shape[1]))

    def take(self) -> list[int]:
        lengths, self.lengths = self.lengths, []
        return lengths

    def remove(self) -> None:
        self._handle.remove()


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix), None if equal."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def run_methods(args: argparse.Namespace, draft_dir: Path) -> tuple[dict, dict]:
    """The four generations; returns (prompt facts, per-method records)."""
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sdpa")
    passage_ids = tokenizer(args.text.read_text()).input_ids[: args.context_tokens]
    prompt = f"{tokenizer.decode(passage_ids)}\n\n{args.instruction}"
    adamas = AdamasConfig(token_budget=args.budget, dense_layers=args.dense_layers)
    lengths = ForwardLengths(model)
    runs: dict[str, list[GenerationResult]] = {}
    forwards: dict[str, list[int]] = {}
    cpu_seconds: dict[str, list[float]] = {}  # robust to other processes' load, unlike wall time
    for repeat in range(args.repeats):  # round robin, so machine load drifts hit every method alike
        for attention in ("sdpa", "adamas"):
            if attention == "adamas":
                apply_adamas(model, adamas)
            else:
                model.set_attn_implementation("sdpa")
            if repeat == 0:
                timed_chat_generation(model, tokenizer, "Warm up.", 2, label="warm-up")  # one-time costs
            lengths.take()
            label = f"greedy {attention}"
            cpu_start = time.process_time()
            greedy = timed_chat_generation(model, tokenizer, prompt, args.max_new_tokens, label=label)
            cpu_seconds.setdefault(label, []).append(time.process_time() - cpu_start)
            runs.setdefault(label, []).append(greedy)
            forwards[label] = lengths.take()
            cpu_start = time.process_time()
            scylla = scylla_chat(model, tokenizer, prompt, args.max_new_tokens, draft_dir, greedy)
            cpu_seconds.setdefault(f"scylla {attention}", []).append(time.process_time() - cpu_start)
            runs.setdefault(f"scylla {attention}", []).append(scylla)
            forwards[f"scylla {attention}"] = lengths.take()
            print(
                f"run {repeat + 1}/{args.repeats}, {attention}: greedy {greedy.tokens_per_second:.2f} tokens/s, "
                f"scylla {scylla.tokens_per_second:.2f} tokens/s (tau {scylla.tau:.2f})",
                flush=True,
            )
    lengths.remove()
    results = {
        label: runs[label][0] for label in ("greedy sdpa", "greedy adamas", "scylla sdpa", "scylla adamas")
    }
    prompt_tokens = forwards["greedy sdpa"][0]
    sparse_possible = prompt_tokens >= args.budget  # a decode step attends to prompt + 1 keys
    records = {}
    for label, result in results.items():
        steps = forwards[label][1:]  # the first forward is the (dense) prefill
        one_token = sum(1 for n in steps if n == 1)
        seconds = statistics.median(run.seconds for run in runs[label])
        records[label] = {
            "new_tokens": result.new_tokens,
            "seconds": seconds,
            "cpu_seconds": statistics.median(cpu_seconds[label]),
            "tokens_per_cpu_second": result.new_tokens / statistics.median(cpu_seconds[label]),
            "seconds_per_run": [run.seconds for run in runs[label]],
            "tokens_per_second": result.new_tokens / seconds,
            "same_tokens_every_run": all(run.token_ids == result.token_ids for run in runs[label]),
            "tau": result.tau,
            "target_forwards_after_prefill": len(steps),
            "one_token_forwards": one_token,
            "multi_token_forwards": len(steps) - one_token,
            "sparse_forwards": one_token if label.endswith("adamas") and sparse_possible else 0,
            "first_difference_vs_greedy_sdpa": first_difference(
                result.token_ids, results["greedy sdpa"].token_ids
            ),
            "first_difference_vs_greedy_adamas": first_difference(
                result.token_ids, results["greedy adamas"].token_ids
            ),
            "first_difference_vs_scylla_sdpa": first_difference(
                result.token_ids, results["scylla sdpa"].token_ids
            ),
            "token_ids": result.token_ids,
            "text": result.text,
        }
    prompt_facts = {
        "prompt_tokens": prompt_tokens,
        "passage_tokens": len(passage_ids),
        "instruction": args.instruction,
    }
    return prompt_facts, records


def report_body(args: argparse.Namespace, prompt: dict, records: dict) -> str:
    rows = [
        {
            "method": label,
            "tokens/s (wall)": r["tokens_per_second"],
            "tokens/CPU-s": r["tokens_per_cpu_second"],
            "tau": r["tau"] if r["tau"] is not None else "",
            "1-token / multi-token forwards": f"{r['one_token_forwards']} / {r['multi_token_forwards']}",
            "sparse forwards": r["sparse_forwards"],
            "== greedy sdpa": r["first_difference_vs_greedy_sdpa"] is None,
            "== greedy adamas": r["first_difference_vs_greedy_adamas"] is None,
            "first diff vs greedy sdpa / adamas": (
                f"{r['first_difference_vs_greedy_sdpa']} / {r['first_difference_vs_greedy_adamas']}"
            ),
        }
        for label, r in records.items()
    ]
    columns = list(rows[0])
    rate = {label: r["tokens_per_cpu_second"] for label, r in records.items()}
    return (
        f"Prompt: {prompt['prompt_tokens']} tokens ({prompt['passage_tokens']} of `{args.text.name}`, then "
        f'"{args.instruction}", chat template). {args.max_new_tokens} new tokens, greedy. Adamas budget '
        f"{args.budget}, {args.dense_layers} dense layers. Tokens/s: new tokens over the median time of "
        f"{args.repeats} runs (round robin) of the whole `generate()` call, prefill included. Forwards are "
        "the target's after its prefill; a sparse forward is a one-token Adamas forward (verification "
        "forwards carry several tokens and run dense). First diff: index of the first new token that differs "
        "(None: equal).\n\n"
        + markdown_table(rows, columns)
        + f"\nIn tokens per CPU second (one torch thread; the process's CPU time, which other processes' load "
        f"does not inflate, the draft's loading included), Scylla over Adamas runs at "
        f"{rate['scylla adamas'] / rate['scylla sdpa']:.2f}x Scylla over sdpa, "
        f"{rate['scylla adamas'] / rate['greedy adamas']:.2f}x greedy Adamas and "
        f"{rate['scylla adamas'] / rate['greedy sdpa']:.2f}x greedy sdpa.\n"
    )


def plot(path: Path, records: dict, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, (label, record) in enumerate(records.items()):
        tau = f", tau {record['tau']:.2f}" if record["tau"] is not None else ""
        ax.bar(index, record["tokens_per_cpu_second"], color=f"C{index}", label=f"{label}{tau}")
    ax.set_xticks(range(len(records)), list(records), fontsize=8)
    ax.set(title=title, ylabel="new tokens per CPU second (whole generate call)")
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    json_path, md_path, png_path = (args.output_dir / f"{STEM}.{ext}" for ext in ("json", "md", "png"))
    try:
        draft_dir = check_args(args)
        claim_outputs([json_path, md_path, png_path], args.overwrite)
    except (CommandError, OutputPathError) as error:
        parser.error(str(error))  # exits 2, before anything loads
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt, records = run_methods(args, draft_dir)
    command = "python " + command_line("scripts/scylla_over_adamas.py", argv)
    payload = {"settings": {**vars(args), "draft": str(draft_dir)}, "prompt": prompt, "methods": records}
    payload["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in payload["settings"].items()}
    title = f"Scylla over Adamas: {prompt['prompt_tokens']}-token prompt, budget {args.budget}"
    write_report(args.output_dir, STEM, command, payload, title, report_body(args, prompt, records))
    plot(png_path, records, title)
    print(f"saved {json_path}, {md_path}, {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
