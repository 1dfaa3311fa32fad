"""The ``hf-scylla`` command line: train, bench, sweep, stage, publish, eval (plus demo and env)."""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_common.cli import COMMON_COMMANDS, Command, run_cli
from hf_common.data import SHARED_DATA_DIR
from hf_common.default_model import DEFAULT_MODEL_ID
from hf_common.harness import eval_command

DESCRIPTION = "Scylla speculative decoding (arXiv 2505.07858) for transformers generate()."
GSM8K_TRAIN = SHARED_DATA_DIR / "gsm8k" / "train.jsonl"


def _machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return f"{device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_scylla.benchmark import PROMPTS_DIR

    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of the target.")
    parser.add_argument("--draft", type=Path, help="Folder of a trained Scylla draft for --model.")
    parser.add_argument(
        "--untrained-depth",
        type=int,
        default=1,
        help="Without --draft: depth of an untrained (random) draft, which measures the drafting overhead.",
    )
    parser.add_argument("--max-draft-tokens", type=int, help="Override the draft config's chain length.")
    parser.add_argument(
        "--confidence-threshold", type=float, help="Override the draft config's adaptive-length threshold."
    )
    _add_speed_variant_arguments(parser)
    parser.add_argument(
        "--assistant",
        type=Path,
        help="Folder of a standalone draft LM (hf-scylla train --standalone) to add transformers' "
        "assisted generation as a baseline.",
    )
    parser.add_argument(
        "--prompts-dir", type=Path, default=PROMPTS_DIR, help="Folder of *.jsonl prompt sets."
    )
    parser.add_argument("--limit", type=int, default=5, help="Prompts per set (0: all).")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="New tokens per prompt.")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10, help="Prompt lookup candidates.")
    parser.add_argument("--output-dir", type=Path, default=Path("results/scylla"), help="Where results go.")


