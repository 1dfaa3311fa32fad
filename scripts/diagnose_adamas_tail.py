"""Why the tail estimate (``AdamasConfig(value_code_bits=2)``) loses pass keys: its estimated mass.

The tail estimate keeps every unselected key in the softmax with the logit its key codes estimate.
This script runs the harder passkey test and decode perplexity with the default selection at one
budget and the tail estimate computed in plain PyTorch as `hf_adamas.ops.reference.tail_decode_attention`
does, with the estimated logits changed per variant, and
records per decode step, layer and query head ``gap = lse(estimated tail logits) - lse(exact tail
logits)`` over the tail (the valid positions that are neither selected nor rescored candidates):
the log of the factor by which the estimate inflates the tail's share of the softmax. Variants:

- ``plain``: the tail estimate without a level shift (what ``value_code_bits=2`` computed before
  round 7 of ``results/adamas/tail``);
- ``mass-oracle``: the estimated logits shifted per head by ``-gap``, so the tail's mass is exact
  (needs every exact logit: a bound, not a method);
- ``candidate-shift``: shifted by the same gap measured on the rescored candidates that were not
  selected (their exact logits are read anyway): needs nothing beyond what the method reads;
- ``sampled-shift``: shifted by the gap measured on the tail keys among every
  `reference.tail_calibration_stride`-th position (about 64 more key rows read per KV head): a
  systematic sample, so the ratio of its sums estimates the tail's without the candidates' bias.
  What the tail estimate computes since round 7 (`reference.tail_decode_attention`);
- ``exact-logits``: the tail's exact logits with its coded values (isolates the values' error);
- ``dropped``: everything unselected left out (the default config's attention, through this code).

A diagnostic, not a fast path: each sparse layer computes exact logits over the whole cache.
Records go to ``<output-dir>/<task>_records.jsonl`` as they finish; a rerun with the same
``--output-dir`` skips the (trial or window, variant) pairs already there, so an interrupted run
resumes. ``<output-dir>/<task>.json`` / ``.md`` summarize them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import torch

from hf_adamas import ops
from hf_adamas.bench.evaluation import Method, method_key, run_passkey, run_perplexity
from hf_adamas.bench.needle import SPLITS
from hf_adamas.bench.passkey import append_records, passkey_trials, read_records
from hf_adamas.config import AdamasConfig
from hf_adamas.ops import reference
from hf_common.data import SHARED_DATA_DIR
from hf_common.outputs import RUNS_DIR, OutputPathError, add_output_arguments, claim_outputs
from hf_common.reporting import command_line, markdown_table, write_report

VARIANTS = ("plain", "mass-oracle", "candidate-shift", "sampled-shift", "exact-logits", "dropped")
SHAKESPEARE = SHARED_DATA_DIR / "text" / "tinyshakespeare.txt"


def variant_tail_attention(variant: str, gaps: list[float]):
    """A stand-in for `ops.tail_decode_attention` computing ``variant``'s tail; adds the heads' gaps to
    ``gaps`` (``[count, sum, sum of squares]``, heads with a tail only). ``sampled-shift``,
    ``exact-logits`` and ``dropped`` are the spec's own functions; the others its softmax with the
    estimates shifted."""

    def attend(query, key, value, indices, scaling, key_codes, value_codes, valid, exact_positions=None):
        batch, kv_heads, length, head_dim = key.shape
        heads = query.shape[1]
        grouped = query.float().view(batch, kv_heads, heads // kv_heads, head_dim)
        exact = (grouped @ key.float().transpose(2, 3)).view(batch, heads, length) * scaling
        estimated = reference.centroid_scores(query, *key_codes, shared_per_kv_group=False) * scaling
        selected = reference.selected_mask(indices, heads, length)
        candidates = torch.zeros_like(selected)
        if exact_positions is not None:
            candidates = reference.selected_mask(exact_positions, heads, length) & ~selected
        attendable = torch.ones_like(selected) if valid is None else valid[:, None, :].expand_as(selected)
        tail = attendable & ~selected & ~candidates
        gap = reference.log_mass(estimated, tail) - reference.log_mass(exact, tail)  # [B, Hq, 1]
        finite = gap[tail.any(-1, keepdim=True)].double()
        gaps[0] += finite.numel()
        gaps[1] += float(finite.sum())
        gaps[2] += float(finite.square().sum())
        spec_inputs = (query, key, value, indices, scaling, key_codes, value_codes, valid)
        if variant == "sampled-shift":
            return reference.tail_decode_attention(*spec_inputs, exact_positions)
        if variant == "exact-logits":
            return reference.tail_decode_attention(
                *spec_inputs, torch.arange(length).expand(batch, heads, length)
            )
        if variant == "dropped":  # the candidates too: the default config's attention
            return reference.sparse_decode_attention(query, key, value, indices, scaling)
        if variant == "mass-oracle":
            estimated = estimated - gap
        elif variant == "candidate-shift":
            pool = candidates & attendable
            estimated = estimated - (reference.log_mass(estimated, pool) - reference.log_mass(exact, pool))
        logits = torch.where(selected | candidates, exact, estimated).masked_fill(~attendable, float("-inf"))
        decoded = reference.code_values(*value_codes) @ reference.hadamard_matrix(head_dim, key.device)
        values = torch.where(
            selected.view(batch, kv_heads, -1, length, 1), value.float()[:, :, None], decoded[:, :, None]
        )
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0).view(batch, kv_heads, -1, 1, length)
        return (weights @ values).reshape(batch, heads, head_dim).to(query.dtype)

    return attend


@contextlib.contextmanager
def tail_variant(variant: str, gaps: list[float]) -> Iterator[None]:
    with mock.patch.object(ops, "tail_decode_attention", variant_tail_attention(variant, gaps)):
        yield


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=("passkey", "ppl"), help="Harder passkey test or decode perplexity.")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="Tail variants."
    )
    parser.add_argument("--budget", type=int, default=64, help="Token budget.")
    parser.add_argument(
        "--no-dense", action="store_true", help="Skip the dense reference (already measured)."
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096], help="passkey: prompt lengths.")
    parser.add_argument("--trials", type=int, default=30, help="passkey: trials per length.")
    parser.add_argument("--split", choices=SPLITS, default="tuning", help="passkey: haystack split.")
    parser.add_argument("--skip-tokens", type=int, default=100000, help="ppl: where the window starts.")
    parser.add_argument("--context", type=int, default=8192, help="ppl: window length in tokens.")
    parser.add_argument(
        "--decode-tokens", type=int, default=64, help="ppl: scored tokens (the window's last)."
    )
    parser.add_argument(
        "--text", type=Path, default=SHAKESPEARE, help="ppl: the text the window is cut from."
    )
    add_output_arguments(parser, RUNS_DIR / "adamas" / "tail_diagnosis")
    args = parser.parse_args(argv)
    if min(args.budget, args.trials, args.decode_tokens, *args.lengths) < 1:
        parser.error("--budget, --trials, --decode-tokens and --lengths must be positive")
    if args.decode_tokens >= args.context:
        parser.error("--decode-tokens must be below --context")
    if args.task == "ppl" and not args.text.is_file():
        parser.error(f"text file {args.text} not found (pass another with --text)")
    return args


def _summary(records: list[dict], task: str) -> list[dict]:
    """Per variant (and window, for ``ppl``): trials correct or perplexity, and the gap's mean and sd."""
    rows = []
    for name, skip in dict.fromkeys((r["variant"], r["skip"] if task == "ppl" else None) for r in records):
        mine = [r for r in records if r["variant"] == name and (skip is None or r["skip"] == skip)]
        row = {"variant": name, "records": len(mine)}
        if task == "passkey":
            row["correct"] = sum(r["correct"] for r in mine)
        else:
            row |= {"window": skip, "perplexity": mine[-1]["perplexity"]}
        count, total, squares = (sum(r["gaps"][i] for r in mine) for i in range(3))
        if count:
            row |= {
                "gap mean": total / count,
                "gap sd": math.sqrt(max(squares / count - (total / count) ** 2, 0)),
            }
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from hf_common import load_model_and_tokenizer

    records_path = args.output_dir / f"{args.task}_records.jsonl"
    report = [args.output_dir / f"{args.task}{suffix}" for suffix in (".json", ".md")]
    try:  # a resumed run (its records there) rewrites its own summary
        claim_outputs(report, args.overwrite or records_path.exists())
    except OutputPathError as error:
        print(f"diagnose_adamas_tail.py: error: {error}", file=sys.stderr)
        return 2
    earlier = read_records(records_path)
    model, tokenizer = load_model_and_tokenizer()
    tail = AdamasConfig(token_budget=args.budget, value_code_bits=2)
    runs = ([] if args.no_dense else [("dense", Method("dense"))]) + [
        (variant, Method(f"tail2-{variant}", tail)) for variant in args.variants
    ]
    if args.task == "passkey":
        trials = passkey_trials(
            tokenizer, "varied", args.lengths, [0.1, 0.3, 0.5, 0.7, 0.9], ["passkey", "code", "secret"],
            args.trials, splits=[args.split],
        )  # fmt: skip
    else:
        text_ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids
        window = text_ids[:, args.skip_tokens : args.skip_tokens + args.context]
    for variant, method in runs:
        gaps = [0, 0.0, 0.0]
        if args.task == "passkey":
            done = frozenset((r["trial"], method_key(r["method"], r["budget"])) for r in earlier)
            measured = run_passkey(model, tokenizer, [method], trials, done)
        else:
            done = frozenset(
                method_key(r["method"], r["budget"]) for r in earlier if r["skip"] == args.skip_tokens
            )
            measured = run_perplexity(model, window, [method], args.decode_tokens, done)
        with tail_variant(variant, gaps):
            for record in measured:
                record |= {"variant": variant, "gaps": gaps[:], "skip": args.skip_tokens}
                earlier += append_records(records_path, [record])
                gaps[:] = [0, 0.0, 0.0]
    rows = _summary(earlier, args.task)
    columns = (
        ["variant", "records", "correct"] if args.task == "passkey" else ["variant", "window", "perplexity"]
    )
    columns += ["gap mean", "gap sd"]
    argv = sys.argv[1:] if argv is None else list(argv)
    write_report(
        args.output_dir, args.task, command_line("python", ["scripts/diagnose_adamas_tail.py", *argv]),
        {"summary": rows}, f"Tail estimate diagnosis: {args.task}", markdown_table(rows, columns),
    )  # fmt: skip
    print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
