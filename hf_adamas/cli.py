"""The ``hf-adamas`` command line: calibrate, passkey, ppl, bench, eval (plus demo and env)."""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_common.cli import COMMON_COMMANDS, Command, run_cli
from hf_common.data import SHARED_DATA_DIR
from hf_common.default_model import DEFAULT_MODEL_ID, load_model_and_tokenizer
from hf_common.demo import demo_command
from hf_common.harness import eval_command
from hf_common.reporting import markdown_table, plot_series, save_json

DESCRIPTION = "Adamas sparse attention (arXiv 2510.18413) for transformers models."
SHAKESPEARE = SHARED_DATA_DIR / "text" / "tinyshakespeare.txt"
METHOD_NAMES = ("dense", "adamas", "adamas-calibrated", "streaming_llm", "quest")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of a causal LM.")
    parser.add_argument("--output-dir", type=Path, default=Path("results/adamas"), help="Where results go.")
    parser.add_argument(
        "--gqa-selection",
        choices=["per_query_head", "shared_per_kv_group"],
        default="per_query_head",
        help="How grouped-query heads select keys.",
    )


def _add_method_arguments(
    parser: argparse.ArgumentParser, budgets: Sequence[int], methods: Sequence[str]
) -> None:
    parser.add_argument("--budgets", type=int, nargs="+", default=list(budgets), help="Token budgets.")
    parser.add_argument(
        "--methods", nargs="+", choices=METHOD_NAMES, default=list(methods), help="Methods to compare."
    )
    parser.add_argument(
        "--calibration-text",
        type=Path,
        default=SHAKESPEARE,
        help="Text for adamas-calibrated thresholds (its first 1024 tokens).",
    )
    parser.add_argument(
        "--sink-tokens", type=int, default=4, help="Sink tokens of the streaming_llm baseline."
    )


def _build_methods(args: argparse.Namespace, model, tokenizer) -> list:
    """The (method, budget) grid of the arguments, dense first (it runs on the pristine cache)."""
    from hf_adamas.calibration import calibrate_thresholds
    from hf_adamas.config import AdamasConfig
    from hf_adamas.evaluation import Method

    methods = [Method("dense")] if "dense" in args.methods else []
    calibrated = None
    if "adamas-calibrated" in args.methods:
        calibrated = calibrate_thresholds(model, tokenizer, _read_text(args.calibration_text))
    for name in args.methods:
        for budget in args.budgets:
            common = {"token_budget": budget, "gqa_selection": args.gqa_selection}
            if name == "adamas":
                methods.append(Method(name, AdamasConfig(**common)))
            elif name == "adamas-calibrated":
                methods.append(Method(name, AdamasConfig(thresholds=calibrated, **common)))
            elif name == "streaming_llm":
                sinks = min(args.sink_tokens, budget - 1)
                methods.append(Method(name, AdamasConfig(selector=name, sink_tokens=sinks, **common)))
            elif name == "quest":
                methods.append(Method(name, AdamasConfig(selector=name, **common)))
    return methods


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise SystemExit(
            f"error: text file {path} not found (pass another with --calibration-text / --text)."
        )
    return path.read_text()


def _machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return f"{device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def _by_method(records: list[dict], value: str) -> tuple[dict, dict]:
    """Sparse methods as ``{name: (budgets, values)}`` and dense as ``{"dense": value}``."""
    grouped: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    dense: list[float] = []
    for record in records:
        if record["budget"] is None:
            dense.append(float(record[value]))
        else:
            grouped[record["method"]][record["budget"]].append(float(record[value]))
    series = {
        name: (sorted(points), [sum(points[b]) / len(points[b]) for b in sorted(points)])
        for name, points in grouped.items()
    }
    baselines = {"dense": sum(dense) / len(dense)} if dense else {}
    return series, baselines


def _summary_rows(series: dict, baselines: dict, column: str) -> list[dict]:
    rows = [{"method": name, "budget": "all", column: value} for name, value in baselines.items()]
    for name, (budgets, values) in series.items():
        rows += [{"method": name, "budget": b, column: v} for b, v in zip(budgets, values, strict=True)]
    return rows


def _write_report(args, name: str, records: list[dict], value: str, title: str, **plot_kwargs) -> None:
    series, baselines = _by_method(records, value)
    command = "hf-adamas " + " ".join(getattr(args, "argv", []))
    save_json(
        args.output_dir / f"{name}.json", {"command": command, "machine": _machine(), "records": records}
    )
    rows = _summary_rows(series, baselines, value)
    table = markdown_table(rows, ["method", "budget", value])
    (args.output_dir / f"{name}.md").write_text(
        f"# {title}\n\nCommand: `{command}`\n\nMachine: {_machine()}\n\n{table}"
    )
    plot_series(
        args.output_dir / f"{name}.png", series, title, "token budget", value, baselines, **plot_kwargs
    )
    print(table)
    print(f"Saved {args.output_dir}/{name}.json, .md and .png")


