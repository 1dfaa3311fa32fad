"""Adamas through transformers: registration, exactness, sparse path vs a brute-force oracle, the
code cache under generate/crop/beam search/batch ops, padding, config round trip, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_config
from transformers import AutoModelForCausalLM, Gemma2Config, GPTNeoConfig

import hf_adamas
from hf_adamas import AdamasCache, AdamasConfig, AdamasLayer, apply_adamas, ops
from hf_adamas.bench.evaluation import Method, attention_method, decode_step, prefill
from hf_adamas.cache import PreallocatedLayer
from hf_common.compat import cache_kwargs, crop_cache, output_cache


def _prompt(batch: int = 2, length: int = 40, pad: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 128, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :pad] = 0  # left padding on the first row
    return input_ids, attention_mask


def _generate(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False, **kwargs
    )


def test_from_pretrained_and_set_attn_implementation(tmp_path) -> None:
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="adamas")
    assert loaded.config._attn_implementation == "adamas"
    model.set_attn_implementation("adamas")
    assert model.config._attn_implementation == "adamas"


def test_budget_covering_the_sequence_equals_sdpa(tiny_model) -> None:
    """With budget >= length, generate() gives sdpa's tokens (batch 2, left padding, GQA)."""
    input_ids, attention_mask = _prompt()
    expected = _generate(tiny_model, input_ids, attention_mask)
    apply_adamas(tiny_model, AdamasConfig(token_budget=64))
    assert torch.equal(_generate(tiny_model, input_ids, attention_mask), expected)


@pytest.mark.parametrize("gqa_selection", ["per_query_head", "shared_per_kv_group"])
@pytest.mark.parametrize("selector", ["adamas", "adamas_asymmetric", "streaming_llm", "quest", "oracle"])
def test_sparse_step_matches_masked_dense_attention(tiny_config, gqa_selection, selector) -> None:
    """A sparse decode step equals dense attention with every unselected key masked out."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config).eval()
    settings = AdamasConfig(
        token_budget=8, dense_layers=1, gqa_selection=gqa_selection, selector=selector, quest_page_size=4
    )
    apply_adamas(model, settings)
    attention = model.model.layers[2].self_attn
    captured = {}

    def spy(query, key, value, indices, scaling):
        output = sparse(query, key, value, indices, scaling)
        captured.update(query=query, key=key, value=value, indices=indices, scaling=scaling, output=output)
        return output

    def fused_spy(query, key, value, *arguments):  # the default rule's step as one C++ call on CPU
        output, indices = fused(query, key, value, *arguments)
        captured.update(
            query=query, key=key, value=value, indices=indices, scaling=arguments[-1], output=output
        )
        return output, indices

    sparse, fused = ops.sparse_decode_attention, hf_adamas.attention.asymmetric_decode_step_cpu
    input_ids, attention_mask = _prompt()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "sparse_decode_attention", spy)
        patch.setattr(hf_adamas.attention, "asymmetric_decode_step_cpu", fused_spy)
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2, do_sample=False)
    query, key, value, indices = (captured[k] for k in ("query", "key", "value", "indices"))
    groups = attention.num_key_value_groups
    per_head = indices.repeat_interleave(groups, 1) if indices.shape[1] != query.shape[1] else indices
    keep = torch.zeros(*per_head.shape[:2], key.shape[2], dtype=torch.bool)
    keep.scatter_(2, per_head.clamp(min=0), per_head >= 0)
    scores = torch.einsum("bhd,bhsd->bhs", query.float(), key.float().repeat_interleave(groups, 1))
    weights = (scores * captured["scaling"]).masked_fill(~keep, float("-inf")).softmax(-1)
    expected = torch.einsum("bhs,bhsd->bhd", weights, value.float().repeat_interleave(groups, 1))
    torch.testing.assert_close(captured["output"].float(), expected)
    # padded positions are never selected; every row keeps the current token
    assert not (per_head[0] >= 0).logical_and(per_head[0] < 5).any()
    assert (per_head == key.shape[2] - 1).any(-1).all()


def test_dense_layers_are_untouched(tiny_model) -> None:
    """Hidden states after the dense layers equal sdpa's, even with a tiny budget."""
    input_ids, _ = _prompt(pad=0)
    cache, _ = prefill(tiny_model, input_ids)
    token = input_ids[:, -1:]
    dense = tiny_model(input_ids=token, output_hidden_states=True, **cache_kwargs(cache)).hidden_states
    crop_cache(cache, input_ids.shape[1])
    with attention_method(tiny_model, Method("adamas", AdamasConfig(token_budget=4, dense_layers=2))):
        sparse = tiny_model(input_ids=token, output_hidden_states=True, **cache_kwargs(cache)).hidden_states
    for layer in range(3):  # embeddings, then the outputs of layers 0 and 1
        assert torch.equal(dense[layer], sparse[layer]), layer
    assert not torch.equal(dense[-1], sparse[-1])


