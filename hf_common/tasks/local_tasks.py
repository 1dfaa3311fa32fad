"""Dataset builders and scorers of the local lm-eval tasks (referenced as ``!function local_tasks.*``).

lm-eval calls a task's ``custom_dataset`` with the run's metadata (``--metadata`` merged with
``--model_args``) plus the YAML's ``dataset_kwargs``, so every builder takes ``**metadata``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from hf_common.data import shared_data_file

__all__ = [
    "gsm8k_dataset",
    "passkey_dataset",
    "passkey_process_results",
    "resolve_tokenizer",
    "tinyshakespeare_dataset",
]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def gsm8k_dataset(data_dir: str | os.PathLike | None = None, **metadata: Any) -> DatasetDict:
    """GSM8K ``train`` (few-shot pool) and ``test`` splits from ``<shared data>/gsm8k/*.jsonl``."""
    del metadata
    return DatasetDict(
        {
            split: Dataset.from_list(
                _read_jsonl(shared_data_file("gsm8k", f"{split}.jsonl", data_dir=data_dir))
            )
            for split in ("train", "test")
        }
    )


def tinyshakespeare_dataset(
    chunk_chars: int = 8000, chunks: int = 4, data_dir: str | os.PathLike | None = None, **metadata: Any
) -> DatasetDict:
    """The first ``chunks * chunk_chars`` characters of tinyshakespeare.txt as ``chunks`` documents.

    A fixed slice keeps rolling-loglikelihood perplexity affordable; each document is scored on its own
    (``--limit`` takes the first ones), so its length is the longest context the model sees.
    """
    del metadata
    text = shared_data_file("text", "tinyshakespeare.txt", data_dir=data_dir).read_text(encoding="utf-8")
    docs = [{"text": text[i * chunk_chars : (i + 1) * chunk_chars]} for i in range(chunks)]
    if any(len(doc["text"]) < chunk_chars for doc in docs):
        raise ValueError(f"tinyshakespeare.txt has fewer than {chunks} x {chunk_chars} characters")
    return DatasetDict({"test": Dataset.from_list(docs)})


def resolve_tokenizer(metadata: dict[str, Any]):
    """The tokenizer a passkey prompt is measured in: ``tokenizer``, else ``pretrained``, else the default model.

    Names are resolved like `hf_common.load_model_and_tokenizer` does, so the default model's ID
    loads its embedded tokenizer offline.
    """
    from transformers import AutoTokenizer

    from hf_common.default_model import DEFAULT_MODEL_ID, default_model_path

    name = metadata.get("tokenizer") or metadata.get("pretrained") or DEFAULT_MODEL_ID
    if not isinstance(name, str | os.PathLike):
        name = getattr(name, "name_or_path", DEFAULT_MODEL_ID)
    if str(name) == DEFAULT_MODEL_ID and not Path(name).is_dir():
        name = default_model_path()
    return AutoTokenizer.from_pretrained(str(name))


def passkey_dataset(
    length: int,
    samples: int = 10,
    seed: int = 0,
    haystack: str = "repeated",
    split: str = "heldout",
    **metadata: Any,
) -> DatasetDict:
    """``samples`` passkey prompts of about ``length`` tokens, the key at evenly spaced depths.

    ``haystack="repeated"``: `hf_adamas.evaluation.passkey_prompt` (one filler sentence repeated);
    ``"varied"``: `hf_adamas.bench.needle.needle_prompt` (sentences of Shakespeare, stdlib docstrings
    and GSM8K from ``split``, the needle formats cycled). Built in the tokenizer of the evaluated
    model (see `resolve_tokenizer`), and decoded back to text for lm-eval.
    """
    from hf_adamas.bench.needle import NEEDLE_FORMATS, needle_prompt
    from hf_adamas.evaluation import repeated_filler_trial

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
