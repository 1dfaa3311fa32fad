"""Dataset builder and scorer of the passkey lm-eval tasks (referenced as ``!function passkey_tasks.*``)."""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset, DatasetDict

from hf_adamas.evaluation import passkey_prompt
from hf_common.tasks.local_tasks import resolve_tokenizer

__all__ = ["passkey_dataset", "passkey_process_results"]


def passkey_dataset(length: int, samples: int = 10, seed: int = 0, **metadata: Any) -> DatasetDict:
    """``samples`` passkey prompts of about ``length`` tokens, the key at evenly spaced depths.

    Built by `hf_adamas.evaluation.passkey_prompt` (the ``hf-adamas passkey`` protocol) in the
    tokenizer of the evaluated model (see `resolve_tokenizer`), and decoded back to text for lm-eval.
    """
    tokenizer = resolve_tokenizer(metadata)
    rng = random.Random(seed * 1_000_003 + length)
    docs = []
    for index in range(samples):
        depth = (index + 0.5) / samples
        passkey = f"{rng.randrange(10000, 100000)}"
        input_ids, _ = passkey_prompt(tokenizer, length, depth, passkey)
        docs.append(
            {
                "prompt": tokenizer.decode(input_ids[0]),
                "passkey": passkey,
                "depth": depth,
                "tokens": int(input_ids.shape[1]),
            }
        )
    return DatasetDict({"test": Dataset.from_list(docs)})


def passkey_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Accuracy 1 when the generated answer contains the pass key (as ``hf-adamas passkey`` scores it)."""
    (answer,) = results
    return {"acc": float(doc["passkey"] in answer)}