def _add_speed_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tree`` and ``--draft-vocab-size``: the extra Scylla methods ``bench`` compares (issue 12)."""
    parser.add_argument(
        "--tree",
        type=int,
        nargs=3,
        metavar=("DEPTH", "TOP_K", "TOTAL_TOKENS"),
        help="Also decode with EAGLE-2 dynamic draft trees of this shape (hf_scylla.TreeConfig).",
    )
    from hf_scylla.vocab import DEFAULT_DRAFT_VOCAB_SIZE

    parser.add_argument(
        "--draft-vocab-size",
        type=int,
        nargs="?",
        const=DEFAULT_DRAFT_VOCAB_SIZE,
        help="Also decode with a copy of the draft whose LM head covers this many (alone: "
        f"{DEFAULT_DRAFT_VOCAB_SIZE}) of the most frequent tokens of its training data (hf_scylla.vocab); "
        "with --tree, trees with it too.",
    )


def _speed_variants(args: argparse.Namespace, draft, draft_name: str, target, tokenizer) -> dict:
    """The ``bench`` methods that ``--tree`` / ``--draft-vocab-size`` add: name -> (draft, tree or None)."""
    from hf_scylla.speed import reduced_draft, training_token_counts
    from hf_scylla.tree import TreeConfig

    tree = TreeConfig(*args.tree) if args.tree else None
    variants = {}
    if tree is not None:
        variants[f"{draft_name}+tree{'x'.join(map(str, args.tree))}"] = (draft, tree)
    if args.draft_vocab_size:
        counts = training_token_counts(tokenizer)
        reduced = reduced_draft(draft, target, tokenizer, counts, args.draft_vocab_size)
        variants[f"{draft_name}+vocab{args.draft_vocab_size}"] = (reduced, None)
        if tree is not None:
            name = f"{draft_name}+vocab{args.draft_vocab_size}+tree{'x'.join(map(str, args.tree))}"
            variants[name] = (reduced, tree)
    return variants


def _check_speed_variant_arguments(args: argparse.Namespace) -> None:
    from hf_common.cli import CommandError
    from hf_scylla.tree import TreeConfig

    if args.tree:
        try:
            TreeConfig(*args.tree)
        except ValueError as error:
            raise CommandError(f"--tree: {error}") from error
    if args.draft_vocab_size is not None and args.draft_vocab_size < 1:
        raise CommandError(f"--draft-vocab-size must be >= 1, got {args.draft_vocab_size}")


def plot_speedups(path: Path, rows: list[dict], title: str) -> Path:
    """One line per method: speedup against plain greedy on each prompt set."""
    from hf_common.reporting import plot_series

    methods = dict.fromkeys(row["method"] for row in rows)
    series = {
        method: (
            [r["set"] for r in rows if r["method"] == method],
            [r["speedup"] for r in rows if r["method"] == method],
        )
        for method in methods
    }
    return plot_series(path, series, title, "prompt set", "speedup vs greedy")


def _run_bench(args: argparse.Namespace) -> int:
    from hf_common.default_model import load_model_and_tokenizer
    from hf_common.reporting import markdown_table, save_json
    from hf_scylla.benchmark import load_prompt_sets, run_benchmark
    from hf_scylla.config import ScyllaDraftConfig
    from hf_scylla.modeling import ScyllaDraftModel

    _check_speed_variant_arguments(args)
    target, tokenizer = load_model_and_tokenizer(args.model)
    if args.draft is not None:
        draft = ScyllaDraftModel.from_pretrained(args.draft, target=target, target_tokenizer=tokenizer)
        draft_name = f"scylla:{args.draft.name}"
    else:
        torch.manual_seed(0)
        config = ScyllaDraftConfig.from_target_config(target.config, args.untrained_depth, tokenizer)
        draft = ScyllaDraftModel(config)
        draft.attach_target(target, tokenizer)
        draft_name = f"scylla-untrained-D{args.untrained_depth}"
    draft = draft.to(target.device).eval()
    if args.max_draft_tokens is not None:
        draft.config.max_draft_tokens = args.max_draft_tokens
    if args.confidence_threshold is not None:
        draft.config.confidence_threshold = args.confidence_threshold
    assistant = None
    if args.assistant is not None:
        from transformers import AutoModelForCausalLM

        assistant = AutoModelForCausalLM.from_pretrained(args.assistant, dtype=target.dtype)
        assistant = assistant.to(target.device).eval()
    prompt_sets = load_prompt_sets(args.prompts_dir, args.limit or None)
    rows = run_benchmark(
        target,
        tokenizer,
        prompt_sets,
        draft=draft,
        draft_name=draft_name,
        max_new_tokens=args.max_new_tokens,
        prompt_lookup_tokens=args.prompt_lookup_tokens,
        assistant=assistant,
        assistant_name=f"assisted:{args.assistant.name}" if args.assistant is not None else "assisted",
        variants=_speed_variants(args, draft, draft_name, target, tokenizer),
    )
    command = "hf-scylla " + " ".join(getattr(args, "argv", []))
    save_json(args.output_dir / "bench.json", {"command": command, "machine": _machine(), "rows": rows})
    columns = ["set", "method", "prompts", "tokens_per_second", "speedup", "tokens_per_target_forward", "tau"]
    table = markdown_table(rows, [*columns, "lossless"])
    title = f"Speculative decoding on {args.model}, greedy, {args.max_new_tokens} new tokens"
    (args.output_dir / "bench.md").write_text(
        f"# {title}\n\nCommand: `{command}`\n\nMachine: {_machine()}\n\n{table}"
    )
    plot_title = f"{args.model.split('/')[-1]}, greedy, {args.max_new_tokens} new tokens"
    plot_speedups(args.output_dir / "bench.png", rows, plot_title)
    print(table)
    print(f"Saved {args.output_dir}/bench.json, .md and .png")
    return 0 if all(row["lossless"] for row in rows) else 1


def _add_verify_cost_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_common.outputs import add_output_arguments
    from hf_scylla.benchmark import PROMPTS_DIR

    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of the target.")
    parser.add_argument(
        "--draft", type=Path, required=True, help="Folder of a trained Scylla draft for --model."
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64],
        help="Verification sizes: tokens per target forward.",
    )
    parser.add_argument(
        "--vocab-sizes",
        type=int,
        nargs="+",
        default=[2048, 4096, 8192, 16384],
        help="Reduced draft vocabularies to time and to measure top-1 agreement for.",
    )
    parser.add_argument(
        "--context-tokens", type=int, default=300, help="Tokens in the cache before each forward."
    )
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats per point (median reported).")
    parser.add_argument(
        "--prompts-dir",
        type=Path,
        default=PROMPTS_DIR,
        help="Held-out *.jsonl prompt sets for the agreement.",
    )
    parser.add_argument("--limit", type=int, default=8, help="Prompts per set for the agreement (0: all).")
    add_output_arguments(parser, Path("runs/scylla/verify-cost"))


def _run_verify_cost(args: argparse.Namespace) -> int:
    import os

    from hf_common.cli import CommandError
    from hf_common.default_model import load_model_and_tokenizer
    from hf_common.outputs import claim_outputs
    from hf_common.reporting import command_line, markdown_table, plot_series, write_report
    from hf_scylla.modeling import ScyllaDraftModel
    from hf_scylla.speed import (
        DRAFT_TRAINING_SOURCES,
        agreement_sequences,
        draft_step_seconds,
        reduced_draft,
        speedup_ceiling,
        teacher_forced_agreement,
        training_token_counts,
        verification_cost,
    )

    if min(args.new_tokens) < 1 or 1 not in args.new_tokens:
        raise CommandError("--new-tokens must be positive and include 1 (the plain-decoding step)")
    if min(args.vocab_sizes) < 1 or args.context_tokens < 2 or args.repeats < 1:
        raise CommandError("--vocab-sizes, --context-tokens (>= 2) and --repeats must be positive")
    stem = args.output_dir / "verify_cost"
    claim_outputs(
        [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")], args.overwrite
    )
    load_before = os.getloadavg()
    target, tokenizer = load_model_and_tokenizer(args.model)
    draft = ScyllaDraftModel.from_pretrained(args.draft, target=target, target_tokenizer=tokenizer).eval()
    counts = training_token_counts(tokenizer)
    drafts = {"full": draft} | {
        f"vocab{size}": reduced_draft(draft, target, tokenizer, counts, size) for size in args.vocab_sizes
    }
    sets = agreement_sequences(args.prompts_dir, tokenizer, args.limit or None)
    if not sets:
        raise CommandError(f"no *.jsonl prompt sets in {args.prompts_dir}")
    context = torch.cat(sets.get("sum") or next(iter(sets.values())), dim=1)
    context = context[:, : args.context_tokens]
    costs = verification_cost(target, context, sorted(args.new_tokens), args.repeats)
    steps = {
        name: draft_step_seconds(variant, target, context, 4 * args.repeats)
        for name, variant in drafts.items()
    }
    agreement = {
        name: teacher_forced_agreement(target, drafts, sequences) for name, sequences in sets.items()
    }
    ceilings = {name: speedup_ceiling(costs, seconds) for name, seconds in steps.items()}
    load_after = os.getloadavg()
    curve = [
        {"new_tokens": n, "target_forward_ms": 1e3 * costs[n], "relative_to_1": costs[n] / costs[1]}
        | {f"ceiling_{name}": ceilings[name][n] for name in drafts}
        for n in sorted(costs)
    ]
    vocab_rows = [
        {
            "draft_head": name,
            "head_tokens": variant.lm_head.weight.shape[0],
            "draft_step_ms": 1e3 * steps[name],
            "draft_step_vs_target_step": steps[name] / costs[1],
        }
        | {f"agreement_{set_name}": agreement[set_name][name]["agreement"] for set_name in sets}
        for name, variant in drafts.items()
    ]
    command = command_line("hf-scylla", getattr(args, "argv", []))
    payload = {
        "context_tokens": context.shape[1],
        "load_average_before": load_before,
        "load_average_after": load_after,
        "frequency_source": [str(path) for path in DRAFT_TRAINING_SOURCES],
        "agreement_positions": {
            name: next(iter(values.values()))["positions"] for name, values in agreement.items()
        },
        "verification_curve": curve,
        "draft_heads": vocab_rows,
    }
    body = (
        f"Target forward of n new tokens after a {context.shape[1]}-token cache (median of {args.repeats}); "
        f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}. `ceiling_*`: speed-up if every "
        "draft token of an n-token verification were accepted, n t(1) / (t(n) + (n-1) t_draft).\n\n"
        + markdown_table(curve, list(curve[0]))
        + "\nDraft heads: step time and teacher-forced top-1 agreement with the target on the held-out prompt "
        "sets (prompt + reference answer where the set has one; token frequencies counted on the draft's "
        "training data only).\n\n" + markdown_table(vocab_rows, list(vocab_rows[0]))
    )
    write_report(
        args.output_dir,
        "verify_cost",
        command,
        payload,
        f"Verification cost and draft heads, {args.model}",
        body,
    )
    series = {
        f"ceiling, {name} head": (sorted(costs), [ceilings[name][n] for n in sorted(costs)])
        for name in drafts
    }
    series["target forward / t(1)"] = (sorted(costs), [costs[n] / costs[1] for n in sorted(costs)])
    plot_series(
        stem.with_suffix(".png"),
        series,
        f"{args.model.split('/')[-1]}: verification cost and speed-up ceiling",
        "tokens per target forward",
        "ratio",
        baselines={"plain decoding": 1.0},
        log_x=True,
    )
    print(body)
    return 0


def _read_conversations(path: Path, limit: int) -> list[tuple[str, str]]:
    from hf_scylla.data import read_conversations

    try:
        return read_conversations(path, limit)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error} (pass another with --data)") from None


def _text_windows(sources: list[Path] | None, tokenizer, window: int, tokens: int) -> list[torch.Tensor]:
    """General-text windows for the pretraining stage (default sources: shared text + Python stdlib)."""
    from hf_scylla.data import default_text_sources, text_token_chunks

    try:
        return text_token_chunks(tokenizer, sources or default_text_sources(), window, tokens)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def _add_stage_option(parser: argparse.ArgumentParser, finetune: str) -> None:
    parser.add_argument(
        "--stage",
        choices=("finetune", "pretrain"),
        default="finetune",
        help=f"finetune: {finetune}; pretrain: windows of general text from --text.",
    )
    parser.add_argument(
        "--text",
        type=Path,
        action="append",
        help="pretrain: a text file or folder (repeatable; default: ../shared/data/text and the Python "
        "standard library source).",
    )


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of the target.")
    _add_stage_option(parser, "chat pairs from --data")
    parser.add_argument("--data", type=Path, default=GSM8K_TRAIN, help="JSONL of prompt/response pairs.")
    parser.add_argument("--samples", type=int, default=400, help="Conversations to train on.")
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="Replace the data's responses with the target's own greedy answers (cached in --output-dir).",
    )
    parser.add_argument(
        "--regenerate-tokens", type=int, default=256, help="Most new tokens per regenerated response."
    )
    parser.add_argument("--tokens", type=int, default=200_000, help="pretrain: tokens of general text.")
    parser.add_argument(
        "--max-length", type=int, default=256, help="Tokens per conversation (truncated) or text window."
    )
    parser.add_argument("--depth", type=int, default=1, help="Draft decoder layers D.")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="Train the baseline instead: a standalone causal LM of the draft's shape (tokens only, for "
        "assisted generation; see hf_scylla.standalone).",
    )
    parser.add_argument(
        "--features",
        type=Path,
        help="Reuse this cached features file (features-*.pt of an earlier run on the same data).",
    )
    parser.add_argument("--init-draft", type=Path, help="Start from this trained draft instead of a new one.")
    parser.add_argument("--epochs", type=float, default=1.0, help="Passes over the cached features.")
    parser.add_argument("--batch-size", type=int, default=8, help="Conversations per step.")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="AdamW learning rate.")
    parser.add_argument("--unroll-steps", type=int, default=2, help="Passes on the draft's own features.")
    parser.add_argument(
        "--token-weight",
        type=float,
        default=0.1,
        help="Weight of the LM-head distillation term (0: feature loss only).",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs/scylla/draft"), help="Draft and checkpoints."
    )
    parser.add_argument(
        "--resume", action="store_true", help="Continue from the last checkpoint in --output-dir."
    )


def _features_name(args: argparse.Namespace) -> str:
    """File name of the cached target features: what they were built from (delete it to rebuild)."""
    if args.stage == "pretrain":
        return f"features-text-{args.tokens}x{args.max_length}.pt"
    regenerated = f"regen{args.regenerate_tokens}-" if args.regenerate else ""
    return f"features-{regenerated}{args.samples}x{args.max_length}.pt"


def _build_train_features(args: argparse.Namespace, target, tokenizer):
    from hf_scylla.data import regenerate_responses
    from hf_scylla.training import cache_target_features, cache_text_features

    if args.stage == "pretrain":
        return cache_text_features(target, _text_windows(args.text, tokenizer, args.max_length, args.tokens))
    conversations = _read_conversations(args.data, args.samples)
    if args.regenerate:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        cache = args.output_dir / "regenerated.jsonl"
        try:
            prompts = [prompt for prompt, _ in conversations]
            conversations = regenerate_responses(target, tokenizer, prompts, args.regenerate_tokens, cache)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    return cache_target_features(target, tokenizer, conversations, max_length=args.max_length)


def _run_train(args: argparse.Namespace) -> int:
    from hf_common.default_model import load_model_and_tokenizer
    from hf_scylla.config import ScyllaDraftConfig
    from hf_scylla.modeling import ScyllaDraftModel
    from hf_scylla.training import FeatureDataset, train_draft

    if args.stage == "pretrain" and args.regenerate:
        raise SystemExit("error: --regenerate answers chat prompts; it applies to --stage finetune only")
    if args.features is not None and not args.features.is_file():
        raise SystemExit(f"error: features file {args.features} not found")
    target, tokenizer = load_model_and_tokenizer(args.model)
    features = FeatureDataset.cached(
        args.features or args.output_dir / _features_name(args),
        lambda: _build_train_features(args, target, tokenizer),
    )
    settings = {
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "resume": args.resume,
    }
    if args.standalone:
        result = _train_standalone(args, target, tokenizer, features, settings)
    else:
        if args.init_draft is not None:  # e.g. fine-tune a feature-only draft with the distillation term
            draft = ScyllaDraftModel.from_pretrained(
                args.init_draft, target=target, target_tokenizer=tokenizer
            )
        else:
            torch.manual_seed(0)
            draft = ScyllaDraftModel(
                ScyllaDraftConfig.from_target_config(target.config, args.depth, tokenizer)
            )
            draft.attach_target(target, tokenizer)
        draft.to(target.device)
        result = train_draft(
            draft,
            features,
            args.output_dir,
            unroll_steps=args.unroll_steps,
            token_weight=args.token_weight,
            **settings,
        )
    kind = "standalone draft LM" if args.standalone else "draft"
    print(
        f"trained {result.global_step} steps, mean loss {result.training_loss:.4f}; {kind} saved to {args.output_dir}"
    )
    return 0


def _train_standalone(args: argparse.Namespace, target, tokenizer, features, settings: dict):
    from transformers import AutoModelForCausalLM

    from hf_scylla.standalone import make_standalone_draft, train_standalone_draft

    if args.init_draft is not None:
        model = AutoModelForCausalLM.from_pretrained(args.init_draft, dtype=target.dtype).to(target.device)
        if model.config.vocab_size != target.config.vocab_size:
            raise SystemExit(
                f"error: {args.init_draft} has a vocabulary of {model.config.vocab_size}, "
                f"the target {target.config.vocab_size}"
            )
    else:
        torch.manual_seed(0)
        model = make_standalone_draft(target, args.depth)
    result = train_standalone_draft(model, features, args.output_dir, **settings)
    tokenizer.save_pretrained(args.output_dir)  # a complete model folder: usable as assistant_model
    return result


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_scylla.benchmark import PROMPTS_DIR
    from hf_scylla.sweep import SweepSettings

    defaults = SweepSettings()
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of the target.")
    _add_stage_option(parser, "chat pairs from --data (the fine-tuning stage's data)")
    parser.add_argument("--data", type=Path, default=GSM8K_TRAIN, help="JSONL of prompt/response pairs.")
    parser.add_argument(
        "--max-length", type=int, default=192, help="Tokens per conversation (truncated) or text window."
    )
    parser.add_argument(
        "--samples",
        type=int,
        nargs="+",
        default=list(defaults.samples),
        help="Tokens axis: conversations (pretrain: text windows) per draft (nested subsets; use "
        "log-spaced values).",
    )
    parser.add_argument(
        "--tokens-depth", type=int, default=defaults.tokens_depth, help="Depth on the tokens axis."
    )
    parser.add_argument(
        "--depths", type=int, nargs="+", default=list(defaults.depths), help="Depth axis: draft depths D."
    )
    parser.add_argument(
        "--depth-samples", type=int, default=defaults.depth_samples, help="Conversations on the depth axis."
    )
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="Passes over each subset.")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Conversations per step.")
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="AdamW learning rate."
    )
    parser.add_argument(
        "--unroll-steps", type=int, default=defaults.unroll_steps, help="Passes on the draft's own features."
    )
    parser.add_argument(
        "--token-weight",
        type=float,
        default=defaults.token_weight,
        help="Weight of the LM-head distillation term.",
    )
    parser.add_argument(
        "--eval-prompts-file",
        type=Path,
        default=PROMPTS_DIR / "gsm8k.jsonl",
        help="Held-out prompts (EAGLE question.jsonl format) decoded to measure tau.",
    )
    parser.add_argument(
        "--eval-prompts", type=int, default=defaults.eval_prompts, help="Prompts decoded per point."
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=defaults.max_new_tokens, help="New tokens per prompt."
    )
    parser.add_argument(
        "--max-draft-tokens", type=int, default=defaults.max_draft_tokens, help="Draft chain length (fixed)."
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("runs/scylla/sweep"),
        help="Cached features, drafts, checkpoints.",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("results/scylla/sweep"),
        help="Per-point JSON, summary, plots.",
    )


def _run_sweep(args: argparse.Namespace) -> int:
    from hf_common.default_model import load_model_and_tokenizer
    from hf_scylla.benchmark import encode_prompt, load_prompt_file
    from hf_scylla.sweep import SweepSettings, plan_points, run_sweep
    from hf_scylla.training import FeatureDataset, cache_target_features, cache_text_features

    settings = SweepSettings(
        samples=tuple(args.samples),
        tokens_depth=args.tokens_depth,
        depths=tuple(args.depths),
        depth_samples=args.depth_samples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        unroll_steps=args.unroll_steps,
        token_weight=args.token_weight,
        eval_prompts=args.eval_prompts,
        max_new_tokens=args.max_new_tokens,
        max_draft_tokens=args.max_draft_tokens,
    )
    if not args.eval_prompts_file.is_file():
        raise SystemExit(f"error: prompt file {args.eval_prompts_file} not found (pass --eval-prompts-file)")
    target, tokenizer = load_model_and_tokenizer(args.model)
    needed = max(point.samples for point in plan_points(settings))
    if args.stage == "pretrain":
        features = FeatureDataset.cached(
            args.work_dir / f"features-text-{needed}x{args.max_length}.pt",
            lambda: cache_text_features(
                target, _text_windows(args.text, tokenizer, args.max_length, needed * args.max_length)
            ),
        )
    else:
        features = FeatureDataset.cached(
            args.work_dir / f"features-{needed}x{args.max_length}.pt",
            lambda: cache_target_features(
                target, tokenizer, _read_conversations(args.data, needed), max_length=args.max_length
            ),
        )
    questions = load_prompt_file(args.eval_prompts_file, args.eval_prompts)
    prompts = [encode_prompt(tokenizer, question).to(target.device) for question in questions]
    metadata = {
        "command": "hf-scylla " + " ".join(getattr(args, "argv", [])),
        "machine": _machine(),
        "stage": args.stage,
    }
    summary = run_sweep(
        target, tokenizer, features, prompts, settings, args.work_dir, args.output_dir, metadata, print
    )
    for axis, entry in summary["fits"].items():
        fit = entry["fit"]
        text = f"a={fit['a']:.4f} b={fit['b']:.4f} R2={fit['r2']:.3f}" if fit else "not enough points"
        print(f"tau vs {axis}: {text}")
    print(f"Saved {args.output_dir}/sweep.json, .md and tau_vs_*.png")
    return 0 if all(point["lossless"] for point in summary["points"]) else 1


def _add_batch_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_common.demo import STAGED_DRAFT_NAME
    from hf_scylla.benchmark import PROMPTS_DIR

    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of the target.")
    parser.add_argument(
        "--draft", type=Path, help=f"Trained Scylla draft folder (default: model_cards/{STAGED_DRAFT_NAME})."
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="Decoding batch sizes (log-spaced)."
    )
    parser.add_argument(
        "--draft-tokens", type=int, nargs="+", default=[1, 2, 3, 4], help="Draft chain lengths k to try."
    )
    parser.add_argument(
        "--prompts-dir", type=Path, default=PROMPTS_DIR, help="Folder of *.jsonl prompt sets."
    )
    parser.add_argument(
        "--limit", type=int, default=4, help="Prompts per set; the same prompts are decoded at every B."
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="New tokens per prompt.")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("results/scylla/batch"), help="Where results and plots go."
    )


def _run_batch_sweep(args: argparse.Namespace) -> int:
    from hf_common.default_model import load_model_and_tokenizer
    from hf_common.demo import find_staged_draft
    from hf_scylla.batch_sweep import run_batch_sweep
    from hf_scylla.benchmark import load_prompt_sets
    from hf_scylla.modeling import ScyllaDraftModel

    draft_dir = args.draft or find_staged_draft()
    if draft_dir is None:
        raise SystemExit("error: no staged draft found under model_cards/; pass --draft")
    target, tokenizer = load_model_and_tokenizer(args.model)
    draft = ScyllaDraftModel.from_pretrained(draft_dir, target=target, target_tokenizer=tokenizer)
    draft = draft.to(target.device).eval()
    prompt_sets = load_prompt_sets(args.prompts_dir, args.limit or None)
    # Interleave the sets so every batch mixes them (as a server's batch would).
    questions = [q for group in zip(*prompt_sets.values(), strict=False) for q in group]
    metadata = {
        "command": "hf-scylla " + " ".join(getattr(args, "argv", [])),
        "machine": _machine(),
        "draft": Path(draft_dir).name,
    }
    summary = run_batch_sweep(
        target,
        tokenizer,
        draft,
        questions,
        args.batch_sizes,
        args.draft_tokens,
        args.max_new_tokens,
        args.output_dir,
        metadata,
        print,
    )
    for best in summary["best"]:
        print(f"B={best['batch_size']}: best k={best['draft_tokens']} (speedup {best['speedup']:.2f})")
    print(f"Saved {args.output_dir}/batch_sweep.json, .md and *_vs_batch.png")
    return 0 if all(point["lossless"] for point in summary["points"]) else 1


def _add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="Folder of a saved Scylla draft (save_pretrained).")
    parser.add_argument(
        "--repo-name", required=True, help="Hub repository '<org>/<name>' it will be published to."
    )
    parser.add_argument(
        "--output-dir", type=Path, required=True, help="Folder to write the staged repository into."
    )
    parser.add_argument(
        "--target",
        help="Hub ID or folder of the target (its tokenizer is staged; default: the draft config's target).",
    )
    parser.add_argument(
        "--base-model",
        help="Hub ID of the target recorded in the card (default: the draft config's target, else --target).",
    )
    parser.add_argument(
        "--eval-results",
        type=Path,
        help="JSON with measured tau and/or speedup plus dataset_name, dataset_type (optional dataset_split, "
        "setting); without it the card says 'not evaluated yet'.",
    )
    parser.add_argument(
        "--dataset", action="append", default=[], help="Training dataset Hub ID (repeatable)."
    )
    parser.add_argument(
        "--training-notes",
        help="How the draft was trained (objective, steps, hyperparameters), for the card.",
    )
    parser.add_argument(
        "--max-draft-tokens",
        type=int,
        help="Store this chain length in the staged config (e.g. the benchmarked one).",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        help="Store this adaptive-length threshold in the staged config.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output-dir.")


def _run_stage(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from hf_common.default_model import default_model_path, load_model_and_tokenizer
    from hf_scylla.config import ScyllaDraftConfig
    from hf_scylla.hub import stage_draft
    from hf_scylla.modeling import ScyllaDraftModel

    target_name = args.target or ScyllaDraftConfig.from_pretrained(args.checkpoint).target_name_or_path
    if not target_name:
        raise SystemExit("error: the draft config names no target; pass --target")
    # The default model's tokenizer comes from the embedded copy, so staging works offline.
    embedded = target_name == DEFAULT_MODEL_ID and not Path(target_name).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path() if embedded else target_name)
    draft = ScyllaDraftModel.from_pretrained(args.checkpoint)
    if draft.config.save_embeddings and not draft.is_attached:
        draft.attach_target(load_model_and_tokenizer(target_name)[0], tokenizer)
    if args.max_draft_tokens is not None:
        draft.config.max_draft_tokens = args.max_draft_tokens
    if args.confidence_threshold is not None:
        draft.config.confidence_threshold = args.confidence_threshold
    eval_results = json.loads(args.eval_results.read_text()) if args.eval_results else None
    try:
        draft.config._check_draft_fields()
        folder = stage_draft(
            draft,
            tokenizer,
            args.output_dir,
            repo_name=args.repo_name,
            eval_results=eval_results,
            datasets=args.dataset,
            training_notes=args.training_notes,
            base_model=args.base_model or draft.config.target_name_or_path or target_name,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}")
        return 1
    print(
        f"Staged {args.repo_name} in {folder}; check it with: hf-scylla publish {folder} --repo-id "
        f"{args.repo_name} --dry-run"
    )
    return 0


def _add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="A folder written by `hf-scylla stage`.")
    parser.add_argument("--repo-id", required=True, help="Hub repository '<org>/<name>'.")
    parser.add_argument("--tag", help="Tag the upload commit with this revision name (e.g. v1).")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Allow replacing an existing repository's files."
    )
    parser.add_argument("--dry-run", action="store_true", help="Validate and list the files; send nothing.")
    parser.add_argument(
        "--endpoint", help="Hub endpoint (default: $HF_ENDPOINT or huggingface.co); token: $HF_TOKEN."
    )


def _run_publish(args: argparse.Namespace) -> int:
    from hf_scylla.hub import PublishError, StagedFolderError, publish

    try:
        result = publish(
            args.folder,
            args.repo_id,
            endpoint=args.endpoint,
            revision_tag=args.tag,
            private=args.private,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
        )
    except (PublishError, StagedFolderError) as error:
        print(f"error: {error}")
        return 1
    for file in result.files:
        print(f"{file.sha256}  {file.size:>12}  {file.path}")
    if result.dry_run:
        print(f"Dry run: {len(result.files)} files would be uploaded to {args.repo_id}; nothing was sent.")
    else:
        tag = f", tagged {result.tag}" if result.tag else ""
        print(f"Uploaded {len(result.files)} files to {result.repo_url} in commit {result.commit_oid}{tag}")
    return 0


def _speculative_eval_results(results: dict) -> list:
    from hf_scylla.harness import speculative_eval_results

    return speculative_eval_results(results)


COMMANDS = (
    *COMMON_COMMANDS,
    Command(
        "train",
        "Train a Scylla draft for a target on cached target features (EAGLE loss, Trainer, resumable).",
        _add_train_arguments,
        _run_train,
    ),
    Command(
        "bench",
        "Tokens/s, acceptance length and speedup of Scylla and prompt lookup vs greedy, checked lossless.",
        _add_bench_arguments,
        _run_bench,
    ),
    Command(
        "verify-cost",
        "Target forward time for 1..64 new tokens, draft step time per head size, reduced-vocabulary "
        "agreement, and the speed-up ceiling they imply (JSON, Markdown, PNG).",
        _add_verify_cost_arguments,
        _run_verify_cost,
    ),
    Command(
        "sweep",
        "Scaling sweep: train drafts over training tokens and depth, measure tau, fit tau = a + b ln x.",
        _add_sweep_arguments,
        _run_sweep,
    ),
    Command(
        "batch-sweep",
        "Batch-size axis: batched speculative decoding over batch sizes and draft lengths, fits vs ln B.",
        _add_batch_sweep_arguments,
        _run_batch_sweep,
    ),
    Command(
        "stage",
        "Write a saved draft as a complete Hub repository folder (weights, tokenizer, custom_generate, card).",
        _add_stage_arguments,
        _run_stage,
    ),
    Command(
        "publish",
        "Validate a staged folder and upload it to the Hub in one commit (optionally tagged).",
        _add_publish_arguments,
        _run_publish,
    ),
    eval_command("hf-scylla", card_extras=_speculative_eval_results),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-scylla", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
