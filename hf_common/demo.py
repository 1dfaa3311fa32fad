"""The demo: the main job of this package, run on the embedded default model.

``python -m hf_common.demo`` (or ``hf-adamas demo`` / ``hf-vrgd demo`` / ``hf-scylla demo``) loads
SmolLM2-135M-Instruct, answers a chat prompt greedily and reports decoding speed. It is meant to
finish in well under five minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_common.default_model import DEFAULT_MODEL_ID, load_model_and_tokenizer

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


@dataclass
class GenerationResult:
    """What one timed generation produced."""

    label: str
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def timed_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    label: str,
    **generate_kwargs,
) -> GenerationResult:
    """Greedy ``generate`` on tokenized ``inputs``, timing ``generate`` alone."""
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    prompt_length = inputs["input_ids"].shape[1]
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new_tokens = output[0, prompt_length:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    return GenerationResult(label=label, text=text, new_tokens=int(new_tokens.numel()), seconds=seconds)


def timed_chat_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    label: str,
    **generate_kwargs,
) -> GenerationResult:
    """Greedy-decode an answer to one user turn (chat template applied), timing ``generate`` alone."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    return timed_generation(model, tokenizer, dict(inputs), max_new_tokens, label, **generate_kwargs)


def adamas_long_context(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, length: int, budget: int
) -> list[GenerationResult]:
    """A pass key hidden in ``length`` tokens of filler, retrieved with dense and with Adamas attention.

    Answers come from plain ``generate()``; the decode speed from `run_decode_speed` (dense prefill
    once per method, then timed decode steps), since ``generate``'s time is mostly prefill here.
    """
    from hf_adamas import AdamasConfig
    from hf_adamas.evaluation import Method, attention_method, passkey_prompt, run_decode_speed

    input_ids, _ = passkey_prompt(tokenizer, length, depth=0.4, passkey="68217")
    print(f"Long context: pass key 68217 hidden in {input_ids.shape[1]} tokens of filler.", flush=True)
    methods = (Method("sdpa"), Method(f"adamas budget {budget}", AdamasConfig(token_budget=budget)))
    answers = []
    for method in methods:
        with attention_method(model, method):
            answers.append(timed_generation(model, tokenizer, {"input_ids": input_ids}, 8, method.name).text)
    speeds = run_decode_speed(model, input_ids, methods, steps=16)
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
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of a causal LM.")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="The user turn to answer.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--context", type=int, default=2048, help="Context length of the long-context step.")
    parser.add_argument(
        "--budget", type=int, default=64, help="Adamas token budget of the long-context step."
    )


def run_demo(args: argparse.Namespace) -> list[GenerationResult]:
    """Load the model once, run each demo step, print a summary table, return the results."""
    print(f"Loading {args.model} ...", flush=True)
    model, tokenizer = load_model_and_tokenizer(args.model)
    print(f"Prompt: {args.prompt}\n", flush=True)

    results = [
        timed_chat_generation(model, tokenizer, args.prompt, args.max_new_tokens, label="chat answer, sdpa"),
        *adamas_long_context(model, tokenizer, args.context, args.budget),
    ]

    for result in results:
        print(f"[{result.label}] {result.text}\n")
    print(f"{'step':<40}{'new tokens':>12}{'seconds':>10}{'tokens/s':>10}")
    for result in results:
        print(
            f"{result.label:<40}{result.new_tokens:>12}{result.seconds:>10.2f}{result.tokens_per_second:>10.1f}"
        )
    print(f"(device: {model.device}, {torch.get_num_threads()} CPU threads)")

    if args.json is not None:
        payload = [{**asdict(r), "tokens_per_second": r.tokens_per_second} for r in results]
        args.json.write_text(json.dumps(payload, indent=2))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_common.demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_demo_arguments(parser)
    run_demo(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
