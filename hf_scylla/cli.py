"""The ``hf-scylla`` command line: make-data, train, bench, sweep, stage, publish, eval (plus demo and env)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

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
        "--lookup-tokens",
        type=int,
        help="Override the draft config's prompt-lookup proposal length (0: the draft alone); with it on, the "
        "bench adds the draft without lookup as a row.",
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
    parser.add_argument(
        "--prompt-lookup-tokens",
        type=int,
        default=10,
        help="Candidates of transformers' own prompt lookup, the training-free baseline row.",
    )
    add_output_arguments(parser, RUNS_DIR / "scylla" / "bench")


def _add_speed_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """``--chain``, ``--tree``, ``--draft-vocab-size``, ``--few-rows-linear-rows``: the extra methods
    ``bench`` compares side by side in one run."""
    parser.add_argument(
        "--chain",
        type=int,
        nargs=2,
        action="append",
        default=[],
        metavar=("DRAFT_TOKENS", "LOOKUP_TOKENS"),
        help="Also decode with the draft's chains of this many tokens (no confidence threshold) and "
        "prompt-lookup proposals of this many (0: off); repeat for more shapes.",
    )
    parser.add_argument(
        "--tree",
        type=int,
        nargs=3,
        action="append",
        default=[],
        metavar=("DEPTH", "TOP_K", "TOTAL_TOKENS"),
        help="Also decode with EAGLE-2 dynamic draft trees of this shape (hf_scylla.TreeConfig); repeat "
        "for more shapes.",
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
    parser.add_argument(
        "--few-rows-linear-rows",
        action="store_true",
        help="Also decode greedily and with prompt lookup on hf_common.few_rows_linear (1-16 rows, one-row "
        "steps included), and with the draft on F.linear only: what the kernel alone gives each method.",
    )


def _check_speed_variant_arguments(args: argparse.Namespace) -> None:
    from hf_scylla.tree import TreeConfig

    for shape in args.tree:
        try:
            TreeConfig(*shape)
        except ValueError as error:
            raise CommandError(f"--tree: {error}") from error
    for draft_tokens, lookup_tokens in args.chain:
        if draft_tokens < 1 or lookup_tokens < 0:
            raise CommandError(
                f"--chain: need DRAFT_TOKENS >= 1 and LOOKUP_TOKENS >= 0, got {draft_tokens} {lookup_tokens}"
            )
    if args.draft_vocab_size is not None and args.draft_vocab_size < 1:
        raise CommandError(f"--draft-vocab-size must be >= 1, got {args.draft_vocab_size}")


def _run_bench(args: argparse.Namespace) -> int:
    from hf_scylla.bench.speed import bench_report

    _check_speed_variant_arguments(args)
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
    if args.lookup_tokens is not None and args.lookup_tokens < 0:
        raise CommandError(f"--lookup-tokens must be >= 0 (0: the draft alone), got {args.lookup_tokens}")
    claim_outputs([args.output_dir / f"bench.{suffix}" for suffix in ("json", "md", "png")], args.overwrite)
    rows, table = bench_report(
        args.model,
        args.prompts_dir,
        args.output_dir,
        command_line("hf-scylla", getattr(args, "argv", [])),
        draft=args.draft,
        untrained_depth=args.untrained_depth,
        max_draft_tokens=args.max_draft_tokens,
        confidence_threshold=args.confidence_threshold,
        lookup_tokens=args.lookup_tokens,
        assistant=args.assistant,
        limit=args.limit or None,
        max_new_tokens=args.max_new_tokens,
        prompt_lookup_tokens=args.prompt_lookup_tokens,
        chains=[tuple(shape) for shape in args.chain],
        trees=[tuple(shape) for shape in args.tree],
        draft_vocab_size=args.draft_vocab_size,
        few_rows_linear_rows=args.few_rows_linear_rows,
    )
    print(table)
    print(f"Saved {args.output_dir}/bench.json, .md and .png")
    return 0 if all(row["lossless"] for row in rows) else 1


def _add_verify_cost_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_common.outputs import add_output_arguments
    from hf_scylla.bench.speed import PROMPTS_DIR

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
    parser.add_argument(
        "--vocab-corpus",
        type=Path,
        action="append",
        help="The draft's training data, whose most frequent tokens the reduced heads keep: text files, "
        "conversation JSONL or a make-data dataset folder (repeatable; default: the staged D1 draft's "
        "tinyshakespeare + GSM8K train).",
    )
    parser.add_argument(
        "--acceptance-prompts",
        type=Path,
        help="A question.jsonl the draft was not tuned on (its first --limit prompts): decode it with fixed "
        "chains of --max-chain tokens and predict the speed-up of every chain length from the curve.",
    )
    parser.add_argument("--max-chain", type=int, default=6, help="Longest chain for --acceptance-prompts.")
    add_output_arguments(parser, Path("runs/scylla/verify-cost"))


def _run_verify_cost(args: argparse.Namespace) -> int:
    from hf_scylla.bench.verify_cost import verify_cost_report

    if min(args.new_tokens) < 1 or 1 not in args.new_tokens:
        raise CommandError("--new-tokens must be positive and include 1 (the plain-decoding step)")
    if min(args.vocab_sizes) < 1 or args.context_tokens < 2 or args.repeats < 1 or args.max_chain < 1:
        raise CommandError(
            "--vocab-sizes, --context-tokens (>= 2), --repeats and --max-chain must be positive"
        )
    if args.acceptance_prompts is not None and not args.acceptance_prompts.is_file():
        raise CommandError(f"--acceptance-prompts {args.acceptance_prompts} is not a file")
    stem = args.output_dir / "verify_cost"
    claim_outputs([stem.with_suffix(suffix) for suffix in (".json", ".md", ".png")], args.overwrite)
    print(
        verify_cost_report(
            args.model,
            args.draft,
            args.prompts_dir,
            stem,
            command_line("hf-scylla", getattr(args, "argv", [])),
            new_tokens=sorted(args.new_tokens),
            vocab_sizes=args.vocab_sizes,
            context_tokens=args.context_tokens,
            repeats=args.repeats,
            limit=args.limit or None,
            acceptance_prompts=args.acceptance_prompts,
            max_chain=args.max_chain,
            **({"vocab_corpus": args.vocab_corpus} if args.vocab_corpus else {}),
        )
    )
    return 0


def _read_conversations(path: Path, limit: int, flag: str = "--data") -> list[tuple[str, str]]:
    from hf_scylla.data import read_conversations

    try:
        return read_conversations(path, limit)
    except FileNotFoundError as error:
        raise CommandError(f"{error} (pass another with {flag})") from None
    except (ValueError, KeyError) as error:
        raise CommandError(f"{flag} {path} is not readable prompt/response data: {error}") from None


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
        "--draft-vocab-size",
        type=int,
        help="Give the draft its own LM head over this many most frequent tokens of the training data "
        "(FR-Spec; e.g. 8192) before training, so the token loss runs on that subset; saved with the draft.",
    )
    parser.add_argument(
        "--fuse-layers",
        type=int,
        nargs="*",
        metavar="INDEX",
        help="EAGLE-3 layer fusion: the draft reads a learned mix of these target hidden_states (alone: a low, "
        "a middle and the final one); added to --init-draft so that training starts from it exactly.",
    )
    add_output_arguments(parser, RUNS_DIR / "scylla" / "draft", "draft, checkpoints and cached features")
    parser.add_argument(
        "--resume", action="store_true", help="Continue from the last checkpoint in --output-dir."
    )


def _features(
    args: argparse.Namespace,
    folder: Path,
    target,
    tokenizer,
    samples: int,
    tokens: int,
    regenerate: bool,
    fused_layers: list[int] | None = None,
):
    """The run's target features, cached in ``folder`` under a name keyed by everything they depend on."""
    from hf_scylla.training import FeatureSource, build_features, feature_cache_for

    source = FeatureSource(
        stage=args.stage,
        max_length=args.max_length,
        data=args.data,
        samples=samples,
        text=args.text,
        tokens=tokens,
        regenerate_tokens=args.regenerate_tokens if regenerate else None,
        fused_layers=tuple(fused_layers) if fused_layers is not None else None,
    )
    try:
        path, description = feature_cache_for(folder, target, tokenizer, args.model, source)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None

    def build():
        try:
            return build_features(target, tokenizer, source, regenerate_dir=args.output_dir)
        except (FileNotFoundError, ValueError, KeyError) as error:
            raise CommandError(str(error)) from None

    return _cached_features(getattr(args, "features", None) or path, build, description)


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
    if args.draft_vocab_size is not None and (args.draft_vocab_size < 1 or args.standalone):
        raise CommandError("--draft-vocab-size must be >= 1 and applies to Scylla drafts, not --standalone")
    if args.fuse_layers is not None and args.standalone:
        raise CommandError("--fuse-layers applies to Scylla drafts, not --standalone")
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


