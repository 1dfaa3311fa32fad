"""The ``hf-scylla`` command line: train, bench, sweep, stage, publish, eval (plus demo and env)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_common.cli import COMMON_COMMANDS, Command, CommandError, run_cli
from hf_common.data import SHARED_DATA_DIR
from hf_common.default_model import DEFAULT_MODEL_ID
from hf_common.demo import demo_command
from hf_common.harness import eval_command
from hf_common.outputs import RUNS_DIR, add_output_arguments, claim_outputs
from hf_common.reporting import command_line

DESCRIPTION = "Scylla speculative decoding (arXiv 2505.07858) for transformers generate()."
GSM8K_TRAIN = SHARED_DATA_DIR / "gsm8k" / "train.jsonl"


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_scylla.bench.speed import PROMPTS_DIR

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
    add_output_arguments(parser, RUNS_DIR / "scylla" / "bench")


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
    from hf_common.reporting import markdown_table, write_report
    from hf_scylla.bench.speed import load_prompt_sets, run_benchmark
    from hf_scylla.config import ScyllaDraftConfig
    from hf_scylla.modeling import ScyllaDraftModel

    if args.draft is not None and not (args.draft / "config.json").is_file():
        raise CommandError(f"--draft {args.draft} is not a saved Scylla draft (no config.json)")
    if args.assistant is not None and not (args.assistant / "config.json").is_file():
        raise CommandError(f"--assistant {args.assistant} is not a saved model folder (no config.json)")
    if not args.prompts_dir.is_dir():
        raise CommandError(f"--prompts-dir {args.prompts_dir} is not a folder")
    for flag, value in {
        "--max-new-tokens": args.max_new_tokens,
        "--untrained-depth": args.untrained_depth,
    }.items():
        if value < 1:
            raise CommandError(f"{flag} must be >= 1, got {value}")
    if args.limit < 0:
        raise CommandError(f"--limit must be >= 0 (0: all prompts), got {args.limit}")
    claim_outputs([args.output_dir / f"bench.{suffix}" for suffix in ("json", "md", "png")], args.overwrite)
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
    )
    command = command_line("hf-scylla", getattr(args, "argv", []))
    columns = ["set", "method", "prompts", "tokens_per_second", "speedup", "tokens_per_target_forward", "tau"]
    table = markdown_table(rows, [*columns, "lossless"])
    title = f"Speculative decoding on {args.model}, greedy, {args.max_new_tokens} new tokens"
    write_report(args.output_dir, "bench", command, {"rows": rows}, title, table)
    plot_title = f"{args.model.split('/')[-1]}, greedy, {args.max_new_tokens} new tokens"
    plot_speedups(args.output_dir / "bench.png", rows, plot_title)
    print(table)
    print(f"Saved {args.output_dir}/bench.json, .md and .png")
    return 0 if all(row["lossless"] for row in rows) else 1


def _read_conversations(path: Path, limit: int) -> list[tuple[str, str]]:
    from hf_scylla.data import read_conversations

    try:
        return read_conversations(path, limit)
    except FileNotFoundError as error:
        raise CommandError(f"{error} (pass another with --data)") from None
    except (ValueError, KeyError) as error:
        raise CommandError(f"--data {path} is not JSONL of prompt/response records: {error}") from None


def _text_windows(sources: list[Path] | None, tokenizer, window: int, tokens: int) -> list[torch.Tensor]:
    """General-text windows for the pretraining stage (default sources: shared text + Python stdlib)."""
    from hf_scylla.data import default_text_sources, text_token_chunks

    try:
        return text_token_chunks(tokenizer, sources or default_text_sources(), window, tokens)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None


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
    add_output_arguments(parser, RUNS_DIR / "scylla" / "draft", "draft, checkpoints and cached features")
    parser.add_argument(
        "--resume", action="store_true", help="Continue from the last checkpoint in --output-dir."
    )


def _features_path(
    args: argparse.Namespace, folder: Path, target, tokenizer, samples: int, tokens: int
) -> Path:
    """Where the target features of this run are cached, keyed by everything they depend on."""
    from hf_scylla.config import tokenizer_fingerprint
    from hf_scylla.data import default_text_sources, sources_fingerprint
    from hf_scylla.training import feature_cache_path, weights_fingerprint

    description = {
        "stage": args.stage,
        "target": args.model,
        "target_weights": weights_fingerprint(target),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": tokenizer.chat_template,
        "max_length": args.max_length,
        "feature_layer": -1,  # hidden_states[-1], the final normed state
        "feature_dtype": "bfloat16",
    }
    try:
        if args.stage == "pretrain":
            sources = args.text or default_text_sources()
            description |= {"text": [str(Path(p).resolve()) for p in sources], "tokens": tokens}
            description["text_sha256"] = sources_fingerprint(sources)
            stem = f"features-text-{tokens}x{args.max_length}"
        else:
            regenerate = getattr(args, "regenerate", False)
            description |= {"data": str(args.data.resolve()), "samples": samples}
            description["data_sha256"] = sources_fingerprint([args.data])
            description["regenerate_tokens"] = args.regenerate_tokens if regenerate else None
            stem = f"features-{f'regen{args.regenerate_tokens}-' if regenerate else ''}{samples}x{args.max_length}"
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    return feature_cache_path(folder, stem, description), description


def _cached_features(path: Path, build, description: dict):
    from hf_scylla.training import FeatureDataset, trained_positions

    try:
        features = FeatureDataset.cached(path, build, description)
    except ValueError as error:
        raise CommandError(str(error)) from None
    if not trained_positions(features):
        raise CommandError(
            f"no position is trained: --max-length {description['max_length']} cuts every conversation "
            "before its response begins (the chat template's system prompt and the question fill it); "
            "raise --max-length"
        )
    return features


def _build_train_features(args: argparse.Namespace, target, tokenizer):
    from hf_scylla.data import regenerate_responses
    from hf_scylla.training import cache_target_features, cache_text_features, weights_fingerprint

    if args.stage == "pretrain":
        return cache_text_features(target, _text_windows(args.text, tokenizer, args.max_length, args.tokens))
    conversations = _read_conversations(args.data, args.samples)
    if args.regenerate:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        cache = args.output_dir / f"regenerated-{weights_fingerprint(target)}.jsonl"  # per target
        try:
            prompts = [prompt for prompt, _ in conversations]
            conversations = regenerate_responses(target, tokenizer, prompts, args.regenerate_tokens, cache)
        except ValueError as error:
            raise CommandError(str(error)) from None
    return cache_target_features(target, tokenizer, conversations, max_length=args.max_length)


def _check_train_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model, so a bad flag fails at once rather than after loading."""
    if args.stage == "pretrain" and args.regenerate:
        raise CommandError("--regenerate answers chat prompts; it applies to --stage finetune only")
    if args.features is not None and not args.features.is_file():
        raise CommandError(f"features file {args.features} not found")
    if args.init_draft is not None and not (args.init_draft / "config.json").is_file():
        raise CommandError(f"--init-draft {args.init_draft} is not a saved model folder (no config.json)")
    positive = {"--samples": args.samples, "--tokens": args.tokens, "--depth": args.depth}
    positive |= {"--batch-size": args.batch_size, "--unroll-steps": args.unroll_steps}
    positive |= {"--regenerate-tokens": args.regenerate_tokens}
    for flag, value in positive.items():
        if value < 1:
            raise CommandError(f"{flag} must be >= 1, got {value}")
    if args.max_length < 2:
        raise CommandError(f"--max-length must be >= 2 (a draft learns from pairs), got {args.max_length}")
    for flag, value in {"--epochs": args.epochs, "--learning-rate": args.learning_rate}.items():
        if not math.isfinite(value) or value <= 0:
            raise CommandError(f"{flag} must be a positive number, got {value}")
    if not math.isfinite(args.token_weight) or args.token_weight < 0:
        raise CommandError(f"--token-weight must be >= 0, got {args.token_weight}")
    if args.features is None:
        _check_data_sources(args)


