"""lm-evaluation-harness glue shared by hf_adamas and hf_scylla: registration, the ``eval`` command, model cards.

lm-eval has no plugin discovery, so ``import hf_adamas`` / ``import hf_scylla`` register their model types
(``hf-adamas``, ``hf-scylla``) with lm-eval's registry as lazy ``"module:Class"`` strings: that imports
only ``lm_eval.api.registry`` (milliseconds); the `HFLM` subclasses load when lm-eval asks for them.

``hf-adamas eval`` / ``hf-scylla eval`` are lm-eval's own ``run`` command (same options, same output)
with both model types registered and the local tasks of `hf_common.tasks` on the include path; with
``--card FOLDER`` the results also go into ``FOLDER/README.md`` (model-index entries and a table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from hf_common.cli import Command
from hf_common.tasks import TASKS_DIR

__all__ = [
    "MODEL_TYPES",
    "TASKS_DIR",
    "eval_command",
    "harness_eval_results",
    "register_model_types",
    "results_table",
    "write_card_results",
]

MODEL_TYPES = {
    "hf-adamas": "hf_adamas.harness:AdamasLM",
    "hf-scylla": "hf_scylla.harness:ScyllaLM",
}
"""lm-eval model type -> the `HFLM` subclass that implements it (imported on first use)."""

LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
CARD_BEGIN = "<!-- lm-eval results: begin -->"
CARD_END = "<!-- lm-eval results: end -->"
CARD_SECTION = "## Results"


def register_model_types(names: Iterable[str] = tuple(MODEL_TYPES)) -> bool:
    """Register ``names`` with lm-eval's model registry, lazily; ``False`` when lm-eval is not installed.

    lm-eval fills its registry with the built-in types only when it is empty, so they are registered
    first; an alias that is already there (e.g. the class itself, once imported) is left alone.
    """
    try:
        import lm_eval.models  # noqa: F401  (registers hf, vllm, ... as lazy strings)
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    for name in names:
        if name not in model_registry:
            model_registry.register(name, target=MODEL_TYPES[name])
    return True


# ---------------------------------------------------------------- the eval command


class _AdoptingSubparsers:
    """Stands in for argparse's subparsers action so lm-eval's ``run`` command adds its options to ours."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        del name
        self.parser.epilog = kwargs.get("epilog")
        self.parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return self.parser


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """lm-eval's ``run`` options (``--model``, ``--model_args``, ``--tasks``, ``--limit``, ...) plus ``--card``."""
    from lm_eval._cli.run import Run

    Run.create(_AdoptingSubparsers(parser))
    parser.add_argument(
        "--card",
        type=Path,
        metavar="<folder>",
        help="Also write the results into <folder>/README.md (model-index entries and a table); "
        "needs --output_path. With hf-scylla and no draft= in --model_args, the folder is the draft.",
    )


def _latest_results_file(output_path: str, since: float) -> Path:
    """The results JSON lm-eval's `EvaluationTracker` wrote under ``output_path`` after ``since``."""
    path = Path(output_path)
    candidates = (
        path.parent.glob(f"{path.stem}_*.json") if path.suffix == ".json" else path.rglob("results_*.json")
    )
    fresh = [file for file in candidates if file.stat().st_mtime >= since]
    if not fresh:
        raise FileNotFoundError(f"lm-eval wrote no results file under {output_path}")
    return max(fresh, key=lambda file: file.stat().st_mtime)


def run_eval(
    args: argparse.Namespace,
    default_model: str,
    card_extras: Callable[[dict[str, Any]], list] | None = None,
) -> int:
    """Run lm-eval's ``run`` command on ``args`` with our model types and local tasks registered."""
    from lm_eval._cli.run import Run

    register_model_types()
    options = {key: value for key, value in vars(args).items() if key not in {"_run", "argv", "card"}}
    options["model"] = options.get("model") or default_model
    options["include_path"] = [str(TASKS_DIR)] + (
        [options["include_path"]] if options.get("include_path") else []
    )
    card = args.card
    if card is not None:
        if not options.get("output_path"):
            raise SystemExit("error: --card needs --output_path (the card is written from the results file)")
        if options["model"] == "hf-scylla":
            options["model_args"] = {"draft": str(card), **(options.get("model_args") or {})}
    start = time.time()
    Run._execute(argparse.Namespace(**options))
    if card is not None:
        results_file = _latest_results_file(options["output_path"], start)
        results = json.loads(results_file.read_text())
        extras = card_extras(results) if card_extras else []
        readme = write_card_results(card, results, extra_eval_results=extras, source=results_file.name)
        print(f"Wrote {len(harness_eval_results(results)) + len(extras)} results into {readme}")
    return 0


def eval_command(model_type: str, card_extras: Callable[[dict[str, Any]], list] | None = None) -> Command:
    """The ``eval`` subcommand of a CLI whose default ``--model`` is ``model_type``."""
    return Command(
        "eval",
        f"lm-eval's `run` with the hf-adamas / hf-scylla models and the local tasks (default --model "
        f"{model_type}): gsm8k_local, passkey_2k/4k/8k (group passkey_local), tinyshakespeare_ppl.",
        add_eval_arguments,
        partial(run_eval, default_model=model_type, card_extras=card_extras),
    )


