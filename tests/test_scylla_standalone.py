"""The standalone-draft baseline: shaped like a Scylla draft, trained on the same records, lossless as an assistant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import chat_word_tokenizer
from scylla_models import continuation_record, make_draft, make_target

from hf_scylla.bench.speed import run_benchmark
from hf_scylla.standalone import collate_for_causal_lm, make_standalone_draft, train_standalone_draft
from hf_scylla.training import FeatureDataset

PROMPT_LENGTH = 3


@pytest.fixture(scope="module")
def target():
    return make_target(context_scale=0.3)


@pytest.fixture(scope="module")
def records(target) -> FeatureDataset:
    """Twelve sampled continuations of the target (its hidden states are not needed by the baseline)."""
    torch.manual_seed(0)
    rows = [
        continuation_record(target, torch.randint(3, 128, (1, PROMPT_LENGTH)), length, with_features=False)
        for length in range(6, 18)
    ]
    return FeatureDataset(rows)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_standalone_draft_has_the_drafts_shape_and_the_targets_embedding(target) -> None:
    standalone = make_standalone_draft(target, num_hidden_layers=2)
    assert standalone.config.num_hidden_layers == 2
    assert standalone.config.vocab_size == target.config.vocab_size
    assert torch.equal(standalone.get_input_embeddings().weight, target.get_input_embeddings().weight)
    assert torch.equal(standalone.get_output_embeddings().weight, target.get_output_embeddings().weight)
    # decoder layers as the Scylla draft's; the draft adds only its 2h -> h input projection
    draft = make_draft(target, depth=2)
    layers = sum(p.numel() for p in standalone.model.layers.parameters())
    assert layers == sum(p.numel() for p in draft.layers.parameters())


def test_collate_labels_only_the_learned_tokens(records) -> None:
    batch = collate_for_causal_lm([records[0], records[5]])
    short, long = len(records[0]["input_ids"]), len(records[5]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, long)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (long - short)
    assert (batch["labels"][:, :PROMPT_LENGTH] == -100).all() and (batch["labels"][0, short:] == -100).all()
    assert torch.equal(batch["labels"][1, PROMPT_LENGTH:], records[5]["input_ids"][PROMPT_LENGTH:])


def test_training_lowers_the_loss_and_keeps_the_embedding(target, records, tmp_path: Path) -> None:
    standalone = make_standalone_draft(target)
    batch = collate_for_causal_lm(list(records))
    with torch.no_grad():
        before = standalone(**batch).loss
    embedding = standalone.get_input_embeddings().weight.clone()
    train_standalone_draft(
        standalone, records, tmp_path, num_train_epochs=20, per_device_train_batch_size=4, learning_rate=3e-3
    )
    with torch.no_grad():
        after = standalone(**batch).loss
    assert after < before - 0.2
    assert torch.equal(standalone.get_input_embeddings().weight, embedding)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_bench_runs_the_standalone_draft_as_a_lossless_assistant(target, tmp_path: Path) -> None:
    prompts = {"tiny": ["w5 w6 w7 w5 w6", "w20 w21"]}
    assistant = make_standalone_draft(target)
    rows = run_benchmark(
        target,
        chat_word_tokenizer(),
        prompts,
        max_new_tokens=12,
        assistant=assistant,
        assistant_name="standalone",
    )
    assert [row["method"] for row in rows] == ["greedy", "prompt_lookup_10", "standalone"]
    assert all(row["lossless"] for row in rows)
    assert rows[2]["tokens_per_target_forward"] >= 1.0