def _check_data_sources(args: argparse.Namespace) -> None:
    """``--data`` (finetune) or the given ``--text`` sources (pretrain) exist and read."""
    from hf_scylla.data import sources_fingerprint

    if args.stage == "finetune":
        _read_conversations(args.data, 1)
        return
    try:
        sources_fingerprint(args.text or [])
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None


def _run_train(args: argparse.Namespace) -> int:
    from hf_common.default_model import load_model_and_tokenizer
    from hf_common.outputs import claim_outputs
    from hf_scylla.config import ScyllaDraftConfig
    from hf_scylla.modeling import ScyllaDraftModel
    from hf_scylla.training import train_draft

    _check_train_arguments(args)
    claim_outputs(
        [args.output_dir / "config.json", args.output_dir / "model.safetensors"],
        args.overwrite or args.resume,
    )
    target, tokenizer = load_model_and_tokenizer(args.model)
    path, description = _features_path(args, args.output_dir, target, tokenizer, args.samples, args.tokens)
    features = _cached_features(
        args.features or path, lambda: _build_train_features(args, target, tokenizer), description
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
            raise CommandError(
                f"{args.init_draft} has a vocabulary of {model.config.vocab_size}, "
                f"the target {target.config.vocab_size}"
            )
    else:
        torch.manual_seed(0)
        model = make_standalone_draft(target, args.depth)
    result = train_standalone_draft(model, features, args.output_dir, **settings)
    tokenizer.save_pretrained(args.output_dir)  # a complete model folder: usable as assistant_model
    return result


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_scylla.bench.speed import PROMPTS_DIR
    from hf_scylla.bench.sweep import SweepSettings

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
        default=RUNS_DIR / "scylla" / "sweep-work",
        help="Cached features, drafts, checkpoints.",
    )
    add_output_arguments(parser, RUNS_DIR / "scylla" / "sweep", "per-point JSON, summary and plots")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue an interrupted sweep in --output-dir: its finished points are kept, the summary rewritten.",
    )