def test_generate_fills_code_cache_that_matches_keys() -> None:
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama")).eval()
    apply_adamas(model, AdamasConfig(token_budget=8, dense_layers=1))
    input_ids, attention_mask = _prompt()
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, return_dict_in_generate=True
    )
    layers = output_cache(output).layers
    assert type(layers[0]) is PreallocatedLayer  # a dense layer: no codes, no torch.cat per step
    for layer in layers[1:]:
        assert isinstance(layer, AdamasLayer)
        assert torch.equal(layer.key_codes, ops.hadamard_codes(layer.keys, layer.thresholds, 2))
        assert layer.key_codes.shape[-1] == 64 * 2 // 8  # 16 bytes per key per head at head_dim 64


def test_code_cache_stays_aligned_under_crop_reorder_and_batch_ops() -> None:
    config = make_tiny_config("qwen2")
    settings = AdamasConfig(token_budget=8, dense_layers=1)
    cache = AdamasCache(config, settings)
    layer = cache.layers[2]
    keys, values = torch.randn(3, 2, 300, 64), torch.randn(3, 2, 300, 64)
    layer.update(keys[:, :, :290], values[:, :, :290])
    layer.update(keys[:, :, 290:], values[:, :, 290:])
    expected = ops.hadamard_codes(keys, layer.thresholds, 2)
    assert torch.equal(layer.key_codes, expected) and torch.equal(layer.keys, keys)
    layer.crop(-7)
    assert torch.equal(layer.key_codes, expected[:, :, :293]) and layer.get_seq_length() == 293
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.key_codes, expected[[2, 0, 1], :, :293])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, keys[[0], :, :293])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.key_codes, expected[[0, 0], :, :293])


def test_beam_search_and_user_built_cache_work() -> None:
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama")).eval()
    input_ids, attention_mask = _prompt(batch=1, pad=0)
    expected = _generate(model, input_ids, attention_mask, num_beams=2)
    apply_adamas(model, AdamasConfig(token_budget=64))
    assert torch.equal(_generate(model, input_ids, attention_mask, num_beams=2), expected)
    apply_adamas(model, AdamasConfig(token_budget=8, dense_layers=1))
    beams = _generate(model, input_ids, attention_mask, num_beams=2)
    own_cache = _generate(model, input_ids, attention_mask, **cache_kwargs(AdamasCache(model.config)))
    assert beams.shape == own_cache.shape == (1, input_ids.shape[1] + 12)