def _run_calibrate(args: argparse.Namespace) -> int:
    from hf_adamas.calibration import calibrate_thresholds

    model, tokenizer = load_model_and_tokenizer(args.model)
    thresholds = calibrate_thresholds(model, tokenizer, _read_text(args.text), args.num_tokens, args.bits)
    save_json(args.output, {"model": args.model, "bits": args.bits, "thresholds": thresholds})
    print(json.dumps(thresholds[:3]), "...")
    print(f"Saved per-layer thresholds to {args.output}; use AdamasConfig(thresholds=...).")
    return 0


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of a causal LM.")
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="Calibration text.")
    parser.add_argument("--num-tokens", type=int, default=1024, help="Tokens of the text to use.")
    parser.add_argument("--bits", type=int, choices=[1, 2], default=2, help="Code width.")
    parser.add_argument(
        "--output", type=Path, default=Path("results/adamas/thresholds.json"), help="JSON file."
    )


def _add_passkey_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_method_arguments(parser, [16, 32, 64, 128, 256, 512], METHOD_NAMES)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000], help="Context lengths.")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.35, 0.6, 0.85], help="Key depths.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random pass keys.")


def _run_passkey(args: argparse.Namespace) -> int:
    from hf_adamas.evaluation import run_passkey

    model, tokenizer = load_model_and_tokenizer(args.model)
    methods = _build_methods(args, model, tokenizer)
    records = run_passkey(model, tokenizer, methods, args.lengths, args.depths, seed=args.seed)
    for record in records:
        record["accuracy"] = float(record["correct"])
    title = f"Passkey retrieval, {Path(args.model).name}, {min(args.lengths)}-{max(args.lengths)} tokens"
    _write_report(args, "passkey", records, "accuracy", title, log_x=True)
    return 0


def _add_ppl_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_method_arguments(parser, [64, 128, 256, 512, 1024], METHOD_NAMES)
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="Text to score.")
    parser.add_argument("--context", type=int, default=8192, help="Total tokens: prefill plus decoded.")
    parser.add_argument(
        "--decode-tokens", type=int, default=256, help="Tokens decoded (and scored) one by one."
    )


def _run_ppl(args: argparse.Namespace) -> int:
    from hf_adamas.evaluation import run_perplexity

    model, tokenizer = load_model_and_tokenizer(args.model)
    methods = _build_methods(args, model, tokenizer)
    input_ids = tokenizer(_read_text(args.text), return_tensors="pt").input_ids[:, : args.context]
    records = run_perplexity(model, input_ids, methods, args.decode_tokens)
    title = f"Perplexity of the last {args.decode_tokens} of {input_ids.shape[1]} tokens, {args.text.name}"
    _write_report(args, "perplexity", records, "perplexity", title, log_x=True)
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_method_arguments(parser, [256], ["dense", "adamas"])
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="Text for the prefilled context.")
    parser.add_argument("--context", type=int, default=8192, help="Prefilled context length.")
    parser.add_argument("--steps", type=int, default=16, help="Timed decode steps per method.")


def _run_bench(args: argparse.Namespace) -> int:
    from hf_adamas.evaluation import run_decode_speed

    model, tokenizer = load_model_and_tokenizer(args.model)
    methods = _build_methods(args, model, tokenizer)
    input_ids = tokenizer(_read_text(args.text), return_tensors="pt").input_ids[:, : args.context]
    records = run_decode_speed(model, input_ids, methods, args.steps)
    dense = next((r["tokens_per_second"] for r in records if r["budget"] is None), None)
    for record in records:
        record["speedup_vs_dense"] = record["tokens_per_second"] / dense if dense else None
    title = f"Decode speed at {input_ids.shape[1]} tokens of context"
    _write_report(args, f"decode_speed_{args.context}", records, "tokens_per_second", title, log_x=True)
    return 0


COMMANDS = (
    *COMMON_COMMANDS,
    demo_command("Adamas demo: a pass key in a long context, dense vs Adamas attention.", "hf_adamas.demo"),
    Command(
        "calibrate",
        "Compute per-layer thresholds from a model's key statistics.",
        _add_calibrate_arguments,
        _run_calibrate,
    ),
    Command(
        "passkey",
        "Passkey retrieval accuracy of adamas and baselines vs dense.",
        _add_passkey_arguments,
        _run_passkey,
    ),
    Command(
        "ppl", "Long-context perplexity with sparse token-by-token decoding.", _add_ppl_arguments, _run_ppl
    ),
    Command(
        "bench",
        "End-to-end decode tokens/s at a long context, adamas vs dense.",
        _add_bench_arguments,
        _run_bench,
    ),
    eval_command("hf-adamas"),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-adamas", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
