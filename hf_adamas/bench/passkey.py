"""The ``hf-adamas passkey`` runner: trials, resumable records, and the accuracy report.

Records go to ``<stem>_records.jsonl`` one line per (trial, method) as they are measured, so an
interrupted run continues with ``--resume`` where it stopped; the JSON/Markdown/PNG summary is
rebuilt from all records at the end.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from hf_adamas.bench.evaluation import PasskeyTrial, repeated_filler_trial
from hf_adamas.bench.needle import SPLITS, needle_prompt
from hf_common.reporting import markdown_table, plot_series, write_report


def passkey_trials(
    tokenizer: PreTrainedTokenizerBase,
    haystack: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    needle_formats: Sequence[str],
    trials: int,
    splits: Sequence[str] = SPLITS,
    seed: int = 0,
) -> list[tuple[str, PasskeyTrial]]:
    """``trials`` prompts per (split, length), interleaved so a partial run covers every length.

    Trial ``i`` uses format ``needle_formats[i % F]`` and depth ``depths[(i // F) % D]``; its random
    draws are seeded by its id ``split/length/i`` (and ``seed``), so a trial is the same prompt in
    every run, whatever the other trials. The repeated-filler haystack has no splits (one filler).
    """
    prompts = []
    for index in range(trials):
        needle_format = needle_formats[index % len(needle_formats)]
        depth = depths[(index // len(needle_formats)) % len(depths)]
        for split in splits if haystack == "varied" else ["repeated"]:
            for length in lengths:
                trial_id = f"{split}/{length}/{index}"
                rng = random.Random(f"{seed}/{trial_id}")
                if haystack == "varied":
                    trial = needle_prompt(tokenizer, length, depth, needle_format, rng, split)
                else:
                    trial = repeated_filler_trial(tokenizer, length, depth, f"{rng.randrange(10000, 100000)}")
                prompts.append((trial_id, trial))
    return prompts


def read_records(path: Path) -> list[dict]:
    """The records of an earlier (possibly interrupted) run; a torn last line is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_records(path: Path, records: Iterable[dict]) -> list[dict]:
    """Append each record to ``path`` as soon as it arrives (flushed); returns them."""
    written = []
    with path.open("a") as sink:
        for record in records:
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            written.append(record)
    return written


def _target_length(record: dict) -> int:
    """The ``--lengths`` value of a record's trial (its id is ``split/length/index``; prompts may be shorter)."""
    return int(record["trial"].split("/")[1])


def _accuracy_table(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows (method, budget) with ``k/n`` per target length and overall accuracy, per split."""
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    splits = sorted({r.get("split", "repeated") for r in records}, key=lambda s: (s != "tuning", s))
    lengths = sorted({_target_length(r) for r in records})
    order: list[tuple] = []
    for record in records:
        method = (record["method"], record["budget"] if record["budget"] is not None else "-")
        if method not in order:
            order.append(method)
        for length in (_target_length(record), "all"):
            cell = counts[method, record.get("split", "repeated"), length]
            cell[0] += int(record["correct"])
            cell[1] += 1
    order.sort(key=lambda m: (m[1] != "-", str(m[0]), m[1] if m[1] != "-" else 0))
    columns = ["method", "budget"]
    for split in splits:
        columns += [f"{split} {length}" for length in lengths] + [f"{split} acc"]
    rows = []
    for method in order:
        row = {"method": method[0], "budget": method[1]}
        for split in splits:
            for length in lengths:
                k, n = counts.get((method, split, length), (0, 0))
                row[f"{split} {length}"] = f"{k}/{n}" if n else ""
            k, n = counts.get((method, split, "all"), (0, 0))
            row[f"{split} acc"] = k / n if n else ""
        rows.append(row)
    return rows, columns


def _series(records: list[dict], split: str) -> tuple[dict, dict]:
    points: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    dense = []
    for record in records:
        if record.get("split", "repeated") != split:
            continue
        if record["budget"] is None:
            dense.append(int(record["correct"]))
        else:
            points[record["method"]][record["budget"]].append(int(record["correct"]))
    series = {
        name: (sorted(by), [sum(by[b]) / len(by[b]) for b in sorted(by)])
        for name, by in sorted(points.items())
    }
    return series, ({"dense": sum(dense) / len(dense)} if dense else {})


def write_passkey_report(
    output_dir: Path, stem: str, command: str, records: list[dict], model: str
) -> list[Path]:
    """``stem.json`` / ``stem.md`` (accuracy per split and length) and one ``stem_<split>.png`` per split."""
    rows, columns = _accuracy_table(records)
    lengths = sorted({_target_length(r) for r in records})
    body = (
        f"Model {model}; {len(records)} (trial, method) records, prompts of at most {lengths} tokens. A cell "
        "`k/n` counts the trials whose greedy answer starts with the needle's number.\n\n"
        + markdown_table(rows, columns)
    )
    title = f"Passkey retrieval ({records[0].get('haystack', 'repeated')} haystack), {model}"
    paths = list(write_report(output_dir, stem, command, {"summary": rows, "records": records}, title, body))
    for split in sorted({r.get("split", "repeated") for r in records}):
        series, baselines = _series(records, split)
        path = output_dir / f"{stem}_{split}.png"
        plot_series(path, series, f"{title}: {split}", "token budget", "accuracy", baselines, log_x=True)
        paths.append(path)
    print(markdown_table(rows, columns))
    return paths
