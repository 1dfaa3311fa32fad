"""Dataset builders and scorers of the local lm-eval tasks (referenced as ``!function local_tasks.*``).

lm-eval calls a task's ``custom_dataset`` with the run's metadata (``--metadata`` merged with
``--model_args``) plus the YAML's ``dataset_kwargs``, so every builder takes ``**metadata``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from hf_common.data import shared_data_file

__all__ = [
    "gsm8k_dataset",
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
    """The tokenizer a task measures its prompts in: ``tokenizer``, else ``pretrained``, else the default model.

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
