"""Training conversations the target writes itself: Magpie user turns, then the target's greedy answers.

No chat data set can be downloaded where this runs, and a draft should learn the distribution it is
verified against anyway, so the target produces both sides (Magpie, arXiv 2406.08464):

1. **user turns**: the target samples from the chat template's user prefix alone (system prompt +
   ``<|im_start|>user``) until it closes the turn; every batch has its own seed;
2. **answers**: the target answers those turns, plus any given seed prompts, in batched greedy
   generation (left padding), as it will at inference.

Each stage appends finished batches to a JSONL journal in the run folder, so a killed run resumes where
it stopped (a line cut by the kill is dropped); ``settings.json`` pins what the journals were made with
and a resume with other settings is refused. The result is saved as a `datasets` data set
(``<run>/dataset``) that ``hf-scylla train --data <run>/dataset`` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_scylla.data import (
    append_journal,
    differing_keys,
    generate_continuations,
    read_journal,
    regenerate_responses,
)

__all__ = [
    "SelfDistillSettings",
    "sample_user_turns",
    "self_distilled_conversations",
    "user_turn_prefix",
]

_MARKER = "\x00user-turn\x00"


@dataclass(frozen=True)
class SelfDistillSettings:
    """What a self-distillation run generates; a resumed run must use the same values."""

    user_turns: int = 1024
    user_turn_tokens: int = 96
    response_tokens: int = 128
    batch_size: int = 32
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        for name in ("user_turns", "user_turn_tokens", "response_tokens", "batch_size"):
            minimum = 0 if name == "user_turns" else 1
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"temperature must be > 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}"
            )


def user_turn_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The chat template's text up to where a user's words begin (system prompt included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False)
    if _MARKER not in text:
        raise ValueError("the tokenizer's chat template does not place the user's words verbatim")
    return text[: text.index(_MARKER)]


@torch.no_grad()
def sample_user_turns(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: SelfDistillSettings,
    journal: str | os.PathLike,
) -> list[str]:
    """``settings.user_turns`` sampled user turns (Magpie), journaled per batch in ``journal``.

    Returns the distinct turns that the target closed within ``user_turn_tokens`` (cut-off ones are
    journaled but dropped), in generation order.
    """
    journal = Path(journal)
    done = {record["batch"] for record in read_journal(journal)}
    prefix = user_turn_prefix(tokenizer)
    batches = range(-(-settings.user_turns // settings.batch_size))
    progress = tqdm(batches, desc="sampling user turns", unit="batch", initial=len(done))
    for index in batches:
        if index in done:
            continue
        size = min(settings.batch_size, settings.user_turns - index * settings.batch_size)
        torch.manual_seed(settings.seed + index)
        sampled = generate_continuations(
            target,
            tokenizer,
            [prefix] * size,
            settings.user_turn_tokens,
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
        )
        records = [
            {
                "batch": index,
                "turn": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                "closed": closed,
            }
            for ids, closed in sampled
        ]
        append_journal(journal, records)
        progress.update()
    progress.close()
    turns = [record["turn"] for record in read_journal(journal) if record["closed"] and record["turn"]]
    return list(dict.fromkeys(turns))


def _check_settings(path: Path, recorded: dict) -> None:
    if path.is_file():
        changed = differing_keys(recorded, json.loads(path.read_text()))
        if changed:
            raise ValueError(
                f"{path.parent} was started with other settings (differing: {', '.join(changed)}): "
                "resume with the same ones, or choose another output folder"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")


def self_distilled_conversations(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    settings: SelfDistillSettings = SelfDistillSettings(),
    seed_prompts: Sequence[str] = (),
    target_name: str = "",
):
    """Generate (or resume) a run in ``output_dir`` and return its `datasets.Dataset` of
    ``prompt`` / ``response`` / ``source`` (``"sampled"`` user turns or ``"seed"`` prompts).

    ``output_dir`` holds ``settings.json``, the journals ``user_turns.jsonl`` and ``answers.jsonl``
    and, when done, ``dataset/``. A folder holding a ``dataset/`` without this run's ``settings.json``
    is refused (it was not made here).
    """
    import datasets

    from hf_scylla.training import weights_fingerprint

    output_dir = Path(output_dir)
    final = output_dir / "dataset"
    settings_file = output_dir / "settings.json"
    if final.exists() and not settings_file.is_file():
        raise ValueError(f"{final} exists and was not made by a self-distillation run: choose another folder")
    recorded = dataclasses.asdict(settings) | {
        "target": target_name,
        "target_weights": weights_fingerprint(target),
        "seed_prompts": hashlib.sha256("\n".join(seed_prompts).encode()).hexdigest()[:16],
    }
    _check_settings(settings_file, recorded)
    turns = (
        sample_user_turns(target, tokenizer, settings, output_dir / "user_turns.jsonl")
        if settings.user_turns
        else []
    )
    sources = dict.fromkeys(seed_prompts, "seed") | {
        turn: "sampled" for turn in turns if turn not in seed_prompts
    }
    answers = regenerate_responses(
        target,
        tokenizer,
        list(sources),
        settings.response_tokens,
        output_dir / "answers.jsonl",
        settings.batch_size,
    )
    rows = [
        {"prompt": prompt, "response": response, "source": sources[prompt]}
        for prompt, response in answers
        if response
    ]
    if not rows:
        raise ValueError(
            "no conversation to save: no sampled turn closed within user_turn_tokens and no seed prompt "
            "got a non-empty answer (raise user_turn_tokens or pass seed prompts)"
        )
    dataset = datasets.Dataset.from_list(rows)
    staging = output_dir / "dataset.partial"
    if staging.exists():
        shutil.rmtree(staging)  # this run's own unfinished save
    dataset.save_to_disk(str(staging))
    if final.exists():
        shutil.rmtree(final)  # this run's own earlier save (settings.json matched)
    staging.rename(final)
    return dataset
