"""lm-evaluation-harness glue with hooks that the method packages fill in: models, tasks, the ``eval`` command, cards.

lm-eval has no plugin discovery, so a method package registers what it brings when it is imported, in
one call per lm-eval model type (PEFT's ``register_peft_method`` style)::

    register_lm_eval_model("hf-adamas", "hf_adamas.lm_eval:AdamasLM")
    register_lm_eval_tasks(hf_adamas.tasks.TASKS_DIR)

The model type goes into lm-eval's registry as a lazy ``"module:Class"`` string: that imports only
``lm_eval.api.registry`` (milliseconds); the `HFLM` subclass loads when lm-eval asks for it. Hooks given
as ``"module:function"`` strings load lazily too.

A CLI's ``eval`` command (`eval_command`) is lm-eval's own ``run`` command (same options, same output)
with the registered model types and the registered task folders (plus `hf_common.tasks`) on the include
path; with ``--card FOLDER`` the results also go into ``FOLDER/README.md`` (model-index entries and a
table).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from hf_common.cli import Command
from hf_common.tasks import TASKS_DIR

__all__ = [
    "LM_EVAL_MODELS",
    "TASKS_DIR",
    "LMEvalModel",
    "eval_command",
    "harness_eval_results",
    "register_lm_eval_model",
    "register_lm_eval_tasks",
    "registered_task_dirs",
    "results_table",
    "write_card_results",
]

LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
CARD_BEGIN = "<!-- lm-eval results: begin -->"
CARD_END = "<!-- lm-eval results: end -->"
CARD_SECTION = "## Results"

ResultsHook = Callable[[dict[str, Any]], list]
"""Takes an lm-eval results dict, returns a list (model-index entries, or lines of card text)."""


@dataclass(frozen=True)
class LMEvalModel:
    """One lm-eval model type a method package provides, and how its results go into a model card.

    Args:
        name: the lm-eval ``--model`` name (lowercase, e.g. ``"hf-scylla"``).
        target: ``"module:Class"`` of its `HFLM` subclass, imported on first use.
        card_extras: ``"module:function"`` (or a callable) giving extra model-index entries from a
            results dict, e.g. the measured speedup.
        card_notes: ``"module:function"`` (or a callable) giving lines of text written under the card's
            results table.
        card_folder_arg: the ``--model_args`` key that ``--card FOLDER`` fills with FOLDER when it is not
            given (a card folder that is itself the evaluated model, e.g. a staged draft).
        card_placeholder: the line this package's card writer puts under "## Results" until results
            exist; `write_card_results` replaces it.
    """

    name: str
    target: str
    card_extras: str | ResultsHook | None = None
    card_notes: str | ResultsHook | None = None
    card_folder_arg: str | None = None
    card_placeholder: str | None = None


LM_EVAL_MODELS: dict[str, LMEvalModel] = {}
"""Registered lm-eval model types, by name (filled by `register_lm_eval_model`)."""

_TASK_DIRS: list[Path] = [TASKS_DIR]


def _lm_eval_registry():
    """lm-eval's model registry with its built-in types in it; ``None`` when lm-eval is not installed.

    lm-eval fills its registry with the built-in types only when it is empty, so they are loaded first.
    """
    try:
        import lm_eval.models  # noqa: F401  (registers hf, vllm, ... as lazy strings)
        from lm_eval.api.registry import model_registry
    except ImportError:
        return None
    return model_registry


def register_lm_eval_model(name: str, target: str, **hooks: Any) -> LMEvalModel:
    """Register lm-eval model type ``name`` (``"module:Class"`` ``target``) and its card hooks.

    ``hooks`` are the other fields of `LMEvalModel`. Registering the same name again with the same
    target replaces the hooks; another target raises a ``ValueError``. The model type goes into lm-eval's
    registry lazily (an alias already there, e.g. the class itself once imported, is left alone).
    """
    if name != name.lower() or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise ValueError(f"lm-eval model type names are lowercase words, got {name!r}")
    if ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    known = LM_EVAL_MODELS.get(name)
    if known is not None and known.target != target:
        raise ValueError(f"lm-eval model type {name!r} is already registered as {known.target}")
    model = LM_EVAL_MODELS[name] = LMEvalModel(name, target, **hooks)
    registry = _lm_eval_registry()
    if registry is not None and name not in registry:
        registry.register(name, target=target)
    return model


def register_lm_eval_tasks(folder: str | os.PathLike) -> Path:
    """Put a folder of lm-eval task YAMLs on the include path of every ``eval`` command."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise ValueError(f"no such task folder: {folder}")
    if folder not in _TASK_DIRS:
        _TASK_DIRS.append(folder)
    return folder