def _reduce_draft_head(draft, features, tokenizer, size: int) -> None:
    """Give the draft its own LM head over the ``size`` tokens it will learn most often, before training
    (the token loss is then computed on that subset)."""
    from hf_scylla.training import trained_token_counts
    from hf_scylla.vocab import frequent_draft_vocabulary, reduce_draft_vocabulary

    if draft.config.draft_vocab_size is not None:
        raise CommandError(
            f"--init-draft already has a reduced head of {draft.config.draft_vocab_size} tokens"
        )
    try:
        subset = frequent_draft_vocabulary(
            trained_token_counts(features, draft.config.target_vocab_size), size, tokenizer
        )
        reduce_draft_vocabulary(draft, subset, tokenizer)
    except ValueError as error:
        raise CommandError(f"--draft-vocab-size {size}: {error}") from None
    print(f"draft LM head: the {size} most frequent trained tokens")


def _draft_to_train(args: argparse.Namespace, target, tokenizer):
    """A new draft or ``--init-draft`` (e.g. to fine-tune with the distillation term), given layer fusion
    by ``--fuse-layers`` (starting exactly from the draft it is added to)."""
    from hf_scylla.config import layer_fusion_indices
    from hf_scylla.modeling import add_layer_fusion, check_draft_matches_target
    from hf_scylla.training import make_draft

    draft = make_draft(target, tokenizer, args.depth, args.init_draft)
    if args.fuse_layers is None:
        return draft
    try:
        layers = args.fuse_layers or layer_fusion_indices(target.config.get_text_config().num_hidden_layers)
        if draft.config.target_hidden_layers is not None:
            if draft.config.target_hidden_layers != layers:
                raise ValueError(
                    f"--init-draft already fuses layers {draft.config.target_hidden_layers}, not {layers}"
                )
            return draft
        fused = add_layer_fusion(draft, layers)
        check_draft_matches_target(fused.config, target.config, tokenizer)
    except ValueError as error:
        raise CommandError(f"--fuse-layers: {error}") from None
    print(f"draft input: fused target states {layers}")
    return fused


