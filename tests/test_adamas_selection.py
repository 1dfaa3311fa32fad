"""The selectors against loop-based brute force: what each one keeps for a decode query."""

from __future__ import annotations

import pytest
import torch

from hf_adamas import AdamasConfig
from hf_adamas.ops.reference import hadamard_codes, unpack_codes
from hf_adamas.selection import (
    forced_positions,
    select_adamas,
    select_adamas_asymmetric,
    select_oracle,
    select_quest,
    select_streaming_llm,
)


class _Layer(torch.nn.Module):
    layer_idx = 3


def _inputs(seed: int = 0, batch: int = 2, q_heads: int = 4, kv_heads: int = 2, length: int = 53):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, 64, generator=generator) * 3
    key = torch.randn(batch, kv_heads, length, 64, generator=generator) * 3
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :6] = False  # left padding on the second row
    return query, key, valid


def _select(select, settings, query, key, valid):
    return select(
        settings=settings,
        module=_Layer(),
        query=query,
        key=key,
        valid=valid,
        key_codes=lambda t: hadamard_codes(key, t, settings.bits),
    )


def _as_sets(indices: torch.Tensor) -> list[list[set[int]]]:
    return [[{int(i) for i in row if i >= 0} for row in head] for head in indices]


def test_streaming_llm_keeps_sinks_and_recent_window() -> None:
    query, key, valid = _inputs()
    settings = AdamasConfig(token_budget=12, sink_tokens=4, selector="streaming_llm")
    chosen = _as_sets(_select(select_streaming_llm, settings, query, key, valid))
    length = key.shape[2]
    assert chosen[0][0] == set(range(4)) | set(range(length - 8, length))
    assert chosen[1][1] == set(range(6, 10)) | set(range(length - 8, length))  # sinks skip the padding


@pytest.mark.parametrize("shared", [False, True])
def test_adamas_keeps_the_closest_codes(shared: bool) -> None:
    query, key, valid = _inputs(seed=1)
    settings = AdamasConfig(
        token_budget=10, thresholds=[-1.0, 0.0, 1.0], sink_tokens=2, rescore_candidates=0,
        gqa_selection="shared_per_kv_group" if shared else "per_query_head",
    )  # fmt: skip
    chosen = _as_sets(_select(select_adamas, settings, query, key, valid))
    thresholds = torch.tensor([-1.0, 0.0, 1.0])
    q_codes = unpack_codes(hadamard_codes(query, thresholds, 2), 2).long()
    k_codes = unpack_codes(hadamard_codes(key, thresholds, 2), 2).long()
    length, group = key.shape[2], 2
    for b in range(2):
        positions = [p for p in range(length) if valid[b, p]]
        sinks = set(positions[:2])
        for row in range(2 if shared else 4):
            heads = range(row * group, row * group + group) if shared else [row]
            kv = row if shared else row // group

            def distance(p, heads=heads, kv=kv, b=b):
                return sum(int((q_codes[b, h] - k_codes[b, kv, p]).abs().sum()) for h in heads)

            forced = sinks | {length - 1}
            ranked = sorted((p for p in positions if p not in forced), key=lambda p: (distance(p), -p))
            assert chosen[b][row] == forced | set(ranked[: 10 - len(forced)])


