"""Where a decode step's time goes: torch.profiler over a few decode steps of the default model, per method.

Prefills ``--context`` tokens of ``tinyshakespeare.txt`` densely, then profiles ``--steps`` greedy decode steps
with dense sdpa (over a `DynamicCache` and a `StaticCache`), the default config and the paper's rule at
``--budget``, and writes the operators with the most self CPU time to ``<output-dir>/decode_profile_<context>.md``.
The C++ CPU ops are not torch operators, so their time shows only in the wall time per step. Use it to see
whether selection, gathering or the model's linear layers dominate on a given machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hf_adamas.bench.evaluation import attention_method, greedy_continue, method_grid, prefill
from hf_adamas.cli import SHAKESPEARE
from hf_common import load_model_and_tokenizer
from hf_common.outputs import RUNS_DIR, add_output_arguments, claim_outputs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--context", type=int, default=4096, help="Prefill length in tokens.")
    parser.add_argument("--budget", type=int, default=256, help="Token budget of the sparse selectors.")
    parser.add_argument(
        "--steps", type=int, default=4, help="Profiled decode steps per method (after 2 warm-up)."
    )
    parser.add_argument("--rows", type=int, default=10, help="Operators listed per method.")
    parser.add_argument(
        "--text", type=Path, default=SHAKESPEARE, help="Text whose first tokens are the context."
    )
    add_output_arguments(parser, RUNS_DIR / "adamas", "profile")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.text.is_file():
        raise SystemExit(f"error: text file {args.text} not found (pass another with --text)")
    path = claim_outputs([args.output_dir / f"decode_profile_{args.context}.md"], args.overwrite)[0]
    model, tokenizer = load_model_and_tokenizer()
    text = args.text.read_text()
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.context]
    methods = method_grid(["dense", "dense-static", "asymmetric-online", "adamas"], [args.budget])
    lines = [
        f"# Decode-step profile at {input_ids.shape[1]} tokens of context, budget {args.budget}",
        "",
        f"Command: `python scripts/profile_adamas_decode.py --context {args.context} --budget {args.budget} "
        f"--steps {args.steps}`",
        "",
        f"Machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}. Self CPU time summed over "
        f"{args.steps} steps (profiler overhead included in the wall time).",
    ]
    for method in methods:
        static_length = input_ids.shape[1] + 2 + args.steps + 1 if method.static_cache else None
        cache, logits = prefill(model, input_ids, static_length)
        with attention_method(model, method):
            greedy_continue(model, cache, logits, 2)
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                greedy_continue(model, cache, logits, args.steps)
            per_step = (time.perf_counter() - start) / args.steps
        events = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
        total_ms = sum(event.self_cpu_time_total for event in events) / 1000
        lines += [
            "",
            f"## {method.name}: {1000 * per_step:.0f} ms per step (wall), {total_ms:.0f} ms self CPU",
            "",
        ]
        lines += ["| operator | self CPU ms | share | calls |", "|---|---|---|---|"]
        for event in events[: args.rows]:
            ms = event.self_cpu_time_total / 1000
            lines.append(f"| `{event.key}` | {ms:.1f} | {ms / total_ms:.0%} | {event.count} |")
        print(f"{method.name}: {1000 * per_step:.0f} ms per step", flush=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"Saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