def _run_sweep(args: argparse.Namespace) -> int:
    from hf_common.default_model import load_model_and_tokenizer
    from hf_scylla.bench.speed import load_prompt_file
    from hf_scylla.bench.sweep import SweepSettings, plan_points, run_sweep
    from hf_scylla.data import encode_prompt
    from hf_scylla.training import cache_target_features, cache_text_features

    try:
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
    except ValueError as error:
        raise CommandError(str(error)) from None
    if not args.eval_prompts_file.is_file():
        raise CommandError(f"prompt file {args.eval_prompts_file} not found (pass --eval-prompts-file)")
    needed = max(point.samples for point in plan_points(settings))
    _check_data_sources(args)
    claim_outputs(
        [args.output_dir / "sweep.json", args.output_dir / "sweep.md"], args.overwrite or args.resume
    )
    target, tokenizer = load_model_and_tokenizer(args.model)
    tokens = needed * args.max_length
    path, description = _features_path(args, args.work_dir, target, tokenizer, needed, tokens)
    if args.stage == "pretrain":
        features = _cached_features(
            path,
            lambda: cache_text_features(target, _text_windows(args.text, tokenizer, args.max_length, tokens)),
            description,
        )
    else:
        features = _cached_features(
            path,
            lambda: cache_target_features(
                target, tokenizer, _read_conversations(args.data, needed), max_length=args.max_length
            ),
            description,
        )
    questions = load_prompt_file(args.eval_prompts_file, args.eval_prompts)
    prompts = [encode_prompt(tokenizer, question).to(target.device) for question in questions]
    metadata = {
        "command": command_line("hf-scylla", getattr(args, "argv", [])),
        "stage": args.stage,
    }
    try:
        summary = run_sweep(
            target, tokenizer, features, prompts, settings, args.work_dir, args.output_dir, metadata, print
        )
    except ValueError as error:  # too few cached conversations, points measured with other settings
        raise CommandError(str(error)) from None
    for axis, entry in summary["fits"].items():
        fit = entry["fit"]
        text = f"a={fit['a']:.4f} b={fit['b']:.4f} R2={fit['r2']:.3f}" if fit else "not enough points"
        print(f"tau vs {axis}: {text}")
    print(f"Saved {args.output_dir}/sweep.json, .md and tau_vs_*.png")
    return 0 if all(point["lossless"] for point in summary["points"]) else 1


def _add_batch_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_scylla.bench.speed import PROMPTS_DIR
    from hf_scylla.demo import STAGED_DRAFT_NAME

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
    add_output_arguments(parser, RUNS_DIR / "scylla" / "batch")