def test_quest_keeps_the_pages_with_the_highest_bound() -> None:
    query, key, valid = _inputs(seed=2)
    settings = AdamasConfig(token_budget=16, selector="quest", quest_page_size=4)
    chosen = _as_sets(_select(select_quest, settings, query, key, valid))
    length = key.shape[2]
    for b in range(2):
        for h in range(4):
            k = key[b, h // 2]
            bounds = {}
            for start in range(0, length, 4):
                members = [p for p in range(start, min(start + 4, length)) if valid[b, p]]
                if members:
                    lo, hi = k[members].amin(0), k[members].amax(0)
                    bounds[start] = float(torch.maximum(query[b, h] * lo, query[b, h] * hi).sum())
            current = (length - 1) // 4 * 4
            best = sorted((s for s in bounds if s != current), key=lambda s: -bounds[s])
            expected = set(range(current, length))
            for start in best:
                page = {p for p in range(start, start + 4) if valid[b, p]}
                if len(expected) + len(page) > 16:
                    break
                expected |= page
            assert expected <= chosen[b][h] and len(chosen[b][h]) == 16


@pytest.mark.parametrize("shared", [False, True])
def test_oracle_keeps_the_largest_exact_scores(shared: bool) -> None:
    query, key, valid = _inputs(seed=3)
    settings = AdamasConfig(
        token_budget=9, selector="oracle", recent_tokens=2,
        gqa_selection="shared_per_kv_group" if shared else "per_query_head",
    )  # fmt: skip
    chosen = _as_sets(_select(select_oracle, settings, query, key, valid))
    length, group = key.shape[2], 2
    for b in range(2):
        for row in range(2 if shared else 4):
            heads = range(row * group, row * group + group) if shared else [row]
            kv = row if shared else row // group
            score = {
                p: sum(float(query[b, h] @ key[b, kv, p]) for h in heads)
                for p in range(length)
                if valid[b, p]
            }
            forced = set(range(length - 3, length))
            ranked = sorted((p for p in score if p not in forced), key=lambda p: -score[p])
            assert chosen[b][row] == forced | set(ranked[: 9 - len(forced)])


@pytest.mark.parametrize("shared", [False, True])
def test_rescoring_keeps_the_best_exact_scores_among_the_candidates(shared: bool) -> None:
    query, key, valid = _inputs(seed=4)
    common = {
        "thresholds": [-1.0, 0.0, 1.0], "sink_tokens": 1,
        "gqa_selection": "shared_per_kv_group" if shared else "per_query_head",
    }  # fmt: skip
    candidates = _as_sets(_select(select_adamas, AdamasConfig(token_budget=24, **common), query, key, valid))
    chosen = _as_sets(
        _select(select_adamas, AdamasConfig(token_budget=8, rescore_factor=3, **common), query, key, valid)
    )
    length, group = key.shape[2], 2
    for b in range(2):
        first_valid = int(valid[b].long().argmax())
        forced = {first_valid, length - 1}
        for row in range(2 if shared else 4):
            heads = range(row * group, row * group + group) if shared else [row]
            kv = row if shared else row // group

            def score(p, heads=heads, kv=kv, b=b):
                return sum(float(query[b, h] @ key[b, kv, p]) for h in heads)

            ranked = sorted(candidates[b][row] - forced, key=lambda p: -score(p))
            assert chosen[b][row] == forced | set(ranked[: 8 - len(forced)])


@pytest.mark.parametrize("selector", [select_adamas, select_adamas_asymmetric])
def test_rescoring_every_key_is_the_oracle(selector) -> None:
    """With F * budget >= the cache length every key is a candidate: the exact top-k."""
    query, key, valid = _inputs(seed=5)
    oracle = _select(select_oracle, AdamasConfig(token_budget=7, selector="oracle"), query, key, valid)
    settings = AdamasConfig(token_budget=7, rescore_factor=8, thresholds=[-1.0, 0.0, 1.0])
    assert torch.equal(_select(selector, settings, query, key, valid), oracle)


@pytest.mark.parametrize("selector", [select_adamas, select_adamas_asymmetric])
@pytest.mark.parametrize(("budget", "factor", "floor", "pool"), [
    (8, 1, 24, 24),  # the floor alone: the same candidates as a factor of 3
    (8, 3, 16, 24),  # the larger of the two wins
    (8, 2, 24, 24),
])  # fmt: skip
def test_a_candidate_floor_rescores_like_the_factor_of_that_pool(
    selector, budget, factor, floor, pool
) -> None:
    query, key, valid = _inputs(seed=6)
    common = {"token_budget": budget, "thresholds": [-1.0, 0.0, 1.0], "sink_tokens": 1}
    settings = AdamasConfig(rescore_factor=factor, rescore_candidates=floor, **common)
    assert settings.candidate_pool == pool
    by_factor = AdamasConfig(rescore_factor=pool // budget, rescore_candidates=0, **common)
    assert torch.equal(
        _select(selector, settings, query, key, valid), _select(selector, by_factor, query, key, valid)
    )


@pytest.mark.parametrize("selector", [select_adamas, select_adamas_asymmetric])
def test_a_candidate_floor_at_or_below_the_budget_leaves_the_estimate_alone(selector) -> None:
    query, key, valid = _inputs(seed=7)
    common = {"token_budget": 12, "thresholds": [-1.0, 0.0, 1.0]}
    plain = _select(selector, AdamasConfig(rescore_candidates=0, **common), query, key, valid)
    exact = _select(
        selector, AdamasConfig(rescore_factor=4, rescore_candidates=0, **common), query, key, valid
    )
    assert not torch.equal(plain, exact)  # rescoring would change this selection
    for floor in (0, 5, 12):
        assert torch.equal(
            _select(selector, AdamasConfig(rescore_candidates=floor, **common), query, key, valid), plain
        )


def test_selectors_without_an_estimate_ignore_the_candidate_floor() -> None:
    query, key, valid = _inputs(seed=8)
    common = {"token_budget": 9, "selector": "oracle"}
    floored = AdamasConfig(rescore_candidates=64, **common)
    assert torch.equal(
        _select(select_oracle, floored, query, key, valid),
        _select(select_oracle, AdamasConfig(**common), query, key, valid),
    )


def test_rescoring_needs_a_code_estimate() -> None:
    with pytest.raises(ValueError, match="has none"):
        AdamasConfig(selector="quest", rescore_factor=2)
    with pytest.raises(ValueError, match="rescore_factor"):
        AdamasConfig(rescore_factor=0)
    with pytest.raises(ValueError, match="rescore_candidates"):
        AdamasConfig(rescore_candidates=-1)


@pytest.mark.parametrize(("sinks", "recent", "length"), [(0, 0, 10), (3, 2, 10), (4, 20, 10), (10, 0, 6)])
def test_forced_positions_without_a_mask_equal_those_of_an_all_valid_one(sinks, recent, length) -> None:
    settings = AdamasConfig(token_budget=64, sink_tokens=sinks, recent_tokens=recent)
    every = torch.ones(2, length, dtype=torch.bool)
    forced = forced_positions(settings, None, 2, length, "cpu")
    assert torch.equal(forced, forced_positions(settings, every, 2, length, "cpu"))
    expected = {p for p in range(length) if p < sinks or p >= length - 1 - recent}
    assert set(forced[0].nonzero().flatten().tolist()) == expected