def _run_train(args: argparse.Namespace) -> int:
    from hf_common.default_model import load_model_and_tokenizer
    from hf_scylla.standalone import load_standalone_draft, train_standalone_draft
    from hf_scylla.training import train_draft

    _check_train_arguments(args)
    claim_outputs(
        [args.output_dir / "config.json", args.output_dir / "model.safetensors"],
        args.overwrite or args.resume,
    )
    target, tokenizer = load_model_and_tokenizer(args.model)
    draft = None if args.standalone else _draft_to_train(args, target, tokenizer)
    fused_layers = draft.config.target_hidden_layers if draft is not None else None
    features = _features(
        args, args.output_dir, target, tokenizer, args.samples, args.tokens, args.regenerate, fused_layers
    )
    settings = {
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "resume": args.resume,
    }
    if args.standalone:
        try:
            model = load_standalone_draft(target, args.init_draft, args.depth)
        except ValueError as error:
            raise CommandError(str(error)) from None
        result = train_standalone_draft(model, features, args.output_dir, tokenizer=tokenizer, **settings)
    else:
        if args.draft_vocab_size is not None:
            _reduce_draft_head(draft, features, tokenizer, args.draft_vocab_size)
        train_settings = {"unroll_steps": args.unroll_steps, "token_weight": args.token_weight}
        result = train_draft(draft, features, args.output_dir, **train_settings, **settings)
    kind = "standalone draft LM" if args.standalone else "draft"
    print(
        f"trained {result.global_step} steps, mean loss {result.training_loss:.4f}; {kind} saved to {args.output_dir}"
    )
    return 0


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
    from hf_scylla.bench.sweep import SweepSettings, encode_eval_prompts, plan_points, run_sweep

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
    features = _features(args, args.work_dir, target, tokenizer, needed, tokens, regenerate=False)
    prompts = encode_eval_prompts(tokenizer, args.eval_prompts_file, args.eval_prompts, target.device)
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
    from hf_scylla.bench.batch_sweep import interleaved_prompts, run_batch_sweep
    from hf_scylla.demo import find_staged_draft
    from hf_scylla.training import make_draft

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
    draft = make_draft(target, tokenizer, checkpoint=draft_dir).eval()
    questions = interleaved_prompts(args.prompts_dir, args.limit or None)
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
        "setting), or a list of such objects, one per prompt set; without it the card says 'not evaluated yet'.",
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
        "--lookup-tokens",
        type=int,
        help="Store this prompt-lookup proposal length in the staged config (0: the draft alone).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the files an earlier `hf-scylla stage` wrote into --output-dir (only those; a folder "
        "it did not write is never touched).",
    )


def _run_stage(args: argparse.Namespace) -> int:
    from hf_scylla.hub import read_eval_results, stage_checkpoint

    if not (args.checkpoint / "config.json").is_file():
        raise CommandError(f"{args.checkpoint} is not a saved Scylla draft (no config.json)")
    try:
        eval_results = read_eval_results(args.eval_results) if args.eval_results is not None else None
    except (OSError, ValueError) as error:
        raise CommandError(f"--eval-results {error}") from None
    try:
        folder = stage_checkpoint(
            args.checkpoint,
            args.output_dir,
            repo_name=args.repo_name,
            target=args.target,
            base_model=args.base_model,
            eval_results=eval_results,
            datasets=args.dataset,
            training_notes=args.training_notes,
            max_draft_tokens=args.max_draft_tokens,
            confidence_threshold=args.confidence_threshold,
            lookup_tokens=args.lookup_tokens,
            overwrite=args.overwrite,
        )
    except (ValueError, TypeError, OSError) as error:  # FileExistsError: a folder stage did not write
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


