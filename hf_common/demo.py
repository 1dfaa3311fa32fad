"""Demo plumbing shared by each CLI's ``demo`` and by `hf_demo`: timed generation, the summary, ``--json``.

A method package's demo part is a module with three functions:

- ``add_demo_arguments(parser)``: the part's own options;
- ``check_demo_arguments(args)``: raises `CommandError` on bad options, before the model loads;
- ``run_demo_part(model, tokenizer, args) -> list``: its steps on the loaded model, one dataclass per step
  (`GenerationResult` for a timed generation).

`run_demo_parts` claims the ``--json`` file, loads the model once, runs the parts in order, prints one
table of the generations and writes every step to the JSON file. `demo_command` makes a CLI's ``demo``
from the parts' module names; `hf_demo` (``hf-demo``) runs the three methods' parts together.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_common.cli import Command
from hf_common.default_model import DEFAULT_MODEL_ID, load_model_and_tokenizer
from hf_common.outputs import claim_outputs

__all__ = [
    "GenerationResult",
    "add_common_demo_arguments",
    "add_demo_arguments",
    "chat_inputs",
    "demo_command",
    "demo_exit_code",
    "print_generation_table",
    "run_demo",
    "run_demo_parts",
    "timed_chat_generation",
    "timed_generation",
]


@dataclass
class GenerationResult:
    """What one timed generation produced."""

    label: str
    text: str
    new_tokens: int
    seconds: float
    token_ids: list[int] = field(default_factory=list)
    tau: float | None = None
    lossless: bool | None = None

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
    return GenerationResult(
        label=label,
        text=text,
        new_tokens=int(new_tokens.numel()),
        seconds=seconds,
        token_ids=new_tokens.tolist(),
    )


def chat_inputs(tokenizer: PreTrainedTokenizerBase, prompt: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of one user turn with the generation prompt appended."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    return dict(inputs)


def timed_chat_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    label: str,
    **generate_kwargs,
) -> GenerationResult:
    """Greedy-decode an answer to one user turn (chat template applied), timing ``generate`` alone."""
    return timed_generation(
        model, tokenizer, chat_inputs(tokenizer, prompt), max_new_tokens, label, **generate_kwargs
    )


def add_common_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--json`` and ``--overwrite``: the options of every demo."""
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="Hub ID or local folder of a causal LM.")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="Also write the results to this JSON file (folders are created).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace the --json file if it exists.")


def print_generation_table(results: Sequence[GenerationResult], device: torch.device) -> None:
    """Every answer, then one row per generation: new tokens, seconds, tokens/s, tau, equal to greedy."""
    for result in results:
        print(f"[{result.label}] {result.text}\n")
    print(f"{'step':<40}{'new tokens':>12}{'seconds':>10}{'tokens/s':>10}{'tau':>7}  equals greedy")
    for result in results:
        tau = f"{result.tau:>7.2f}" if result.tau is not None else f"{'-':>7}"
        same = {None: "-", True: "yes", False: "NO"}[result.lossless]
        print(
            f"{result.label:<40}{result.new_tokens:>12}{result.seconds:>10.2f}{result.tokens_per_second:>10.1f}"
            f"{tau}  {same}"
        )
    print(f"(device: {device}, {torch.get_num_threads()} CPU threads)")


def _record(result: object) -> dict:
    record = {"step": type(result).__name__, **dataclasses.asdict(result)}
    if isinstance(result, GenerationResult):
        record["tokens_per_second"] = result.tokens_per_second
    return record


def run_demo_parts(args: argparse.Namespace, parts: Sequence[ModuleType]) -> list:
    """Check the options, claim ``--json``, load ``--model`` once, run each part, print, write the JSON."""
    for part in parts:
        part.check_demo_arguments(args)
    if args.json is not None:  # created or refused now, not after minutes of work
        claim_outputs([args.json], args.overwrite)
    print(f"Loading {args.model} ...", flush=True)
    model, tokenizer = load_model_and_tokenizer(args.model)
    results = []
    for part in parts:
        results += part.run_demo_part(model, tokenizer, args)
    generations = [result for result in results if isinstance(result, GenerationResult)]
    if generations:
        print_generation_table(generations, model.device)
    if any(result.lossless is False for result in generations):
        print("ERROR: speculative decoding changed the greedy output; please report this as a bug.")
    if args.json is not None:
        args.json.write_text(json.dumps([_record(result) for result in results], indent=2))
        print(f"Wrote {args.json}")
    return results


def demo_exit_code(results: Sequence[object]) -> int:
    """1 when a speculative answer differs from greedy (a bug), else 0."""
    return int(any(getattr(result, "lossless", None) is False for result in results))


def _import_parts(names: Sequence[str]) -> list[ModuleType]:
    return [importlib.import_module(name) for name in names]


def add_demo_arguments(parser: argparse.ArgumentParser, part_names: Sequence[str]) -> None:
    """The common demo options plus each part's own."""
    add_common_demo_arguments(parser)
    for part in _import_parts(part_names):
        part.add_demo_arguments(parser)


def run_demo(args: argparse.Namespace, part_names: Sequence[str]) -> int:
    """`run_demo_parts` over the parts named ``part_names``; returns the exit code."""
    return demo_exit_code(run_demo_parts(args, _import_parts(part_names)))


def demo_command(description: str, *part_names: str) -> Command:
    """A CLI's ``demo`` subcommand running the demo parts in the modules ``part_names`` (imported lazily)."""
    return Command(
        "demo",
        description,
        partial(add_demo_arguments, part_names=part_names),
        partial(run_demo, part_names=part_names),
    )
