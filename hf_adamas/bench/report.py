"""The budget-sweep reports of ``hf-adamas ppl`` and ``bench``: one value per method and budget, dense as baseline."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from hf_common.reporting import markdown_table, plot_series, write_report


def budget_series(records: list[dict], value: str) -> tuple[dict, dict]:
    """Sparse methods as ``{name: (budgets, values)}`` and the dense ones (no budget) as ``{name: value}``."""
    grouped: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    dense: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if record["budget"] is None:
            dense[record["method"]].append(float(record[value]))
        else:
            grouped[record["method"]][record["budget"]].append(float(record[value]))
    series = {
        name: (sorted(points), [sum(points[b]) / len(points[b]) for b in sorted(points)])
        for name, points in grouped.items()
    }
    baselines = {name: sum(values) / len(values) for name, values in dense.items()}
    return series, baselines


def summary_rows(series: dict, baselines: dict, column: str) -> list[dict]:
    """Table rows: dense (budget "all") first, then each method at each budget."""
    rows = [{"method": name, "budget": "all", column: value} for name, value in baselines.items()]
    for name, (budgets, values) in series.items():
        rows += [{"method": name, "budget": b, column: v} for b, v in zip(budgets, values, strict=True)]
    return rows


def write_budget_report(
    output_dir: Path, name: str, command: str, records: list[dict], value: str, title: str, **plot_kwargs
) -> str:
    """``name``.json/.md/.png of ``records`` (one ``value`` per method and budget, dense as a baseline);
    returns the Markdown table."""
    series, baselines = budget_series(records, value)
    table = markdown_table(summary_rows(series, baselines, value), ["method", "budget", value])
    write_report(output_dir, name, command, {"records": records}, title, table)
    plot_series(output_dir / f"{name}.png", series, title, "token budget", value, baselines, **plot_kwargs)
    return table


DECODE_COLUMNS = [
    "method",
    "budget",
    "tokens_per_second",
    "ms_per_token",
    "speedup_vs_fastest_dense",
    "selection_ms",
    "attention_ms",
    "fused_step_ms",
    "rest_ms",
]


def write_decode_report(output_dir: Path, name: str, command: str, records: list[dict], title: str) -> str:
    """``name``.json/.md/.png of decode-speed records: tokens/s per method and budget, the speed-up over
    the fastest dense configuration of the same context, and each sparse token's time split into key
    selection, sparse attention, the fused step that does both on CPU, and the rest of the model;
    returns the Markdown table."""
    series, baselines = budget_series(records, "tokens_per_second")
    rows = [
        record | {"budget": "all" if record["budget"] is None else record["budget"]} for record in records
    ]
    table = markdown_table(rows, DECODE_COLUMNS)
    write_report(output_dir, name, command, {"records": records}, title, table)
    plot_series(output_dir / f"{name}.png", series, title, "token budget", "tokens/s", baselines, log_x=True)
    return table