def _add_make_data_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_scylla.self_distill import SelfDistillSettings

    defaults = SelfDistillSettings()
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of the target.")
    parser.add_argument(
        "--user-turns", type=int, default=defaults.user_turns, help="User turns the target samples (Magpie)."
    )
    parser.add_argument(
        "--seed-prompts",
        type=Path,
        action="append",
        default=[],
        help="JSONL of prompts (question/answer or turns records) the target also answers (repeatable); "
        "never pass a prompt set you will benchmark on.",
    )
    parser.add_argument(
        "--seed-samples", type=int, default=256, help="Prompts read from each --seed-prompts."
    )
    parser.add_argument(
        "--user-turn-tokens",
        type=int,
        default=defaults.user_turn_tokens,
        help="Most tokens of a sampled turn.",
    )
    parser.add_argument(
        "--response-tokens", type=int, default=defaults.response_tokens, help="Most tokens of an answer."
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="Sequences per generate()."
    )
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="User-turn sampling.")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="User-turn nucleus sampling.")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Seed of the first user-turn batch.")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=RUNS_DIR / "scylla" / "self-distill",
        help="Run folder: journals, settings.json and the final dataset/ (rerun the same command to resume).",
    )


def _run_make_data(args: argparse.Namespace) -> int:
    from hf_common.default_model import load_model_and_tokenizer
    from hf_scylla.self_distill import SelfDistillSettings, self_distilled_conversations

    try:
        settings = SelfDistillSettings(
            user_turns=args.user_turns,
            user_turn_tokens=args.user_turn_tokens,
            response_tokens=args.response_tokens,
            batch_size=args.batch_size,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    if args.seed_samples < 1:
        raise CommandError(f"--seed-samples must be >= 1, got {args.seed_samples}")
    seeds = [
        prompt
        for path in args.seed_prompts
        for prompt, _ in _read_conversations(path, args.seed_samples, "--seed-prompts")
    ]
    target, tokenizer = load_model_and_tokenizer(args.model)
    try:
        dataset = self_distilled_conversations(
            target, tokenizer, args.output_dir, settings, seed_prompts=seeds, target_name=args.model
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"{len(dataset)} conversations saved to {args.output_dir / 'dataset'} (train with --data on it)")
    return 0


def _add_agreement_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_scylla.bench.speed import PROMPTS_DIR

    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of the target.")
    parser.add_argument(
        "--draft", type=Path, action="append", required=True, help="A saved Scylla draft (repeatable)."
    )
    parser.add_argument(
        "--prompts-dir",
        type=Path,
        action="append",
        help=f"Folder of *.jsonl prompt sets (repeatable; default {PROMPTS_DIR}).",
    )
    parser.add_argument("--limit", type=int, default=8, help="Prompts per set (0: all).")
    add_output_arguments(parser, RUNS_DIR / "scylla" / "agreement")


def _run_agreement(args: argparse.Namespace) -> int:
    from hf_scylla.bench.agreement import agreement_report
    from hf_scylla.bench.speed import PROMPTS_DIR

    prompts_dirs = args.prompts_dir or [PROMPTS_DIR]
    for folder in [*args.draft, *prompts_dirs]:
        if not folder.is_dir():
            raise CommandError(f"{folder} is not a folder")
    if args.limit < 0:
        raise CommandError(f"--limit must be >= 0 (0: all prompts), got {args.limit}")
    claim_outputs([args.output_dir / f"agreement.{suffix}" for suffix in ("json", "md")], args.overwrite)
    try:
        rows = agreement_report(
            args.model,
            args.draft,
            prompts_dirs,
            args.output_dir,
            command_line("hf-scylla", getattr(args, "argv", [])),
            limit=args.limit or None,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    for row in rows:
        print(f"{row['set']:>12} {row['draft']:>40} {row['agreement']:.4f} ({row['positions']} positions)")
    return 0


COMMANDS = (
    *COMMON_COMMANDS,
    demo_command("Scylla demo: a chat answer, greedy vs the staged draft, checked equal.", "hf_scylla.demo"),
    Command(
        "make-data",
        "Training conversations the target writes itself: sampled user turns (Magpie) and its greedy "
        "answers, batched, resumable, saved as a datasets folder.",
        _add_make_data_arguments,
        _run_make_data,
    ),
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
        "agreement",
        "Teacher-forced top-1 agreement of drafts with the target on prompt sets, side by side (JSON, Markdown).",
        _add_agreement_arguments,
        _run_agreement,
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
