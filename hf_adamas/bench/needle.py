"""The harder passkey test: a needle hidden in varied natural text, in several formats.

The original passkey test (`hf_adamas.bench.evaluation.passkey_prompt`) repeats one filler sentence, so
the needle is the only novel text in the haystack and any selector that notices novelty finds it.
Here the haystack is a random sequence of sentences from three sources, so every sentence is novel:

- Shakespeare (``text/tinyshakespeare.txt`` of the shared data), split into sentences;
- docstrings of the Python standard library (module, class and function docstrings of the
  top-level ``.py`` files of the running interpreter's stdlib), split into sentences;
- GSM8K questions (``gsm8k/train.jsonl`` / ``gsm8k/test.jsonl``).

Two disjoint splits: ``"tuning"`` (first half of Shakespeare, even-numbered stdlib files, GSM8K
train) is the one anything may be tuned on; ``"heldout"`` (second half, odd-numbered files, GSM8K
test) is only measured. The needle is a 5-digit number in one of `NEEDLE_FORMATS`, placed at a
sentence boundary at the requested depth; the prompt ends with the format's question, whose answer
is ``" <number>"``.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import re
import sysconfig
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from hf_adamas.bench.evaluation import PasskeyTrial
from hf_common.data import shared_data_file

Split = Literal["tuning", "heldout"]
SPLITS: tuple[Split, ...] = ("tuning", "heldout")

NEEDLE_FORMATS = {
    "passkey": (
        "The pass key is {value}. Remember it. {value} is the pass key.",
        "What is the pass key? The pass key is",
    ),
    "code": ("Remember this code: {value}.", "What was the code to remember? The code is"),
    "secret": (
        "The secret for {name} is {value}.",
        "What is the secret for {name}? The secret for {name} is",
    ),
}
"""Needle and question templates; the answer is always ``" {value}"``."""

NAMES = ("Orion", "Maple", "Harbor", "Juniper", "Falcon", "Copper", "Willow", "Granite", "Lantern", "Saffron")
"""Names the ``"secret"`` format files the number under."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MIN_CHARS, _MAX_CHARS = 20, 400


def _sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences of ``text`` of a readable length (no doctest or code lines)."""
    pieces = _SENTENCE_END.split(" ".join(text.split()))
    return [s for s in pieces if _MIN_CHARS <= len(s) <= _MAX_CHARS and ">>>" not in s and "`" not in s]


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


@functools.cache
def sentence_pools(split: Split, data_dir: str | None = None) -> dict[str, tuple[str, ...]]:
    """The sentences of each source in ``split``: ``{"shakespeare": ..., "stdlib": ..., "gsm8k": ...}``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    text = shared_data_file("text", "tinyshakespeare.txt", data_dir=data_dir).read_text(encoding="utf-8")
    half = len(text) // 2
    shakespeare = _sentences(text[:half] if split == "tuning" else text[half:])
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[split == "heldout" :: 2]
    stdlib = [s for path in files for doc in _docstrings(path) for s in _sentences(doc)]
    gsm8k_file = shared_data_file(
        "gsm8k", "train.jsonl" if split == "tuning" else "test.jsonl", data_dir=data_dir
    )
    questions = [
        json.loads(line)["question"] for line in gsm8k_file.read_text(encoding="utf-8").splitlines() if line
    ]
    gsm8k = [q for q in (" ".join(q.split()) for q in questions) if len(q) >= _MIN_CHARS]
    return {"shakespeare": tuple(shakespeare), "stdlib": tuple(stdlib), "gsm8k": tuple(gsm8k)}


def needle_prompt(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: float,
    needle_format: str,
    rng: random.Random,
    split: Split = "heldout",
    data_dir: str | None = None,
) -> PasskeyTrial:
    """A prompt of at most ``length`` tokens: varied haystack, the needle at ``depth``, the question.

    The haystack is whole sentences, the first that would overflow ``length`` ending it (so a prompt
    is shorter by less than one sentence, at most about 100 tokens). The number, the name of the ``"secret"`` format and the haystack sentences are drawn from
    ``rng`` (each sentence: a source uniformly at random, then one of its sentences).
    """
    if needle_format not in NEEDLE_FORMATS:
        raise ValueError(f"needle format must be one of {sorted(NEEDLE_FORMATS)}, got {needle_format!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    value, name = f"{rng.randrange(10000, 100000)}", rng.choice(NAMES)
    needle_template, question_template = NEEDLE_FORMATS[needle_format]
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    needle_ids = encode(" " + needle_template.format(value=value, name=name))
    question_ids = encode(" " + question_template.format(name=name))
    room = length - len(needle_ids) - len(question_ids)
    if room < 16:
        raise ValueError(f"length {length} leaves no room for a haystack around the needle and question")
    pools = [pool for pool in sentence_pools(split, data_dir).values() if pool]
    haystack: list[list[int]] = []
    filled = 0
    while True:  # whole sentences only: the question must not follow a sentence cut in half
        sentence = encode(" " + rng.choice(rng.choice(pools)))
        if filled + len(sentence) > room:
            break
        haystack.append(sentence)
        filled += len(sentence)
    boundaries = [0]
    for sentence in haystack:
        boundaries.append(boundaries[-1] + len(sentence))
    cut = min(range(len(haystack) + 1), key=lambda i: abs(boundaries[i] - depth * filled))
    before = [t for sentence in haystack[:cut] for t in sentence]
    after = [t for sentence in haystack[cut:] for t in sentence]
    ids = before + needle_ids + after + question_ids
    info = {"haystack": "varied", "split": split, "format": needle_format, "depth": depth}
    return PasskeyTrial(torch.tensor([ids]), len(question_ids), " " + value, info)
