"""The ``hf-adamas`` command line: calibrate, passkey, ppl, bench, eval (plus demo and env)."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from hf_common.cli import COMMON_COMMANDS, Command, CommandError, run_cli
from hf_common.data import SHARED_DATA_DIR
from hf_common.default_model import DEFAULT_MODEL_ID, load_model_and_tokenizer
from hf_common.demo import demo_command
from hf_common.harness import eval_command
from hf_common.outputs import RUNS_DIR, add_output_arguments, claim_outputs
from hf_common.reporting import command_line, machine, markdown_table, plot_series, save_json, write_report

DESCRIPTION = "Adamas sparse attention (arXiv 2510.18413) for transformers models."
SHAKESPEARE = SHARED_DATA_DIR / "text" / "tinyshakespeare.txt"
METHOD_NAMES = ("dense", "adamas", "adamas-calibrated", "streaming_llm", "quest")
OUTPUT_DIR = RUNS_DIR / "adamas"


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of a causal LM.")
    add_output_arguments(parser, OUTPUT_DIR)
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


def _method_configs(args: argparse.Namespace, calibrated: list[list[float]] | None = None) -> list:
    """The (method, budget) grid of the arguments, dense first (it runs on the pristine cache).

    Called once before the model loads (``calibrated`` None: the paper's thresholds stand in), so
    a bad budget or forced-token count is a `CommandError` before any slow work.
    """
    from hf_adamas.config import AdamasConfig
    from hf_adamas.evaluation import Method

    methods = [Method("dense")] if "dense" in args.methods else []
    for name in args.methods:
        for budget in args.budgets:
            common = {"token_budget": budget, "gqa_selection": args.gqa_selection}
            try:
                if name == "adamas":
                    methods.append(Method(name, AdamasConfig(**common)))
                elif name == "adamas-calibrated":
                    methods.append(Method(name, AdamasConfig(thresholds=calibrated, **common)))
                elif name == "streaming_llm":
                    sinks = min(args.sink_tokens, budget - 1)
                    methods.append(Method(name, AdamasConfig(selector=name, sink_tokens=sinks, **common)))
                elif name == "quest":
                    methods.append(Method(name, AdamasConfig(selector=name, **common)))
            except ValueError as error:
                raise CommandError(f"--methods {name} --budgets {budget}: {error}") from error
    return methods


def _build_methods(args: argparse.Namespace, model, tokenizer) -> list:
    """`_method_configs` with the calibrated thresholds computed on the loaded model when asked for."""
    from hf_adamas.calibration import calibrate_thresholds

    calibrated = None
    if "adamas-calibrated" in args.methods:
        calibrated = calibrate_thresholds(model, tokenizer, args.calibration_text.read_text())
    return _method_configs(args, calibrated)


def _require_file(path: Path, option: str) -> None:
    if not path.is_file():
        raise CommandError(f"text file {path} not found (pass another with {option})")


def _check_method_arguments(args: argparse.Namespace, sparse_context: int, what: str) -> None:
    """Budgets must leave sparse steps: a budget >= ``sparse_context`` would run dense under a sparse name."""
    if args.sink_tokens < 0:
        raise CommandError(f"--sink-tokens must be >= 0, got {args.sink_tokens}")
    if "adamas-calibrated" in args.methods:
        _require_file(args.calibration_text, "--calibration-text")
    too_large = [b for b in args.budgets if b >= sparse_context]
    if too_large and set(args.methods) - {"dense"}:
        raise CommandError(
            f"--budgets {too_large} cover the whole {what} ({sparse_context} tokens), so those runs "
            "would be dense attention reported under a sparse name; use budgets below it"
        )
    _method_configs(args)


def _claim_report(args: argparse.Namespace, name: str) -> None:
    claim_outputs([args.output_dir / f"{name}.{suffix}" for suffix in ("json", "md", "png")], args.overwrite)


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
    command = command_line("hf-adamas", args.argv)
    table = markdown_table(_summary_rows(series, baselines, value), ["method", "budget", value])
    write_report(args.output_dir, name, command, {"records": records}, title, table)
    plot_series(
        args.output_dir / f"{name}.png", series, title, "token budget", value, baselines, **plot_kwargs
    )
    print(table)
    print(f"Saved {args.output_dir}/{name}.json, .md and .png")


def _run_calibrate(args: argparse.Namespace) -> int:
    from hf_adamas.calibration import MIN_CALIBRATION_TOKENS, calibrate_thresholds

    if args.num_tokens < MIN_CALIBRATION_TOKENS:
        raise CommandError(f"--num-tokens must be >= {MIN_CALIBRATION_TOKENS}, got {args.num_tokens}")
    _require_file(args.text, "--text")
    claim_outputs([args.output], args.overwrite)
    model, tokenizer = load_model_and_tokenizer(args.model)
    try:
        thresholds = calibrate_thresholds(model, tokenizer, args.text.read_text(), args.num_tokens, args.bits)
    except ValueError as error:  # the text has fewer tokens than needed
        raise CommandError(str(error)) from error
    command = command_line("hf-adamas", args.argv)
    payload = {"command": command, "machine": machine(), "model": args.model, "bits": args.bits}
    save_json(args.output, {**payload, "thresholds": thresholds})
    print(json.dumps(thresholds[:3]), "...")
    print(f"Saved per-layer thresholds to {args.output}; use AdamasConfig(thresholds=...).")
    return 0


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of a causal LM.")
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="Calibration text.")
    parser.add_argument("--num-tokens", type=int, default=1024, help="Tokens of the text to use.")
    parser.add_argument("--bits", type=int, choices=[1, 2], default=2, help="Code width.")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR / "thresholds.json", help="JSON file.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")


def _add_passkey_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_method_arguments(parser, [16, 32, 64, 128, 256, 512], METHOD_NAMES)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000], help="Context lengths.")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.35, 0.6, 0.85], help="Key depths.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random pass keys.")


def _run_passkey(args: argparse.Namespace) -> int:
    from hf_adamas.evaluation import run_passkey

    if min(args.lengths) < 64:
        raise CommandError(
            f"--lengths must be >= 64 tokens (room for the key and question), got {args.lengths}"
        )
    bad_depths = [d for d in args.depths if not 0.0 <= d <= 1.0]
    if bad_depths:
        raise CommandError(f"--depths are fractions of the haystack in [0, 1], got {bad_depths}")
    _check_method_arguments(args, min(args.lengths), "shortest passkey prompt")
    _claim_report(args, "passkey")
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

    if not 1 <= args.decode_tokens < args.context:
        raise CommandError(
            f"--decode-tokens must be at least 1 and below --context ({args.context}), got {args.decode_tokens}"
        )
    _require_file(args.text, "--text")
    _check_method_arguments(args, args.context, "--context")
    _claim_report(args, "perplexity")
    model, tokenizer = load_model_and_tokenizer(args.model)
    input_ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids[:, : args.context]
    if input_ids.shape[1] <= args.decode_tokens:
        raise CommandError(
            f"{args.text} has {input_ids.shape[1]} tokens, not more than --decode-tokens {args.decode_tokens}"
        )
    methods = _build_methods(args, model, tokenizer)
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

    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    _require_file(args.text, "--text")
    _check_method_arguments(args, args.context, "--context")
    _claim_report(args, f"decode_speed_{args.context}")
    model, tokenizer = load_model_and_tokenizer(args.model)
    input_ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids[:, : args.context]
    methods = _build_methods(args, model, tokenizer)
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
