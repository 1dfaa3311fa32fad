"""EAGLE-3 layer fusion: a fused draft starts where its single-layer draft was, decodes losslessly on every
path (chain, tree, batched, the cache-free references), saves and reloads, trains on fused features, and
refuses layers the target does not have."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scylla_models import make_draft, make_target

from hf_scylla import (
    ScyllaDraftConfig,
    ScyllaDraftModel,
    TreeConfig,
    batched_generate,
    generate,
    reference_tree_decode,
)
from hf_scylla.config import layer_fusion_indices
from hf_scylla.modeling import add_layer_fusion, check_draft_matches_target
from hf_scylla.naive import reference_speculative_decode
from hf_scylla.training import (
    FeatureDataset,
    cache_text_features,
    collate_features,
    eagle_loss,
    train_draft,
)

LAYERS = [0, 1, -1]  # embeddings, after layer 1, final normed state of the 2-layer tiny target


def prompt(seed: int, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def target():
    return make_target(context_scale=0.1)


@pytest.fixture(scope="module")
def fused(target) -> ScyllaDraftModel:
    """An oracle draft given fusion, then its fuse perturbed so that every fused layer matters."""
    draft = add_layer_fusion(
        make_draft(target, oracle=True, oracle_context_scale=0.3, max_draft_tokens=3), LAYERS
    )
    with torch.no_grad():
        draft.fuse.weight.add_(
            0.05 * torch.randn(draft.fuse.weight.shape, generator=torch.Generator().manual_seed(0))
        )
    return draft


def test_layer_fusion_indices_pick_low_middle_and_final_states() -> None:
    assert layer_fusion_indices(30) == [3, 16, -1]
    assert layer_fusion_indices(3) == [1, 2, -1]
    with pytest.raises(ValueError, match="3 or more layers"):
        layer_fusion_indices(2)


def test_added_fusion_starts_exactly_from_the_single_layer_draft(target) -> None:
    draft = make_draft(target)
    fused = add_layer_fusion(draft, LAYERS)
    ids = prompt(0, 12)
    states = target(ids, output_hidden_states=True).hidden_states
    assert fused.feature_layers(target.config) == [0, 1, 2] and draft.feature_layers(target.config) == [2]
    torch.testing.assert_close(fused.target_features(states), draft.target_features(states))
    with torch.no_grad():
        single = draft(ids[:, 1:], draft.target_features(states)[:, :-1])
        both = fused(ids[:, 1:], fused.target_features(states)[:, :-1])
    torch.testing.assert_close(both.logits, single.logits)
    assert fused.fc.weight.data_ptr() != draft.fc.weight.data_ptr()  # a copy, not the same weights


@pytest.mark.parametrize(
    ("layers", "message"),
    [([0, 1], "must include the layer the draft reads"), ([2, -1], "name the same state twice")],
)
def test_fusion_layers_that_cannot_work_are_refused(target, layers, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_draft_matches_target(add_layer_fusion(make_draft(target), layers).config, target.config)


def test_fusion_layer_outside_the_target_is_refused(target) -> None:
    config = ScyllaDraftConfig.from_target_config(target.config, target_hidden_layers=[0, 5, -1])
    with pytest.raises(ValueError, match="Draft reads hidden layer 5"):
        check_draft_matches_target(config, target.config)
    with pytest.raises(ValueError, match="distinct"):
        ScyllaDraftConfig.from_target_config(target.config, target_hidden_layers=[0, 0])
    with pytest.raises(ValueError, match="already fuses"):
        add_layer_fusion(add_layer_fusion(make_draft(target), LAYERS), LAYERS)


def test_fused_draft_is_lossless_on_every_decoding_path(target, fused) -> None:
    accepted = 0
    for seed in range(3):
        ids = prompt(seed)
        plain = target.generate(ids, max_new_tokens=24, do_sample=False)
        chain = generate(target, fused, ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(chain.output, plain)
        sequence, cycles = reference_speculative_decode(target, fused, ids, max_new_tokens=24)
        assert torch.equal(sequence, plain)
        assert cycles == list(zip(chain.stats.drafted, chain.stats.accepted, strict=True))
        tree = TreeConfig(3, 2, 5)
        branched = generate(target, fused, ids, max_new_tokens=24, do_sample=False, tree=tree)
        assert torch.equal(branched.output, plain)
        assert torch.equal(reference_tree_decode(target, fused, ids, tree, 24)[0], plain)
        accepted += sum(chain.stats.accepted)
    batch = torch.cat([prompt(3), prompt(4)])
    plain = target.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=16, do_sample=False)
    batched = batched_generate(target, fused, batch, max_new_tokens=16, draft_tokens=3)
    assert torch.equal(batched.sequences, plain)
    assert accepted > 0, "the test needs accepted draft tokens"


def test_fused_draft_saves_and_reloads(target, fused, tmp_path: Path) -> None:
    fused.save_pretrained(tmp_path)
    reloaded = ScyllaDraftModel.from_pretrained(tmp_path, target=target)
    assert reloaded.config.target_hidden_layers == LAYERS
    assert torch.equal(reloaded.fuse.weight, fused.fuse.weight)
    ids = prompt(5)
    assert torch.equal(
        generate(target, reloaded, ids, max_new_tokens=12, do_sample=False).output,
        generate(target, fused, ids, max_new_tokens=12, do_sample=False).output,
    )


def test_fused_draft_trains_on_fused_features_only(target, tmp_path: Path) -> None:
    chunks = [prompt(seed, 24)[0] for seed in range(8)]
    features = cache_text_features(target, chunks, fused_layers=LAYERS)
    record = features[0]
    assert record["fused_states"].shape == (24, 3 * target.config.hidden_size)
    states = target(chunks[0][None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(
        record["fused_states"][:, -target.config.hidden_size :].float(), states[-1][0], atol=0.05, rtol=0.02
    )
    draft = add_layer_fusion(make_draft(target), LAYERS)
    batch = collate_features(features.records)
    with torch.no_grad():
        before = eagle_loss(draft, **batch)
    fuse_before = draft.fuse.weight.clone()
    train_draft(draft, features, tmp_path, max_steps=30, learning_rate=1e-2, noise_std=0.0, use_cpu=True)
    with torch.no_grad():
        after = eagle_loss(draft, **batch)
    assert after.loss < before.loss
    assert not torch.equal(draft.fuse.weight, fuse_before)  # the fusion itself is learned
    single = FeatureDataset(
        [{key: value for key, value in r.items() if key != "fused_states"} for r in features]
    )
    with pytest.raises(ValueError, match="layer-fusion draft trains on fused_states"):
        eagle_loss(draft, **collate_features(single.records))
    with pytest.raises(ValueError, match="layer-fusion draft trains on fused_states"):
        eagle_loss(make_draft(target), **batch)
