"""The demo: the main job of this package, run on the embedded default model.

``python -m hf_common.demo`` (or ``hf-adamas demo`` / ``hf-vrgd demo`` / ``hf-scylla demo``) loads
SmolLM2-135M-Instruct, answers a chat prompt greedily, answers it again with Scylla speculative
decoding (the staged draft in ``model_cards/``, checked equal to greedy), retrieves a pass key with
dense and Adamas attention, and reports decoding speed. It is meant to finish in well under five
minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_common.default_model import DEFAULT_MODEL_ID, load_model_and_tokenizer

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."
STAGED_DRAFT_NAME = "SmolLM2-135M-Instruct-scylla-D1"
"""The Scylla draft for the default model, staged with ``hf-scylla stage`` under ``model_cards/``."""


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
    from hf_scylla import ScyllaDraftModel
    from hf_scylla import generate as scylla_generate

    draft = ScyllaDraftModel.from_pretrained(draft_dir, target=model, target_tokenizer=tokenizer)
    draft = draft.to(device=model.device, dtype=model.dtype).eval()
    inputs = {name: tensor.to(model.device) for name, tensor in chat_inputs(tokenizer, prompt).items()}
    with torch.inference_mode():
        result = scylla_generate(
            model,
            draft,
            inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    new_tokens = result.output[0, inputs["input_ids"].shape[1] :]
    return GenerationResult(
        label=f"chat answer, scylla D{draft.config.num_hidden_layers} draft",
        text=tokenizer.decode(new_tokens, skip_special_tokens=True),
        new_tokens=int(new_tokens.numel()),
        seconds=result.stats.seconds,
        token_ids=new_tokens.tolist(),
        tau=result.stats.tau,
        lossless=new_tokens.tolist() == greedy.token_ids,
    )


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
    parser.add_argument(
        "--draft",
        type=Path,
        default=None,
        help=f"Scylla draft folder for --model (default: model_cards/{STAGED_DRAFT_NAME} of this checkout).",
    )


def run_demo(args: argparse.Namespace) -> list[GenerationResult]:
    """Load the model once, run each demo step, print a summary table, return the results."""
    print(f"Loading {args.model} ...", flush=True)
    model, tokenizer = load_model_and_tokenizer(args.model)
    print(f"Prompt: {args.prompt}\n", flush=True)

    greedy = timed_chat_generation(
        model, tokenizer, args.prompt, args.max_new_tokens, label="chat answer, sdpa"
    )
    results = [greedy]
    draft_dir = getattr(args, "draft", None) or find_staged_draft()
    if draft_dir is None:
        print(f"Scylla step skipped: no staged draft model_cards/{STAGED_DRAFT_NAME} found (pass --draft).\n")
    else:
        try:
            results.append(scylla_chat(model, tokenizer, args.prompt, args.max_new_tokens, draft_dir, greedy))
        except ValueError as error:  # e.g. --model is another target than the draft was trained for
            print(f"Scylla step skipped: the draft in {draft_dir} does not fit {args.model}: {error}\n")
    results += adamas_long_context(model, tokenizer, args.context, args.budget)

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
    print(f"(device: {model.device}, {torch.get_num_threads()} CPU threads)")
    if any(result.lossless is False for result in results):
        print("ERROR: speculative decoding changed the greedy output; please report this as a bug.")

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
    results = run_demo(parser.parse_args(argv))
    return 1 if any(result.lossless is False for result in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
