"""Adamas's demo part: a pass key hidden in a long context, retrieved with dense and Adamas attention.

Run by ``hf-adamas demo`` and by ``hf-demo`` (see `hf_common.demo` for the part protocol).
"""

from __future__ import annotations

import argparse

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_adamas.bench.evaluation import Method, attention_method, passkey_prompt, run_decode_speed
from hf_adamas.config import AdamasConfig
from hf_common.cli import CommandError
from hf_common.demo import GenerationResult, timed_generation

__all__ = ["adamas_long_context", "add_demo_arguments", "check_demo_arguments", "run_demo_part"]


def adamas_long_context(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, length: int, budget: int
) -> list[GenerationResult]:
    """A pass key hidden in ``length`` tokens of filler, retrieved with dense and with Adamas attention.

    Answers come from plain ``generate()``; the decode speed from `run_decode_speed` (dense prefill
    once per method, then timed decode steps, the methods taking turns over 3 rounds), since
    ``generate``'s time is mostly prefill here.
    """
    input_ids, _ = passkey_prompt(tokenizer, length, depth=0.4, passkey="68217")
    print(f"Long context: pass key 68217 hidden in {input_ids.shape[1]} tokens of filler.", flush=True)
    methods = (Method("sdpa"), Method(f"adamas budget {budget}", AdamasConfig(token_budget=budget)))
    answers = []
    for method in methods:
        with attention_method(model, method):
            answers.append(timed_generation(model, tokenizer, {"input_ids": input_ids}, 8, method.name).text)
    speeds = run_decode_speed(model, input_ids, methods, steps=8, rounds=3)
    return [
        GenerationResult(
            label=f"{input_ids.shape[1]}-token context, {method.name}",
            text=answer,
            new_tokens=speed["steps"],
            seconds=speed["seconds"],
        )
        for method, answer, speed in zip(methods, answers, speeds, strict=True)
    ]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", type=int, default=2048, help="Context length of the long-context step.")
    parser.add_argument(
        "--budget", type=int, default=64, help="Adamas token budget of the long-context step."
    )


def check_demo_arguments(args: argparse.Namespace) -> None:
    if args.context < 16 or args.budget < 1:
        raise CommandError(
            f"--context must be at least 16 and --budget at least 1, got {args.context}, {args.budget}"
        )


def run_demo_part(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace
) -> list[GenerationResult]:
    return adamas_long_context(model, tokenizer, args.context, args.budget)
