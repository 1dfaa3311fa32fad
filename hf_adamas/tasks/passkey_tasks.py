"""Dataset builder and scorer of the passkey lm-eval tasks (referenced as ``!function passkey_tasks.*``)."""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset, DatasetDict

from hf_adamas.bench.evaluation import repeated_filler_trial
from hf_adamas.bench.needle import NEEDLE_FORMATS, needle_prompt
from hf_common.tasks.local_tasks import resolve_tokenizer

__all__ = ["passkey_dataset", "passkey_process_results"]


def passkey_dataset(
    length: int,
    samples: int = 10,
    seed: int = 0,
    haystack: str = "repeated",
    split: str = "heldout",
    **metadata: Any,
) -> DatasetDict:
    """``samples`` passkey prompts of about ``length`` tokens, the key at evenly spaced depths.

    ``haystack="repeated"``: `hf_adamas.bench.evaluation.repeated_filler_trial` (one filler sentence repeated);
    ``"varied"``: `hf_adamas.bench.needle.needle_prompt` (sentences of Shakespeare, stdlib docstrings
    and GSM8K from ``split``, the needle formats cycled). Built in the tokenizer of the evaluated
    model (see `resolve_tokenizer`), and decoded back to text for lm-eval.
    """
    tokenizer = resolve_tokenizer(metadata)
    rng = random.Random(seed * 1_000_003 + length)
    formats = list(NEEDLE_FORMATS)
    docs = []
    for index in range(samples):
        depth = (index + 0.5) / samples
        if haystack == "varied":
            trial = needle_prompt(tokenizer, length, depth, formats[index % len(formats)], rng, split)
        else:
            trial = repeated_filler_trial(tokenizer, length, depth, f"{rng.randrange(10000, 100000)}")
        docs.append(
            {
                "prompt": tokenizer.decode(trial.input_ids[0]),
                "passkey": trial.answer.strip(),
                "depth": depth,
                "tokens": int(trial.input_ids.shape[1]),
            }
        )
    return DatasetDict({"test": Dataset.from_list(docs)})


def passkey_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Accuracy 1 when the generated answer contains the pass key (as ``hf-adamas passkey`` scores it)."""
    (answer,) = results
    return {"acc": float(doc["passkey"] in answer)}
