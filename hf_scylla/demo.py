"""Scylla's demo part: the chat prompt answered greedily, then with the staged draft, checked equal.

Run by ``hf-scylla demo`` and by ``hf-demo`` (see `hf_common.demo` for the part protocol).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_common.cli import CommandError
from hf_common.demo import GenerationResult, chat_inputs, timed_chat_generation
from hf_scylla.generation import generate
from hf_scylla.modeling import ScyllaDraftModel

__all__ = [
    "DEFAULT_PROMPT",
    "STAGED_DRAFT_NAME",
    "add_demo_arguments",
    "check_demo_arguments",
    "find_staged_draft",
    "run_demo_part",
    "scylla_chat",
]

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."
STAGED_DRAFT_NAME = "SmolLM2-135M-Instruct-scylla-D1"
"""The Scylla draft for the default model, staged with ``hf-scylla stage`` under ``model_cards/``."""


def find_staged_draft(name: str = STAGED_DRAFT_NAME) -> Path | None:
    """The staged draft folder ``model_cards/<name>``: next to the packages (a source checkout or an
    editable install), else under the working directory; ``None`` when neither holds a ``config.json``."""
    candidates = (
        Path(__file__).resolve().parents[1] / "model_cards" / name,
        Path.cwd() / "model_cards" / name,
    )
    return next((folder for folder in candidates if (folder / "config.json").is_file()), None)


def scylla_chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    draft_dir: Path,
    greedy: GenerationResult,
) -> GenerationResult:
    """Answer ``prompt`` with Scylla speculative decoding using the draft in ``draft_dir``.

    The draft is loaded offline and attached to ``model`` (its embedding and LM head are shared);
    ``lossless`` says whether the answer equals ``greedy``'s token for token, ``tau`` is the mean
    number of tokens gained per draft-verify cycle.
    """
    draft = ScyllaDraftModel.from_pretrained(draft_dir, target=model, target_tokenizer=tokenizer)
    draft = draft.to(device=model.device, dtype=model.dtype).eval()
    inputs = {name: tensor.to(model.device) for name, tensor in chat_inputs(tokenizer, prompt).items()}
    with torch.inference_mode():
        result = generate(
            model,
            draft,
            inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    new_tokens = result.output[0, inputs["input_ids"].shape[1] :]
    return GenerationResult(
        label=f"chat answer, scylla D{draft.config.num_hidden_layers} draft"
        + (" + prompt lookup" if draft.config.lookup_tokens else ""),
        text=tokenizer.decode(new_tokens, skip_special_tokens=True),
        new_tokens=int(new_tokens.numel()),
        seconds=result.stats.seconds,
        token_ids=new_tokens.tolist(),
        tau=result.stats.tau,
        lossless=new_tokens.tolist() == greedy.token_ids,
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="The user turn to answer.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate.")
    parser.add_argument(
        "--draft",
        type=Path,
        default=None,
        help=f"Scylla draft folder for --model (default: model_cards/{STAGED_DRAFT_NAME} of this checkout).",
    )


def check_demo_arguments(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.draft is not None and not (args.draft / "config.json").is_file():
        raise CommandError(f"--draft {args.draft}: no such folder holding a saved Scylla draft (config.json)")


def run_demo_part(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace
) -> list[GenerationResult]:
    """The greedy answer, then the speculative one (skipped, with the reason, when no draft fits)."""
    print(f"Prompt: {args.prompt}\n", flush=True)
    greedy = timed_chat_generation(
        model, tokenizer, args.prompt, args.max_new_tokens, label="chat answer, sdpa"
    )
    draft_dir = args.draft or find_staged_draft()
    if draft_dir is None:
        print(f"Scylla step skipped: no staged draft model_cards/{STAGED_DRAFT_NAME} found (pass --draft).\n")
        return [greedy]
    try:
        return [greedy, scylla_chat(model, tokenizer, args.prompt, args.max_new_tokens, draft_dir, greedy)]
    except ValueError as error:  # e.g. --model is another target than the draft was trained for
        print(f"Scylla step skipped: the draft in {draft_dir} does not fit {args.model}: {error}\n")
        return [greedy]
