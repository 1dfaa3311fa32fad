"""How the GSNR multiplier behaves with few gradient groups K, on Gaussian group gradients.

With K groups the estimated ``r = E[g]² / var`` is a ratio of a K-sample mean and variance: heavy-tailed
for small K, so a few large values dominate the per-tensor mean and most elements clip to ``gamma``.
For each K and each true signal-to-noise ratio ``snr`` (per-element true means ``mu_j ~ N(0, snr)``,
noise ``N(0, 1)`` per group), this measures on a tensor of ``--elements`` elements (mean over seeds):
the fraction of elements clipped to ``gamma``, the mean multiplier, and the Spearman-free agreement
with the oracle multiplier computed from the true ``mu_j² / 1`` (mean absolute difference).
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from hf_common.cli import CommandError
from hf_common.outputs import claim_outputs
from hf_common.reporting import command_line, markdown_table, write_report
from hf_vrgd.naive import gsnr_multiplier

GROUP_COUNTS = (2, 3, 4, 8, 16, 32)
SIGNAL_TO_NOISE = (0.0, 0.1, 1.0)
STEM = "small_k"


def measure(groups: int, snr: float, elements: int, gamma: float, seed: int) -> dict[str, float]:
    """One K and snr: fraction at gamma, mean multiplier and mean |r_K - r_oracle| over ``elements``."""
    generator = torch.Generator().manual_seed(seed)
    true_mean = torch.randn(elements, generator=generator) * snr**0.5
    group_grads = true_mean + torch.randn(groups, elements, generator=generator)
    multiplier = gsnr_multiplier(group_grads.mean(0), group_grads.square().mean(0), gamma, eps=1e-6)
    row = {
        "fraction_at_gamma": float((multiplier <= gamma + 1e-7).float().mean()),
        "mean_multiplier": float(multiplier.mean()),
    }
    if snr > 0:
        oracle = gsnr_multiplier(true_mean, true_mean.square() + 1.0, gamma, eps=1e-6)
        row["oracle_fraction_at_gamma"] = float((oracle <= gamma + 1e-7).float().mean())
        row["mean_abs_error"] = float((multiplier - oracle).abs().mean())
    return row


def run_small_k(args: argparse.Namespace) -> int:
    """Measures every K x snr (mean over seeds) and writes ``small_k.{json,md}``."""
    if args.elements < 100 or args.seeds < 1:
        raise CommandError("--elements must be >= 100 and --seeds >= 1")
    claim_outputs([args.output_dir / f"{STEM}.{suffix}" for suffix in ("json", "md")], args.overwrite)
    rows = []
    for snr in tqdm(SIGNAL_TO_NOISE, desc="snr"):
        for groups in GROUP_COUNTS:
            runs = [measure(groups, snr, args.elements, args.gamma, seed) for seed in range(args.seeds)]
            row = {"snr": snr, "K": groups}
            row.update({key: sum(r[key] for r in runs) / len(runs) for key in runs[0]})
            rows.append(row)
    columns = [
        "snr",
        "K",
        "fraction_at_gamma",
        "oracle_fraction_at_gamma",
        "mean_multiplier",
        "mean_abs_error",
    ]
    table = markdown_table(rows, columns)
    how = (
        f"gamma {args.gamma}, {args.elements} elements, mean over {args.seeds} seeds; group gradients "
        "mu_j + N(0, 1) with mu_j ~ N(0, snr); the oracle multiplier uses the true GSNR mu_j^2 (noise variance 1)"
    )
    command = command_line("hf-vrgd", args.argv)
    write_report(
        args.output_dir,
        STEM,
        command,
        {"measured": how, "rows": rows},
        "GSNR with few groups",
        f"{how}.\n\n{table}",
    )
    print(table)
    return 0
