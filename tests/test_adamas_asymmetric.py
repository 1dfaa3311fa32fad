"""The asymmetric selector and its code books: the fast LUT scoring against a loop that reads like the
definition, online and offline calibration, the forced-token check for every selector, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_config
from transformers import AutoModelForCausalLM

from hf_adamas import AdamasCache, AdamasConfig, apply_adamas
from hf_adamas.calibration import OnlineCalibratedLayer
from hf_adamas.codebook import code_book, threshold_centroids
from hf_adamas.config import check_model_config
from hf_adamas.ops.reference import centroid_scores, hadamard_codes, hadamard_matrix, unpack_codes
from hf_adamas.selection import select_adamas_asymmetric
from hf_common.compat import cache_kwargs


def spec_scores(query, k_codes, centroids, bits, shared):
    """The definition, one term at a time: Σ_i q̂_i · centroid[kv head, code of key j in dimension i]."""
    q_hat = query.float() @ hadamard_matrix(query.shape[-1])
    codes = unpack_codes(k_codes, bits).long()
    bsz, q_heads, dim = query.shape
    kv_heads, length = k_codes.shape[1], k_codes.shape[2]
    group = q_heads // kv_heads
    scores = torch.zeros(bsz, q_heads, length)
    for b in range(bsz):
        for h in range(q_heads):
            for j in range(length):
                scores[b, h, j] = sum(
                    q_hat[b, h, i] * centroids[h // group, codes[b, h // group, j, i]] for i in range(dim)
                )
    if shared:
        scores = scores.view(bsz, kv_heads, group, length).sum(2)
    return scores


def _inputs(seed=0, bits=2, length=29):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 4, 64, generator=generator) * 2
    key = torch.randn(2, 2, length, 64, generator=generator) * 2
    thresholds = torch.tensor([-1.0, 0.0, 1.0] if bits == 2 else [0.0])
    centroids = torch.randn(2, 2**bits, generator=generator)
    return query, key, thresholds, centroids


try:
    from hf_adamas.ops.kernels import centroid_scores_triton

    IMPLEMENTATIONS = [centroid_scores, pytest.param(centroid_scores_triton, id="triton")]
except ImportError:  # no triton wheel for this platform: the reference alone
    IMPLEMENTATIONS = [centroid_scores]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_centroid_scores_match_the_definition(implementation, bits: int, shared: bool) -> None:
    """The LUT scoring (PyTorch, and the Triton kernel under TRITON_INTERPRET=1) against the loop."""
    query, key, thresholds, centroids = _inputs(bits=bits)
    k_codes = hadamard_codes(key, thresholds, bits)
    expected = spec_scores(query, k_codes, centroids, bits, shared)
    torch.testing.assert_close(
        implementation(query, k_codes, centroids, bits, shared), expected, atol=1e-4, rtol=1e-5
    )
    # the filled prefix of a preallocated cache is a strided view: read in place, same result
    buffer = torch.zeros(2, 2, 40, k_codes.shape[-1], dtype=torch.uint8)
    buffer[:, :, :29] = k_codes
    torch.testing.assert_close(
        implementation(query, buffer[:, :, :29], centroids, bits, shared), expected, atol=1e-4, rtol=1e-5
    )


def test_centroid_scores_estimate_the_dot_product() -> None:
    """With fine centroids from the data, the score tracks q·k better than chance would."""
    query, key, _, _ = _inputs(length=200)
    thresholds, centroids = code_book(key, 2)
    scores = centroid_scores(query, hadamard_codes(key, thresholds, 2), centroids, 2, False)
    exact = torch.einsum("bhd,bhsd->bhs", query, key.repeat_interleave(2, 1))
    correlation = torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1]
    assert correlation > 0.8


def test_centroid_scores_reject_bad_shapes() -> None:
    query, key, thresholds, centroids = _inputs()
    k_codes = hadamard_codes(key, thresholds, 2)
    with pytest.raises(ValueError, match="centroids must be"):
        centroid_scores(query, k_codes, centroids[:, :3], 2, False)
    with pytest.raises(ValueError, match="float query"):
        centroid_scores(query.long(), k_codes, centroids, 2, False)
    with pytest.raises(ValueError, match="must agree"):
        centroid_scores(query[..., :32], k_codes, centroids, 2, False)


@pytest.mark.parametrize("shared", [False, True])
def test_asymmetric_selector_keeps_the_highest_scores(shared: bool) -> None:
    query, key, _, _ = _inputs(seed=3)
    valid = torch.ones(2, key.shape[2], dtype=torch.bool)
    valid[1, :5] = False
    settings = AdamasConfig(
        token_budget=9, thresholds=[-1.0, 0.0, 1.0], centroids=[[[-2, -0.5, 0.5, 2], [-1, -0.2, 0.3, 1.5]]] * 4,
        selector="adamas_asymmetric", sink_tokens=2, rescore_candidates=0,
        gqa_selection="shared_per_kv_group" if shared else "per_query_head",
    )  # fmt: skip
    module = torch.nn.Module()
    module.layer_idx = 3
    chosen = select_adamas_asymmetric(
        settings=settings, module=module, query=query, key=key, valid=valid,
        key_codes=lambda t: hadamard_codes(key, t, 2),
    )  # fmt: skip
    centroids = torch.tensor(settings.centroids[3])
    scores = spec_scores(query, hadamard_codes(key, torch.tensor([-1.0, 0.0, 1.0]), 2), centroids, 2, shared)
    length = key.shape[2]
    for b in range(2):
        positions = [p for p in range(length) if valid[b, p]]
        forced = set(positions[:2]) | {length - 1}
        for row in range(scores.shape[1]):
            ranked = sorted(
                (p for p in positions if p not in forced), key=lambda p: (-float(scores[b, row, p]), -p)
            )
            assert {int(i) for i in chosen[b, row]} == forced | set(ranked[: 9 - len(forced)])


def test_code_book_is_quartiles_and_bucket_means() -> None:
    _, key, _, _ = _inputs(length=100)
    thresholds, centroids = code_book(key, 2)
    values = key @ hadamard_matrix(64)
    torch.testing.assert_close(thresholds, torch.quantile(values.flatten(), torch.tensor([0.25, 0.5, 0.75])))
    for head in range(2):
        head_values = values[:, head].flatten()
        codes = (head_values[:, None] > thresholds).sum(-1)
        for level in range(4):
            torch.testing.assert_close(centroids[head, level], head_values[codes == level].mean())


def test_threshold_centroids_of_the_paper_thresholds() -> None:
    assert threshold_centroids(torch.tensor([-10.0, 0.0, 10.0]), 2).tolist() == [[-15.0, -5.0, 5.0, 15.0]] * 2
    assert threshold_centroids(torch.tensor([0.0]), 1).tolist() == [[-0.5, 0.5]]


def test_online_layer_calibrates_on_its_first_keys_and_forgets_them_when_emptied() -> None:
    generator = torch.Generator().manual_seed(5)
    prefill = torch.randn(1, 2, 50, 64, generator=generator)
    layer = OnlineCalibratedLayer(bits=2)
    layer.update(prefill, prefill)
    thresholds, centroids = code_book(prefill, 2)
    assert torch.equal(layer.thresholds, thresholds) and torch.equal(layer.centroids, centroids)
    step = torch.randn(1, 2, 1, 64, generator=generator) * 5
    layer.update(step, step)
    assert torch.equal(layer.thresholds, thresholds)  # later keys are encoded with the prefill's book
    assert torch.equal(layer.key_codes, hadamard_codes(torch.cat([prefill, step], 2), thresholds, 2))
    layer.crop(-51)
    assert layer.centroids is None
    layer.update(step.expand(1, 2, 20, 64) + torch.randn(1, 2, 20, 64, generator=generator), step)
    assert not torch.equal(layer.thresholds, thresholds)


@pytest.mark.parametrize(
    "change",
    [
        lambda layer: layer.crop(-30),  # cuts into the prefill keys the book is made from
        lambda layer: layer.batch_select_indices(torch.tensor([1])),  # drops a row it pools over
    ],
    ids=["crop", "batch_select"],
)
def test_online_book_is_that_of_the_prefill_whenever_it_is_first_read(change) -> None:
    """The book is made lazily (with the codes); a change to the stored prefill first makes it."""
    generator = torch.Generator().manual_seed(6)
    prefill = torch.randn(2, 2, 50, 64, generator=generator)
    layer = OnlineCalibratedLayer(bits=2)
    layer.update(prefill, prefill)
    assert layer._code_book is None  # nothing computed until asked for
    change(layer)
    later = torch.randn(layer.keys.shape[0], 2, 40, 64, generator=generator) * 3
    layer.update(later, later)
    thresholds, centroids = code_book(prefill, 2)
    assert torch.equal(layer.thresholds, thresholds) and torch.equal(layer.centroids, centroids)


@pytest.mark.parametrize("calibration", ["fixed", "online"])
def test_asymmetric_generate_equals_sdpa_when_the_budget_covers_it(calibration: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("qwen2")).eval()
    input_ids = torch.randint(3, 128, (2, 30))
    expected = model.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False)
    settings = AdamasConfig(token_budget=64, selector="adamas_asymmetric", calibration=calibration)
    apply_adamas(model, settings)
    assert torch.equal(model.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False), expected)


def test_online_calibration_fills_online_layers_during_generate() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama")).eval()
    apply_adamas(
        model,
        AdamasConfig(token_budget=8, dense_layers=1, selector="adamas_asymmetric", calibration="online"),
    )
    input_ids = torch.randint(3, 128, (1, 40))
    cache = AdamasCache(model.config)  # built with fixed layers: the hook swaps them for online ones
    model(input_ids=input_ids, use_cache=True, **cache_kwargs(cache))
    output = model(input_ids=input_ids[:, -1:], use_cache=True, **cache_kwargs(cache))
    layer = cache.layers[1]
    assert isinstance(layer, OnlineCalibratedLayer) and layer.get_seq_length() == 41
    thresholds, _ = code_book(layer.keys[:, :, :40], 2)  # the prompt's keys, not the decoded one
    torch.testing.assert_close(layer.thresholds, thresholds)
    assert torch.isfinite(output.logits).all()


@pytest.mark.parametrize("selector", ["adamas", "adamas_asymmetric", "streaming_llm", "quest", "oracle"])
def test_every_selector_refuses_more_forced_tokens_than_the_budget(selector: str) -> None:
    with pytest.raises(ValueError, match="exceeds token_budget=4"):
        AdamasConfig(token_budget=4, sink_tokens=4, selector=selector)


def test_bad_centroids_and_calibration_are_named() -> None:
    with pytest.raises(ValueError, match="4 finite centroids"):
        AdamasConfig(centroids=[[[0.0, 1.0, 2.0]]])
    with pytest.raises(ValueError, match="calibration must be one of"):
        AdamasConfig(calibration="prefill")
    config = make_tiny_config("llama")
    with pytest.raises(ValueError, match="recalibrate"):
        check_model_config(config, AdamasConfig(centroids=[[[0, 1, 2, 3]] * 2] * 2), "TinyLlama")
    assert (
        AdamasConfig.from_dict(
            AdamasConfig(selector="adamas_asymmetric", calibration="online").to_dict()
        ).calibration
        == "online"
    )


def test_default_is_asymmetric_with_online_calibration_and_given_code_books_stay_fixed() -> None:
    """The default was chosen on the harder passkey and perplexity (results/adamas/hard/README.md)."""
    default = AdamasConfig()
    assert (default.selector, default.calibration) == ("adamas_asymmetric", "online")
    assert AdamasConfig(thresholds=[-1.0, 0.0, 1.0]).calibration == "fixed"
    saved_before_the_option = {
        k: v for k, v in AdamasConfig(selector="adamas").to_dict().items() if k != "calibration"
    }
    assert (
        AdamasConfig.from_dict(saved_before_the_option).calibration == "fixed"
    )  # the paper's thresholds kept
    assert AdamasConfig.from_dict(default.to_dict()).calibration == "online"
