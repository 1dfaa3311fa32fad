"""ScyllaDraftConfig validation, shared tensors, save/load round trips and mismatched or broken checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import word_tokenizer
from safetensors.torch import load_file, save_file
from scylla_models import make_draft, make_target
from transformers import AutoConfig, AutoModel

from hf_scylla import ScyllaDraftConfig, ScyllaDraftModel, tokenizer_fingerprint
from hf_scylla.modeling import SHARED_WITH_TARGET


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_hidden_layers": 0}, "draft depth D"),
        ({"max_draft_tokens": 0}, "max_draft_tokens must be >= 1"),
        ({"confidence_threshold": 1.0}, "confidence_threshold must be in"),
        ({"vocab_size": 64}, r"vocab_size \(64\) must equal target_vocab_size \(128\)"),
    ],
)
def test_config_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScyllaDraftConfig.from_target_config(make_target().config, **overrides)


def test_config_defaults_to_the_target_and_records_it() -> None:
    target = make_target()
    tokenizer = word_tokenizer([f"w{i}" for i in range(128)])
    config = ScyllaDraftConfig.from_target_config(target.config, num_hidden_layers=3, tokenizer=tokenizer)
    assert config.hidden_size == target.config.hidden_size
    assert config.intermediate_size == target.config.intermediate_size
    assert config.num_attention_heads == target.config.num_attention_heads
    assert config.target_hidden_size == target.config.hidden_size
    assert config.target_tokenizer_hash == tokenizer_fingerprint(tokenizer)
    assert isinstance(AutoConfig.for_model("scylla_draft"), ScyllaDraftConfig)


def test_attach_target_shares_embedding_and_lm_head_tensors() -> None:
    target = make_target()
    draft = make_draft(target)
    assert draft.embed_tokens.weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()
    assert draft.lm_head.weight.data_ptr() == target.get_output_embeddings().weight.data_ptr()


def test_narrow_draft_projects_back_to_the_target_width() -> None:
    target = make_target()
    draft = make_draft(
        target, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
    )
    features = torch.randn(1, 5, target.config.hidden_size)
    out = draft(torch.randint(3, 128, (1, 5)), features)
    assert out.features.shape == (1, 5, target.config.hidden_size)
    assert out.logits.shape == (1, 5, 128)


@pytest.mark.parametrize("tied", [False, True], ids=["untied-target", "tied-target"])
@pytest.mark.parametrize("save_embeddings", [False, True], ids=["without-embeddings", "with-embeddings"])
def test_save_load_round_trip(tmp_path: Path, save_embeddings: bool, tied: bool) -> None:
    target = make_target(tie_word_embeddings=tied)
    draft = make_draft(target, depth=2, save_embeddings=save_embeddings)
    draft.save_pretrained(tmp_path)
    saved_keys = set(load_file(tmp_path / "model.safetensors"))
    assert bool(saved_keys & set(SHARED_WITH_TARGET)) == save_embeddings
    assert "fc.weight" in saved_keys

    loaded = ScyllaDraftModel.from_pretrained(tmp_path, target=target).eval()
    assert loaded.embed_tokens.weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()
    for key, value in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    standalone = AutoModel.from_pretrained(tmp_path)
    assert isinstance(standalone, ScyllaDraftModel)
    assert standalone.is_attached == save_embeddings
    if save_embeddings:
        assert torch.equal(standalone.lm_head.weight, target.lm_head.weight)


@pytest.mark.parametrize(
    ("target_overrides", "message"),
    [
        ({"head_dim": 32}, "hidden size 32, but this target has hidden size 64"),
        ({"vocab_size": 96}, "vocab size 128, but this target has vocab size 96"),
    ],
    ids=["hidden-size", "vocab"],
)
def test_draft_for_another_target_is_rejected(tmp_path: Path, target_overrides: dict, message: str) -> None:
    make_draft(make_target()).save_pretrained(tmp_path)
    other_target = make_target(**target_overrides)
    with pytest.raises(ValueError, match=message):
        ScyllaDraftModel.from_pretrained(tmp_path, target=other_target)


def test_draft_for_another_tokenizer_is_rejected() -> None:
    target = make_target()
    tokenizer = word_tokenizer([f"w{i}" for i in range(128)])
    other = word_tokenizer([f"v{i}" for i in range(128)])
    draft = ScyllaDraftModel(ScyllaDraftConfig.from_target_config(target.config, tokenizer=tokenizer))
    draft.attach_target(target, tokenizer)
    with pytest.raises(
        ValueError, match=f"fingerprint {tokenizer_fingerprint(tokenizer)}.*{tokenizer_fingerprint(other)}"
    ):
        draft.attach_target(target, other)


def test_partial_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    target = make_target()
    make_draft(target, depth=2).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("layers.1.")}, tmp_path / "model.safetensors"
    )
    with pytest.raises(ValueError, match="is partial: it lacks 9 draft weights"):
        ScyllaDraftModel.from_pretrained(tmp_path, target=target)


@pytest.mark.parametrize("damage", ["truncated-weights", "no-config"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    target = make_target()
    make_draft(target).save_pretrained(tmp_path)
    if damage == "truncated-weights":
        path = tmp_path / "model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    else:
        (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="Could not read the Scylla draft checkpoint"):
        ScyllaDraftModel.from_pretrained(tmp_path, target=target)


def test_corrupt_config_is_a_clear_error(tmp_path: Path) -> None:
    target = make_target()
    make_draft(target).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_draft_tokens"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="max_draft_tokens must be >= 1"):
        ScyllaDraftModel.from_pretrained(tmp_path, target=target)
