"""Compare trained drafts by tau: one row per ``hf-scylla bench`` run of fixed chains on the same prompts.

    python scripts/scylla_settings_table.py results/scylla/chain-shape/verify_cost.json \
        runs/scylla/settings/bench-e4 runs/scylla/settings/bench-u2-t0.5 ... > table.md

Each bench must decode fixed chains (``--confidence-threshold 0``), so its ``acceptance_per_position``
is the survival ``P(at least k accepted)``; with the verification-cost curve of ``verify_cost.json``
(`hf-scylla verify-cost`) that predicts the speed-up of every chain length on that machine
(`hf_scylla.bench.verify_cost.expected_chain_speedups`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_common.reporting import markdown_table
from hf_scylla.bench.verify_cost import expected_chain_speedups


def settings_rows(curve_file: Path, bench_dirs: list[Path]) -> list[dict]:
    """Per bench folder: tau, survival of the first two positions, measured and predicted speed-ups."""
    report = json.loads(curve_file.read_text())
    costs = {row["new_tokens"]: row["target_forward_ms"] / 1e3 for row in report["verification_curve"]}
    head = next(row for row in report["draft_heads"] if row["draft_head"].startswith("own"))
    draft_step = head["draft_step_ms"] / 1e3
    rows = []
    for folder in bench_dirs:
        bench = json.loads((folder / "bench.json").read_text())
        for row in bench["rows"]:
            if not row["method"].startswith("scylla:"):
                continue
            survival = row["acceptance_per_position"]
            predicted = expected_chain_speedups(costs, draft_step, survival)
            rows.append(
                {
                    "run": folder.name.removeprefix("bench-"),
                    "set": row["set"],
                    "tau_fixed_chain": round(row["tau"], 3),
                    "p_at_least_1": round(survival[0], 3),
                    "p_at_least_2": round(survival[1], 3),
                    "measured_speedup_fixed_chain": round(row["speedup"], 3),
                    "predicted_speedup_k2": round(predicted[2], 3),
                    "lossless": row["lossless"],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("curve", type=Path, help="verify_cost.json with the verification-cost curve")
    parser.add_argument("benches", type=Path, nargs="+", help="hf-scylla bench output folders")
    args = parser.parse_args()
    rows = settings_rows(args.curve, args.benches)
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
