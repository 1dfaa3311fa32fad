"""EAGLE loss and draft training: the loss falls, checkpoints omit the target's tensors, resume continues."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scylla_models import continuation_record, make_draft, make_target

from hf_scylla import ScyllaDraftModel
from hf_scylla.modeling import SHARED_WITH_TARGET
from hf_scylla.training import FeatureDataset, collate_features, eagle_loss, train_draft

PROMPT_LENGTH = 4


@pytest.fixture(scope="module")
def target():
    return make_target(context_scale=0.3)


@pytest.fixture(scope="module")
def features(target) -> FeatureDataset:
    """Target features of 16 sampled continuations; prompts are masked out of the loss."""
    generator = torch.Generator().manual_seed(0)
    records = []
    torch.manual_seed(0)
    for _ in range(16):
        prompt = torch.randint(3, 128, (1, PROMPT_LENGTH), generator=generator)
        new_tokens = int(torch.randint(8, 20, (), generator=generator))
        records.append(continuation_record(target, prompt, new_tokens))
    return FeatureDataset(records)


def test_collate_pads_and_masks_padding(features) -> None:
    batch = collate_features([features[0], features[1], features[2]])
    lengths = [len(features[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["hidden_states"].shape[:2] == (3, max(lengths))
    assert batch["loss_mask"].sum() == sum(length - PROMPT_LENGTH for length in lengths)


def test_loss_ignores_masked_positions(target, features) -> None:
    draft = make_draft(target)
    record = features[0]
    batch = collate_features([record])
    changed = {key: value.clone() for key, value in batch.items()}
    changed["loss_mask"][0, : PROMPT_LENGTH + 3] = 0  # drop three more positions
    with torch.no_grad():
        assert not torch.isclose(eagle_loss(draft, **batch).loss, eagle_loss(draft, **changed).loss)
        padded = collate_features([record, features[1]])
        alone = eagle_loss(draft, **batch)
        assert torch.isclose(eagle_loss(draft, **{k: v[:1] for k, v in padded.items()}).loss, alone.loss)


def test_unrolled_loss_reads_the_drafts_own_features(target, features) -> None:
    draft = make_draft(target)
    batch = collate_features([features[0], features[1]])
    with torch.no_grad():
        one, two = eagle_loss(draft, **batch, unroll_steps=1), eagle_loss(draft, **batch, unroll_steps=2)
    assert torch.equal(one.feature_loss, two.feature_loss)
    assert two.loss > one.loss


def test_training_lowers_the_loss_and_saves_only_draft_weights(target, features, tmp_path: Path) -> None:
    draft = make_draft(target)
    batch = collate_features([features[i] for i in range(len(features))])
    with torch.no_grad():
        before = eagle_loss(draft, **batch)
    train_draft(
        draft,
        features,
        tmp_path,
        max_steps=60,
        learning_rate=1e-2,
        noise_std=0.0,
        per_device_train_batch_size=4,
        use_cpu=True,
    )
    with torch.no_grad():
        after = eagle_loss(draft, **batch)
    # The tiny target's next-token law is near uniform, so the feature term carries the signal.
    assert after.feature_loss < 0.7 * before.feature_loss
    assert after.loss < before.loss
    assert not set(load_file(tmp_path / "model.safetensors")) & set(SHARED_WITH_TARGET)
    assert target.lm_head.weight.requires_grad is False
    reloaded = ScyllaDraftModel.from_pretrained(tmp_path, target=target)
    assert torch.equal(reloaded.fc.weight, draft.fc.weight)


def test_resume_continues_from_the_last_checkpoint(target, features, tmp_path: Path) -> None:
    """Four steps, then a resumed run to eight, equal eight uninterrupted steps."""
    settings = {
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 4,
        "save_steps": 4,
        "use_cpu": True,
        "seed": 7,
    }
    straight = make_draft(target)
    train_draft(straight, features, tmp_path / "straight", max_steps=8, **settings)

    interrupted = make_draft(target)
    train_draft(interrupted, features, tmp_path / "resumed", max_steps=4, **settings)
    resumed = make_draft(target, seed=99)  # different initial weights: they must come from the checkpoint
    output = train_draft(resumed, features, tmp_path / "resumed", max_steps=8, resume=True, **settings)
    assert output.global_step == 8
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_feature_only_loss_skips_the_lm_head(target, features) -> None:
    draft = make_draft(target)
    batch = collate_features([features[0], features[1]])
    with torch.no_grad():
        full, feature_only = eagle_loss(draft, **batch), eagle_loss(draft, **batch, token_weight=0.0)
    assert torch.equal(full.feature_loss, feature_only.feature_loss)
    assert torch.equal(feature_only.loss, feature_only.feature_loss)
    assert torch.isnan(feature_only.token_loss)
    assert torch.isclose(full.loss, full.feature_loss + 0.1 * full.token_loss)


@torch.no_grad()
def test_reduced_head_distils_the_target_renormalized_on_its_subset(target, features) -> None:
    from hf_scylla.bench.verify_cost import clone_draft
    from hf_scylla.vocab import reduce_draft_vocabulary

    draft = make_draft(target)
    batch = collate_features([features[0], features[1]])
    full = eagle_loss(draft, **batch, token_weight=1.0)
    everything = reduce_draft_vocabulary(clone_draft(draft, target), torch.arange(128))
    torch.testing.assert_close(eagle_loss(everything, **batch, token_weight=1.0).loss, full.loss)

    subset = torch.arange(0, 128, 4)
    reduced = eagle_loss(
        reduce_draft_vocabulary(clone_draft(draft, target), subset), **batch, token_weight=1.0
    )
    out = draft(batch["input_ids"][:, 1:], batch["hidden_states"][:, :-1])
    target_logits = target.get_output_embeddings()(batch["hidden_states"][:, 1:])
    teacher = target_logits[..., subset].log_softmax(-1).exp()
    student = out.logits[..., subset].log_softmax(-1)
    mask = batch["loss_mask"][:, 1:].float()
    expected = ((-(teacher * student).sum(-1)) * mask).sum() / mask.sum()
    torch.testing.assert_close(reduced.token_loss, expected)