def test_assisted_decoding_crops_the_code_cache() -> None:
    """Assisted generation crops rejected drafts; with a covering budget the output equals sdpa."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama")).eval()
    assistant = AutoModelForCausalLM.from_config(make_tiny_config("llama", num_hidden_layers=1)).eval()
    input_ids, attention_mask = _prompt(batch=1, pad=0)
    expected = _generate(model, input_ids, attention_mask)
    apply_adamas(model, AdamasConfig(token_budget=128))
    assert torch.equal(_generate(model, input_ids, attention_mask, assistant_model=assistant), expected)


def test_settings_survive_save_and_load(tmp_path) -> None:
    model = AutoModelForCausalLM.from_config(make_tiny_config("mistral"))
    settings = AdamasConfig(token_budget=96, bits=1, gqa_selection="shared_per_kv_group", recent_tokens=8)
    apply_adamas(model, settings)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="adamas")
    assert AdamasConfig.from_model_config(loaded.config) == settings


def test_training_mode_falls_back_to_dense(tiny_model, caplog) -> None:
    input_ids, _ = _prompt(batch=1, pad=0)
    cache, _ = prefill(tiny_model, input_ids)
    token = input_ids[:, -1:]
    expected = decode_step(tiny_model, cache, token)
    crop_cache(cache, input_ids.shape[1])
    apply_adamas(tiny_model, AdamasConfig(token_budget=4, dense_layers=0))
    tiny_model.train()
    with torch.no_grad():
        logits = tiny_model(input_ids=token, **cache_kwargs(cache)).logits[:, -1]
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_budget": 0}, "token_budget must be an integer >= 1"),
        ({"token_budget": 2.5}, "token_budget must be an integer >= 1"),
        ({"thresholds": [1.0, 0.0, 2.0]}, "strictly increasing"),
        ({"thresholds": [0.0, 1.0]}, "need 3 thresholds"),
        ({"bits": 3}, "bits must be 1 or 2"),
        ({"gqa_selection": "random"}, "gqa_selection must be one of"),
        ({"selector": "h2o"}, "selector must be one of"),
        ({"token_budget": 8, "sink_tokens": 4, "recent_tokens": 4}, "exceeds token_budget=8"),
    ],
)
def test_bad_config_values(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AdamasConfig(**kwargs)


def test_head_dim_not_a_power_of_two_is_rejected() -> None:
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama", head_dim=48, hidden_size=96))
    with pytest.raises(ValueError, match="LlamaForCausalLM has head_dim=48"):
        apply_adamas(model)
    model.set_attn_implementation("adamas")  # the from_pretrained route: checked at the first forward
    with pytest.raises(ValueError, match="head_dim=48, which is not a power of two"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_model_without_attention_interface_is_rejected() -> None:
    config = GPTNeoConfig(
        vocab_size=64, max_position_embeddings=64, hidden_size=64, num_layers=1, num_heads=2,
        attention_types=[[["global"], 1]], bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="GPTNeoForCausalLM does not route its attention"):
        apply_adamas(AutoModelForCausalLM.from_config(config))


def test_soft_capping_model_is_rejected() -> None:
    config = Gemma2Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    )  # fmt: skip
    with pytest.raises(ValueError, match="soft-capping"):
        apply_adamas(AutoModelForCausalLM.from_config(config))


def test_per_layer_thresholds_must_match_the_model() -> None:
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama"))
    with pytest.raises(ValueError, match="per-layer thresholds for 2 layers, but LlamaForCausalLM has 4"):
        apply_adamas(model, AdamasConfig(thresholds=[[-1.0, 0.0, 1.0]] * 2))


def test_package_exports() -> None:
    assert {"AdamasConfig", "AdamasCache", "apply_adamas"} <= set(hf_adamas.__all__)


@pytest.mark.slow
def test_real_model_exact_with_covering_budget(default_model_and_tokenizer) -> None:
    """On SmolLM2-135M, adamas with budget >= length generates sdpa's tokens."""
    from hf_common.demo import timed_chat_generation

    model, tokenizer = default_model_and_tokenizer
    prompt = "List three facts about the Moon."
    expected = timed_chat_generation(model, tokenizer, prompt, 24, "sdpa").text
    with attention_method(model, Method("adamas", AdamasConfig(token_budget=512))):
        assert timed_chat_generation(model, tokenizer, prompt, 24, "adamas").text == expected
