"""The ``hf-adamas`` command line: calibrate, passkey, ppl, bench, eval (plus demo and env)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from hf_adamas.bench.evaluation import METHOD_NAMES, method_grid
from hf_common.cli import COMMON_COMMANDS, Command, CommandError, run_cli
from hf_common.data import SHARED_DATA_DIR
from hf_common.default_model import DEFAULT_MODEL_ID, load_model_and_tokenizer
from hf_common.demo import demo_command
from hf_common.few_rows_linear import few_rows_linear_available
from hf_common.harness import eval_command
from hf_common.outputs import RUNS_DIR, add_output_arguments, claim_outputs
from hf_common.reporting import command_line, machine, save_json

DESCRIPTION = "Adamas sparse attention (arXiv 2510.18413) for transformers models."
SHAKESPEARE = SHARED_DATA_DIR / "text" / "tinyshakespeare.txt"
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
        help="Text for the -calibrated methods' thresholds and centroids (its first 1024 tokens).",
    )
    parser.add_argument(
        "--sink-tokens", type=int, default=4, help="Sink tokens of the streaming_llm baseline."
    )
    parser.add_argument(
        "--rescore-candidates",
        type=int,
        default=None,
        help="AdamasConfig.rescore_candidates of the code-estimate methods (default: the config's).",
    )


def _method_configs(args: argparse.Namespace, calibrated: dict | None = None) -> list:
    """The arguments' `method_grid`; a bad budget or forced-token count is a `CommandError`."""
    try:
        return method_grid(
            args.methods,
            args.budgets,
            args.gqa_selection,
            args.sink_tokens,
            calibrated,
            args.rescore_candidates,
        )
    except ValueError as error:
        raise CommandError(str(error)) from error


def _build_methods(args: argparse.Namespace, model, tokenizer) -> list:
    """`_method_configs` with the calibrated code book computed on the loaded model when asked for."""
    from hf_adamas.calibration import calibrate_codes

    calibrated = None
    if any(name.endswith("-calibrated") for name in args.methods):
        calibrated = calibrate_codes(model, tokenizer, args.calibration_text.read_text())
    return _method_configs(args, calibrated)


def _require_file(path: Path, option: str) -> None:
    if not path.is_file():
        raise CommandError(f"text file {path} not found (pass another with {option})")


def _check_method_arguments(args: argparse.Namespace, sparse_context: int, what: str) -> None:
    """Budgets must leave sparse steps: a budget >= ``sparse_context`` would run dense under a sparse name."""
    if args.sink_tokens < 0:
        raise CommandError(f"--sink-tokens must be >= 0, got {args.sink_tokens}")
    if any(name.endswith("-calibrated") for name in args.methods):
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


def _write_report(args, name: str, records: list[dict], value: str, title: str, **plot_kwargs) -> None:
    from hf_adamas.bench.report import write_budget_report

    command = command_line("hf-adamas", args.argv)
    print(write_budget_report(args.output_dir, name, command, records, value, title, **plot_kwargs))
    print(f"Saved {args.output_dir}/{name}.json, .md and .png")


def _run_calibrate(args: argparse.Namespace) -> int:
    from hf_adamas.calibration import MIN_CALIBRATION_TOKENS, calibrate_codes

    if args.num_tokens < MIN_CALIBRATION_TOKENS:
        raise CommandError(f"--num-tokens must be >= {MIN_CALIBRATION_TOKENS}, got {args.num_tokens}")
    _require_file(args.text, "--text")
    claim_outputs([args.output], args.overwrite)
    model, tokenizer = load_model_and_tokenizer(args.model)
    try:
        book = calibrate_codes(model, tokenizer, args.text.read_text(), args.num_tokens, args.bits)
    except ValueError as error:  # the text has fewer tokens than needed
        raise CommandError(str(error)) from error
    command = command_line("hf-adamas", args.argv)
    payload = {"command": command, "machine": machine(), "model": args.model, "bits": args.bits}
    save_json(args.output, {**payload, **book})
    print(json.dumps(book["thresholds"][:3]), "...")
    print(
        f"Saved per-layer thresholds and per-head centroids to {args.output}; use "
        "AdamasConfig(thresholds=..., centroids=...) (centroids: selector='adamas_asymmetric')."
    )
    return 0


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of a causal LM.")
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="Calibration text.")
    parser.add_argument("--num-tokens", type=int, default=1024, help="Tokens of the text to use.")
    parser.add_argument("--bits", type=int, choices=[1, 2], default=2, help="Code width.")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR / "thresholds.json", help="JSON file.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")


