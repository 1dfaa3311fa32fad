"""Teacher-forced top-1 agreement of several drafts on several prompt sets, side by side.

The draft gets the target's own features and tokens at every position and predicts the next token;
agreement is how often that is the target's greedy choice (`verify_cost.teacher_forced_agreement`).
It bounds a chain's acceptance without decoding, so it compares drafts quickly, next to the tau
that ``hf-scylla bench`` measures by real decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_common.default_model import load_model_and_tokenizer
from hf_common.reporting import markdown_table, write_report
from hf_scylla.bench.verify_cost import agreement_sequences, teacher_forced_agreement
from hf_scylla.modeling import ScyllaDraftModel

__all__ = ["agreement_report"]


@torch.no_grad()
def agreement_report(
    model_name: str,
    drafts: Sequence[Path],
    prompts_dirs: Sequence[Path],
    output_dir: Path,
    command: str,
    limit: int | None = None,
) -> list[dict]:
    """One row per (prompt set, draft): agreement and positions; writes ``agreement.{json,md}``."""
    if len({folder.name for folder in drafts}) != len(drafts):
        raise ValueError("two --draft folders have the same name; rename one")
    target, tokenizer = load_model_and_tokenizer(model_name)
    loaded = {
        folder.name: ScyllaDraftModel.from_pretrained(
            folder, target=target, target_tokenizer=tokenizer
        ).eval()
        for folder in drafts
    }
    rows = []
    for prompts_dir in prompts_dirs:
        sets = agreement_sequences(prompts_dir, tokenizer, limit)
        if not sets:
            raise ValueError(f"no *.jsonl prompt sets in {prompts_dir}")
        for name, sequences in tqdm(sets.items(), desc=f"agreement on {prompts_dir.name}", unit="set"):
            for draft, result in teacher_forced_agreement(target, loaded, sequences).items():
                rows.append({"set": name, "prompts": len(sequences), "draft": draft, **result})
    body = (
        "Teacher-forced top-1 agreement: the draft reads the target's features and tokens of the prompt "
        "and its reference answer (the prompt alone where a set has none) and predicts each next token.\n\n"
        + markdown_table(rows, ["set", "prompts", "draft", "agreement", "positions"])
    )
    write_report(output_dir, "agreement", command, {"rows": rows}, f"Draft agreement, {model_name}", body)
    return rows