def _run_batch_sweep(args: argparse.Namespace) -> int:
    from hf_common.default_model import load_model_and_tokenizer
    from hf_scylla.bench.batch_sweep import run_batch_sweep
    from hf_scylla.bench.speed import load_prompt_sets
    from hf_scylla.demo import find_staged_draft
    from hf_scylla.modeling import ScyllaDraftModel

    draft_dir = args.draft or find_staged_draft()
    if draft_dir is None:
        raise CommandError("no staged draft found under model_cards/; pass --draft")
    if not (Path(draft_dir) / "config.json").is_file():
        raise CommandError(f"--draft {draft_dir} is not a saved Scylla draft (no config.json)")
    if min(args.batch_sizes) < 1 or min(args.draft_tokens) < 1 or args.max_new_tokens < 1:
        raise CommandError("--batch-sizes, --draft-tokens and --max-new-tokens must be >= 1")
    names = ["batch_sweep.json", "batch_sweep.md", "speedup_vs_batch.png", "tau_vs_batch.png"]
    claim_outputs([args.output_dir / name for name in names], args.overwrite)
    target, tokenizer = load_model_and_tokenizer(args.model)
    draft = ScyllaDraftModel.from_pretrained(draft_dir, target=target, target_tokenizer=tokenizer)
    draft = draft.to(target.device).eval()
    prompt_sets = load_prompt_sets(args.prompts_dir, args.limit or None)
    # Interleave the sets so every batch mixes them (as a server's batch would).
    questions = [q for group in zip(*prompt_sets.values(), strict=False) for q in group]
    metadata = {
        "command": command_line("hf-scylla", getattr(args, "argv", [])),
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the files an earlier `hf-scylla stage` wrote into --output-dir (only those; a folder "
        "it did not write is never touched).",
    )


def _read_eval_results(path: Path | None) -> dict | None:
    """The ``--eval-results`` JSON, checked as the card will use it (before anything is loaded)."""
    from hf_scylla.hub import eval_result_entries

    if path is None:
        return None
    try:
        eval_results = json.loads(path.read_text())
    except FileNotFoundError:
        raise CommandError(f"--eval-results file {path} not found") from None
    except (OSError, ValueError) as error:
        raise CommandError(f"--eval-results {path} is not a JSON file: {error}") from None
    if not isinstance(eval_results, dict):
        raise CommandError(
            f"--eval-results {path} must hold a JSON object, got {type(eval_results).__name__}"
        )
    try:
        eval_result_entries(eval_results)
    except ValueError as error:
        raise CommandError(f"--eval-results {path}: {error}") from None
    return eval_results


def _run_stage(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from hf_common.default_model import default_model_path, load_model_and_tokenizer
    from hf_scylla.config import ScyllaDraftConfig
    from hf_scylla.hub import check_repo_id, stage_draft
    from hf_scylla.modeling import ScyllaDraftModel

    if not (args.checkpoint / "config.json").is_file():
        raise CommandError(f"{args.checkpoint} is not a saved Scylla draft (no config.json)")
    try:
        check_repo_id(args.repo_name)
        config = ScyllaDraftConfig.from_pretrained(args.checkpoint)
        if args.max_draft_tokens is not None:
            config.max_draft_tokens = args.max_draft_tokens
        if args.confidence_threshold is not None:
            config.confidence_threshold = args.confidence_threshold
        config._check_draft_fields()
    except (ValueError, TypeError, OSError) as error:
        raise CommandError(str(error)) from None
    eval_results = _read_eval_results(args.eval_results)
    target_name = args.target or config.target_name_or_path
    if not target_name:
        raise CommandError("the draft config names no target; pass --target")
    # The default model's tokenizer comes from the embedded copy, so staging works offline.
    embedded = target_name == DEFAULT_MODEL_ID and not Path(target_name).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path() if embedded else target_name)
    try:
        draft = ScyllaDraftModel.from_pretrained(args.checkpoint, config=config)
        if draft.config.save_embeddings and not draft.is_attached:
            draft.attach_target(load_model_and_tokenizer(target_name)[0], tokenizer)
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
        raise CommandError(str(error)) from None
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
    from hf_scylla.hub import PublishError, publish

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
    except (PublishError, ValueError) as error:  # StagedFolderError and a bad repo id or tag are ValueErrors
        raise CommandError(str(error)) from None
    for file in result.files:
        print(f"{file.sha256}  {file.size:>12}  {file.path}")
    if result.dry_run:
        print(f"Dry run: {len(result.files)} files would be uploaded to {args.repo_id}; nothing was sent.")
    else:
        tag = f", tagged {result.tag}" if result.tag else ""
        print(f"Uploaded {len(result.files)} files to {result.repo_url} in commit {result.commit_oid}{tag}")
    return 0


COMMANDS = (
    *COMMON_COMMANDS,
    demo_command("Scylla demo: a chat answer, greedy vs the staged draft, checked equal.", "hf_scylla.demo"),
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
    eval_command("hf-scylla"),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("hf-scylla", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