def _add_passkey_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_adamas.bench.needle import NEEDLE_FORMATS, SPLITS

    _add_model_arguments(parser)
    _add_method_arguments(parser, [16, 32, 64, 128, 256, 512], METHOD_NAMES)
    parser.add_argument(
        "--haystack",
        choices=["varied", "repeated"],
        default="varied",
        help="varied: sentences of Shakespeare, stdlib docstrings and GSM8K (hf_adamas.bench.needle); "
        "repeated: the original test, one filler sentence repeated.",
    )
    parser.add_argument(
        "--needle-formats", nargs="+", choices=sorted(NEEDLE_FORMATS), default=list(NEEDLE_FORMATS),
        help="Needle formats, cycled over the trials (varied haystack; repeated uses the pass key).",
    )  # fmt: skip
    parser.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
        help="Haystack splits (varied): tune on 'tuning' only, report 'heldout' next to it.",
    )  # fmt: skip
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="Prompt lengths.")
    parser.add_argument(
        "--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="Needle depths, cycled."
    )
    parser.add_argument("--trials", type=int, default=30, help="Trials per split and length.")
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the prompts (numbers, names, haystacks)."
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Keep the records already in --output-dir and measure only the missing (trial, method) pairs.",
    )
    _add_report_only_argument(parser)


def _add_report_only_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Measure nothing: rebuild the JSON/Markdown/PNG summary from the records in --output-dir.",
    )


def _earlier_records(args: argparse.Namespace, records_path: Path, report: list[Path]) -> list[dict]:
    """Claim the records file and the summary; the records kept (``--resume``, ``--report-only``) or none.

    Without either flag an existing records file is an error unless ``--overwrite`` (then it is
    replaced: it is this command's own file); the summary is rebuilt from the records every time.
    """
    from hf_adamas.bench.passkey import read_records

    keep = args.resume or args.report_only
    if args.report_only and not records_path.is_file():
        raise CommandError(
            f"--report-only needs the records of an earlier run, {records_path} does not exist"
        )
    claim_outputs(report if keep else [records_path, *report], getattr(args, "overwrite", False) or keep)
    if not keep:
        records_path.unlink(missing_ok=True)
    return read_records(records_path)


def _run_passkey(args: argparse.Namespace) -> int:
    from hf_adamas.bench.evaluation import method_key, run_passkey
    from hf_adamas.bench.passkey import append_records, passkey_trials, write_passkey_report

    if args.trials < 1:
        raise CommandError(f"--trials must be >= 1, got {args.trials}")
    if min(args.lengths) < 64:
        raise CommandError(
            f"--lengths must be >= 64 tokens (room for the key and question), got {args.lengths}"
        )
    bad_depths = [d for d in args.depths if not 0.0 <= d <= 1.0]
    if bad_depths:
        raise CommandError(f"--depths are fractions of the haystack in [0, 1], got {bad_depths}")
    _check_method_arguments(args, min(args.lengths), "shortest passkey prompt")
    stem = "passkey" if args.haystack == "repeated" else "passkey_varied"
    records_path = args.output_dir / f"{stem}_records.jsonl"
    splits = args.splits if args.haystack == "varied" else ["repeated"]
    report = [
        args.output_dir / name
        for name in (f"{stem}.json", f"{stem}.md", *(f"{stem}_{s}.png" for s in splits))
    ]
    earlier = _earlier_records(args, records_path, report)
    if args.report_only:
        write_passkey_report(
            args.output_dir, stem, command_line("hf-adamas", args.argv), earlier, Path(args.model).name
        )
        return 0
    model, tokenizer = load_model_and_tokenizer(args.model)
    methods = _build_methods(args, model, tokenizer)
    trials = passkey_trials(
        tokenizer,
        args.haystack,
        args.lengths,
        args.depths,
        args.needle_formats,
        args.trials,
        args.splits,
        args.seed,
    )
    done = frozenset((r["trial"], method_key(r["method"], r["budget"])) for r in earlier)
    records = earlier + append_records(records_path, run_passkey(model, tokenizer, methods, trials, done))
    write_passkey_report(
        args.output_dir, stem, command_line("hf-adamas", args.argv), records, Path(args.model).name
    )
    return 0


def _add_ppl_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_method_arguments(parser, [64, 128, 256, 512, 1024], METHOD_NAMES)
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="Text to score.")
    parser.add_argument("--context", type=int, default=8192, help="Total tokens: prefill plus decoded.")
    parser.add_argument(
        "--decode-tokens", type=int, default=256, help="Tokens decoded (and scored) one by one."
    )
    parser.add_argument(
        "--skip-tokens", type=int, default=0, help="Leading tokens of --text to skip (e.g. held-out text)."
    )
    parser.add_argument(
        "--resume", action="store_true", help="Keep the methods already measured in --output-dir."
    )
    _add_report_only_argument(parser)