# ---------------------------------------------------------------- results into model cards


def _metrics(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (task, metric, filter) of an lm-eval results dict, stderr alongside."""
    records = []
    for task, values in results.get("results", {}).items():
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            records.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filter_name,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                    "samples": samples,
                }
            )
    return records


def harness_eval_results(results: dict[str, Any]) -> list:
    """`EvalResult` entries (one per task, metric and filter) of an lm-eval results dict.

    The number of documents scored (``--limit``) goes into the dataset's ``args`` as ``samples``.
    """
    from huggingface_hub import EvalResult

    entries = []
    for record in _metrics(results):
        if not math.isfinite(record["value"]):
            continue
        name = record["metric"] + ("" if record["filter"] == "none" else f" ({record['filter']})")
        entries.append(
            EvalResult(
                task_type="text-generation",
                task_name=record["task"],
                dataset_type=record["task"],
                dataset_name=f"{record['task']} (lm-eval, local)",
                dataset_args=None if record["samples"] is None else {"samples": record["samples"]},
                metric_type=record["metric"],
                metric_name=name,
                metric_value=record["value"],
                source_name="lm-evaluation-harness",
                source_url=LM_EVAL_URL,
            )
        )
    return entries


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table of an lm-eval results dict: task, metric, filter, value, stderr, samples."""
    from hf_common.reporting import markdown_table

    rows = [
        {**record, "stderr": "" if record["stderr"] is None else record["stderr"]}
        for record in _metrics(results)
    ]
    return markdown_table(rows, ["task", "metric", "filter", "value", "stderr", "samples"])


def _results_block(results: dict[str, Any], source: str | None) -> str:
    config = results.get("config", {})
    model_args = config.get("model_args")
    if isinstance(model_args, dict):
        model_args = ",".join(f"{key}={value}" for key, value in model_args.items())
    setting = f"`--model {config.get('model')}`" + (f" `--model_args {model_args}`" if model_args else "")
    limit = config.get("limit")
    limit = f", `--limit {limit:g}`" if isinstance(limit, int | float) else ""
    lines = [
        CARD_BEGIN,
        f"Measured with lm-evaluation-harness {results.get('lm_eval_version', '')} ({setting}{limit})"
        + (f", results file `{source}`" if source else "")
        + ".",
        "",
        results_table(results).rstrip(),
    ]
    scylla = config.get("scylla")
    if scylla:
        stats = ", ".join(
            f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in scylla.items()
            if key in ("tau", "tokens_per_second", "baseline_tokens_per_second", "speedup")
            and value is not None
        )
        lines += ["", f"Speculative decoding during these tasks: {stats}."]
    return "\n".join([*lines, CARD_END])


def _same_entry(a: Any, b: Any) -> bool:
    return (a.task_type, a.dataset_type, a.metric_type, a.metric_name) == (
        b.task_type,
        b.dataset_type,
        b.metric_type,
        b.metric_name,
    )


def write_card_results(
    folder: str | os.PathLike,
    results: dict[str, Any],
    *,
    extra_eval_results: Sequence = (),
    source: str | None = None,
) -> Path:
    """Merge an lm-eval results dict into ``folder/README.md``: model-index entries and a results table.

    Entries with the same task, dataset, metric and filter are replaced (also when the sample count
    differs); others are kept. The table goes
    between marker comments (replaced on the next call) at the top of the card's "## Results" section,
    whose "not evaluated yet" placeholder (`hf_scylla.hub`) it replaces; without such a section it is
    appended. A folder without a README gets a minimal card. Returns the README path.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    readme = folder / "README.md"
    if readme.is_file():
        card = ModelCard.load(readme)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        data = ModelCardData(library_name="transformers", model_name=folder.name)
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {folder.name}\n")
    new_entries = harness_eval_results(results) + list(extra_eval_results)
    kept = [
        old for old in card.data.eval_results or [] if not any(_same_entry(old, new) for new in new_entries)
    ]
    card.data.eval_results = kept + new_entries
    card.data.model_name = card.data.model_name or folder.name

    block = _results_block(results, source)
    text = card.text
    if CARD_BEGIN in text and CARD_END in text:
        before, rest = text.split(CARD_BEGIN, 1)
        text = before + block + rest.split(CARD_END, 1)[1]
    elif CARD_SECTION in text:
        before, after = text.split(CARD_SECTION, 1)
        following = re.search(r"^## ", after, flags=re.MULTILINE)
        tail = after[following.start() :] if following else ""
        body = after[: following.start()] if following else after
        body = re.sub(r"^Not evaluated yet:.*\n?", "", body.lstrip("\n"), flags=re.MULTILINE)
        text = f"{before}{CARD_SECTION}\n\n{block}\n\n{body.strip()}\n\n{tail}".replace("\n\n\n", "\n\n")
    else:
        text = f"{text.rstrip()}\n\n{CARD_SECTION}\n\n{block}\n"
    card.text = text
    card.save(readme)
    return readme
