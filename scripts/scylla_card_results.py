"""The model card's per-set results from a ``hf-scylla bench`` run: its chain rows, one entry per prompt set.

    python scripts/scylla_card_results.py results/scylla/self-distill/bench.json \
        results/scylla/self-distill/eval-results.json

The output is what ``hf-scylla stage --eval-results`` reads (tau and speedup per set, rounded to 3 digits).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SET_NAMES = {
    "alpaca": ("Alpaca prompts of the EAGLE speculative-decoding benchmark", "tatsu-lab/alpaca"),
    "gsm8k": ("GSM8K test prompts of the EAGLE speculative-decoding benchmark", "openai/gsm8k"),
    "qa": ("Natural Questions prompts of the EAGLE speculative-decoding benchmark", "natural_questions"),
    "sum": ("CNN/DailyMail prompts of the EAGLE speculative-decoding benchmark", "cnn_dailymail"),
    "heldout": ("Held-out prompts of kinds absent from the training data (never tuned on)", "local/heldout"),
    "magpie-val": ("Held-out split of the self-distilled training conversations", "local/magpie-val"),
    "code": ("Code prompts built from Python standard-library functions (never tuned on)", "local/code"),
}
"""Card name and dataset id of each prompt-set file stem; other stems are named by the stem itself."""


def card_results(bench: dict, setting: str) -> list[dict]:
    """One ``eval_results`` entry per set: the draft's row as configured (``scylla:<draft>``, not its
    ``+tree``/``+vocab`` or ``-no-lookup`` variants)."""
    entries = []
    for row in bench["rows"]:
        method = row["method"]
        if not method.startswith("scylla:") or "+" in method or method.endswith("-no-lookup"):
            continue
        name, kind = SET_NAMES.get(row["set"], (row["set"], f"local/{row['set']}"))
        entries.append(
            {
                "tau": round(row["tau"], 3),
                "speedup": round(row["speedup"], 3),
                "dataset_name": f"{name} (first {row['prompts']})",
                "dataset_type": kind,
                "setting": setting,
            }
        )
    if not entries:
        raise SystemExit("the bench holds no Scylla chain row")
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bench", type=Path, help="bench.json of hf-scylla bench")
    parser.add_argument("output", type=Path, help="eval-results JSON to write (refused if it exists)")
    parser.add_argument(
        "--setting",
        default="greedy, chat template, 128 new tokens, the draft's chain settings, batch 1, float32 on a "
        "2-core CPU; speed-up over plain greedy in the same run",
        help="How the figures were measured, for the card.",
    )
    args = parser.parse_args()
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; remove it first")
    entries = card_results(json.loads(args.bench.read_text()), args.setting)
    args.output.write_text(json.dumps(entries, indent=2) + "\n")
    print(f"{len(entries)} sets written to {args.output}")


if __name__ == "__main__":
    main()