def _run_ppl(args: argparse.Namespace) -> int:
    from hf_adamas.bench.evaluation import method_key, run_perplexity
    from hf_adamas.bench.passkey import append_records

    if not 1 <= args.decode_tokens < args.context:
        raise CommandError(
            f"--decode-tokens must be at least 1 and below --context ({args.context}), got {args.decode_tokens}"
        )
    _require_file(args.text, "--text")
    _check_method_arguments(args, args.context, "--context")
    records_path = args.output_dir / "perplexity_records.jsonl"
    report = [args.output_dir / f"perplexity{suffix}" for suffix in (".json", ".md", ".png")]
    earlier = _earlier_records(args, records_path, report)
    if args.report_only:
        _write_report(
            args, "perplexity", earlier, "perplexity", "Perplexity (records of earlier runs)", log_x=True
        )
        return 0
    model, tokenizer = load_model_and_tokenizer(args.model)
    text_ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids
    input_ids = text_ids[:, args.skip_tokens : args.skip_tokens + args.context]
    if input_ids.shape[1] <= args.decode_tokens:
        raise CommandError(
            f"{args.text} has {input_ids.shape[1]} tokens, not more than --decode-tokens {args.decode_tokens}"
        )
    methods = _build_methods(args, model, tokenizer)
    done = frozenset(method_key(r["method"], r["budget"]) for r in earlier)
    records = earlier + append_records(
        records_path, run_perplexity(model, input_ids, methods, args.decode_tokens, done)
    )
    title = f"Perplexity of the last {args.decode_tokens} of {input_ids.shape[1]} tokens, {args.text.name}"
    _write_report(args, "perplexity", records, "perplexity", title, log_x=True)
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_method_arguments(
        parser,
        [64, 256, 1024],
        ["dense", "dense-static", "asymmetric-online", "asymmetric-online-kvgroup", "adamas"],
    )
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="Text for the prefilled context.")
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[4096, 8192], help="Prefilled context lengths (tokens)."
    )
    parser.add_argument("--steps", type=int, default=16, help="Timed decode steps per method and round.")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="Rounds in which every method decodes --steps tokens in turn; records hold the median round.",
    )
    parser.add_argument(
        "--few-rows-linear",
        choices=["off", "on", "both"],
        default="off",
        help="Decode every method's linear layers on hf_common.few_rows_linear's one-row C++ kernel "
        "(on), or run each method both ways in the same rounds (both: the kernel's runs are named "
        "'<method>+few-rows-linear'); the speed-up column compares with the fastest dense run of either.",
    )


def _run_bench(args: argparse.Namespace) -> int:
    from hf_adamas.bench.evaluation import run_decode_speed

    if args.steps < 1 or args.rounds < 1:
        raise CommandError(f"--steps and --rounds must be >= 1, got {args.steps} and {args.rounds}")
    _require_file(args.text, "--text")
    _check_method_arguments(args, min(args.contexts), "shortest --contexts")
    if args.few_rows_linear != "off" and not few_rows_linear_available():
        raise CommandError(
            "--few-rows-linear needs hf_common.few_rows_linear's C++ kernel, which is not available here "
            "(no C++ toolchain, or no AVX2/FMA)"
        )
    _claim_report(args, "decode_speed")
    model, tokenizer = load_model_and_tokenizer(args.model)
    text_ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids
    if text_ids.shape[1] < max(args.contexts):
        raise CommandError(
            f"{args.text} has {text_ids.shape[1]} tokens, fewer than --contexts {max(args.contexts)}"
        )
    methods = _with_linear_kernel(_build_methods(args, model, tokenizer), args.few_rows_linear)
    records = []
    for context in args.contexts:
        measured = run_decode_speed(model, text_ids[:, :context], methods, args.steps, rounds=args.rounds)
        fastest_dense = max((r["tokens_per_second"] for r in measured if r["budget"] is None), default=None)
        for record in measured:
            record["speedup_vs_fastest_dense"] = (
                record["tokens_per_second"] / fastest_dense if fastest_dense else None
            )
            record["method"] = f"{record['method']} @{context}"
        records += measured
    from hf_adamas.bench.report import write_decode_report

    title = f"Decode speed after {', '.join(map(str, args.contexts))} tokens of context"
    print(
        write_decode_report(
            args.output_dir, "decode_speed", command_line("hf-adamas", args.argv), records, title
        )
    )
    print(f"Saved {args.output_dir}/decode_speed.json, .md and .png")
    return 0


def _with_linear_kernel(methods: list, few_rows_linear: str) -> list:
    """The bench's methods as ``--few-rows-linear`` asks: as they are (off), on the kernel (on), or both."""
    on_kernel = [
        dataclasses.replace(method, name=f"{method.name}+few-rows-linear", few_rows_linear=True)
        for method in methods
    ]
    return {"off": methods, "on": on_kernel, "both": methods + on_kernel}[few_rows_linear]


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
        "Decode tokens/s at long contexts (default 4K and 8K): sparse methods vs sdpa over a DynamicCache and a StaticCache, each sparse token split into selection / attention / rest (JSON, Markdown, PNG).",
        _add_bench_arguments,
        _run_bench,
    ),
    eval_command("hf-adamas"),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-adamas", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