def registered_task_dirs() -> list[Path]:
    """The task folders on the ``eval`` include path: `hf_common.tasks` first, then the registered ones."""
    return list(_TASK_DIRS)


def _hook(hook: str | ResultsHook | None) -> ResultsHook | None:
    """A hook given as ``"module:function"`` imported, a callable as it is."""
    if not isinstance(hook, str):
        return hook
    module, function = hook.split(":")
    return getattr(importlib.import_module(module), function)


def _hook_output(model_type: Any, field: str, results: dict[str, Any]) -> list:
    """What the ``field`` hook of a registered model type returns for ``results`` (empty without one)."""
    model = LM_EVAL_MODELS.get(model_type) if isinstance(model_type, str) else None
    hook = _hook(getattr(model, field)) if model is not None else None
    return list(hook(results)) if hook else []


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


def run_eval(args: argparse.Namespace, default_model: str) -> int:
    """Run lm-eval's ``run`` command on ``args`` with the registered model types and task folders."""
    from lm_eval._cli.run import Run

    options = {key: value for key, value in vars(args).items() if key not in {"_run", "argv", "card"}}
    options["model"] = options.get("model") or default_model
    options["include_path"] = [str(folder) for folder in registered_task_dirs()] + (
        [options["include_path"]] if options.get("include_path") else []
    )
    card = args.card
    model = LM_EVAL_MODELS.get(options["model"])
    if card is not None:
        if not options.get("output_path"):
            raise SystemExit("error: --card needs --output_path (the card is written from the results file)")
        if model is not None and model.card_folder_arg:
            options["model_args"] = {model.card_folder_arg: str(card), **(options.get("model_args") or {})}
    start = time.time()
    Run._execute(argparse.Namespace(**options))
    if card is not None:
        results_file = _latest_results_file(options["output_path"], start)
        results = json.loads(results_file.read_text())
        extras = _hook_output(options["model"], "card_extras", results)
        readme = write_card_results(card, results, extra_eval_results=extras, source=results_file.name)
        print(f"Wrote {len(harness_eval_results(results)) + len(extras)} results into {readme}")
    return 0


def eval_command(model_type: str) -> Command:
    """The ``eval`` subcommand of a CLI whose default ``--model`` is ``model_type`` (a registered one)."""
    if model_type not in LM_EVAL_MODELS:
        raise ValueError(f"{model_type!r} is not a registered lm-eval model type (register_lm_eval_model)")
    tasks = sorted(path.stem for folder in registered_task_dirs() for path in folder.glob("*.yaml"))
    return Command(
        "eval",
        f"lm-eval's `run` with the {', '.join(sorted(LM_EVAL_MODELS))} models and the local tasks "
        f"(default --model {model_type}): {', '.join(tasks)}.",
        add_eval_arguments,
        partial(run_eval, default_model=model_type),
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
    notes = _hook_output(config.get("model"), "card_notes", results)
    if notes:
        lines += ["", *notes]
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
    where it replaces the ``card_placeholder`` line of any registered model type; without such a section
    it is appended. A folder without a README gets a minimal card. Returns the README path.
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
        placeholders = {model.card_placeholder for model in LM_EVAL_MODELS.values()} - {None}
        body = "\n".join(line for line in body.strip("\n").splitlines() if line.strip() not in placeholders)
        text = f"{before}{CARD_SECTION}\n\n{block}\n\n{body.strip()}\n\n{tail}".replace("\n\n\n", "\n\n")
    else:
        text = f"{text.rstrip()}\n\n{CARD_SECTION}\n\n{block}\n"
    card.text = text
    card.save(readme)
    return readme
