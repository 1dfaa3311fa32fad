"""The fused CPU ops against their PyTorch twins: selection index for index, attention to float tolerance."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.utils.cpp_extension
from helpers import assert_close

from hf_adamas import ops
from hf_adamas.ops import cpu, reference

HAS_TOOLCHAIN = shutil.which("c++") is not None and shutil.which("ninja") is not None
needs_extension = pytest.mark.skipif(not HAS_TOOLCHAIN, reason="no C++ compiler or ninja: the reference runs")


@needs_extension
def test_the_extension_builds_where_a_toolchain_exists() -> None:
    assert cpu.cpu_extension() is not None


def _case(batch, kv_heads, group, seq_len, head_dim, seed, shared, with_valid):
    generator = torch.Generator().manual_seed(seed)
    key = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator)
    query = torch.randn(batch, kv_heads * group, head_dim, generator=generator)
    thresholds = torch.tensor([-0.6, 0.0, 0.6])
    k_codes = reference.hadamard_codes(key, thresholds, 2)
    forced = torch.zeros(batch, seq_len, dtype=torch.bool)
    forced[:, -3:] = True
    forced[:, :2] = True
    valid = None
    if with_valid:  # left padding of different widths per row
        valid = torch.arange(seq_len)[None] >= torch.arange(batch)[:, None] * 3
    centroids = torch.randn(kv_heads, 4, generator=generator).sort(-1).values
    tables = {
        "asymmetric": reference.centroid_table(query, k_codes, centroids, 2),
        "l1": reference.distance_table(reference.hadamard_codes(query, thresholds, 2), k_codes, 2),
    }
    if shared:
        tables = {name: table.sum(2, keepdim=True) for name, table in tables.items()}
    return tables, k_codes, valid, forced


@needs_extension
@pytest.mark.parametrize("rule", ["asymmetric", "l1"])
@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "seq_len", "head_dim", "budget"),
    [
        (1, 3, 3, 300, 64, 16),
        (2, 2, 4, 129, 32, 7),
        (1, 1, 1, 5, 16, 8),  # budget above the sequence: -1 fill
        (3, 2, 2, 77, 128, 77),
        (1, 2, 5, 150, 64, 9),  # a group size read at run time (no compile-time specialization)
    ],
)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("with_valid", [False, True])
def test_fused_op_equals_the_reference(
    rule, batch, kv_heads, group, seq_len, head_dim, budget, shared, with_valid
):
    tables, k_codes, valid, forced = _case(
        batch, kv_heads, group, seq_len, head_dim, seq_len, shared, with_valid
    )
    largest = rule == "asymmetric"
    expected = reference.select_by_table(tables[rule], k_codes, budget, valid, forced, largest)
    got = cpu.select_by_table_cpu(tables[rule], k_codes, budget, valid, forced, largest)
    assert torch.equal(got, expected)


@needs_extension
def test_fused_op_reads_strided_codes_of_a_preallocated_cache() -> None:
    """Code caches are the filled prefix of a larger buffer: rows strided, bytes contiguous."""
    tables, k_codes, valid, forced = _case(1, 3, 3, 200, 64, 1, False, False)
    buffer = torch.zeros(1, 3, 256, k_codes.shape[-1], dtype=torch.uint8)
    buffer[:, :, :200] = k_codes
    view = buffer[:, :, :200]
    assert not view.is_contiguous()
    table = tables["asymmetric"]
    expected = reference.select_by_table(table, k_codes, 32, valid, forced, True)
    assert torch.equal(cpu.select_by_table_cpu(table, view, 32, valid, forced, True), expected)


def _skewed_table(kind: str, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-head table and codes whose scores stress the top-k's histogram pruning."""
    k_codes = torch.randint(0, 256, (1, 1, seq_len, 4), dtype=torch.uint8, generator=generator)
    table = torch.randn(1, 1, 1, 4, 256, generator=generator)
    if kind == "one outlier":  # every other score falls into the best or the worst bucket
        table[..., 0, int(k_codes[0, 0, 7, 0])] = 1e6
    elif kind == "all tied":
        table = torch.ones_like(table)
    elif kind == "few distinct":  # integer distances with many ties, as the L1 rule gives
        table = torch.randint(0, 3, table.shape, generator=generator).float()
    return table, k_codes


@needs_extension
@pytest.mark.parametrize("kind", ["gaussian", "one outlier", "all tied", "few distinct"])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("budget", [1, 40, 1999, 2000, 2500])
def test_pruned_topk_is_exact_on_skewed_scores(kind, largest, budget) -> None:
    generator = torch.Generator().manual_seed(budget)
    seq_len = 2000
    table, k_codes = _skewed_table(kind, seq_len, generator)
    if not largest:  # the L1 rule's scores are non-negative integers
        table = table.abs().round()
    forced = torch.zeros(1, seq_len, dtype=torch.bool)
    forced[:, -5:] = True
    valid = torch.rand(1, seq_len, generator=generator) > 0.1
    for mask in (None, valid):
        expected = reference.select_by_table(table, k_codes, budget, mask, forced, largest)
        assert torch.equal(cpu.select_by_table_cpu(table, k_codes, budget, mask, forced, largest), expected)


@needs_extension
def test_fused_op_rejects_bad_shapes() -> None:
    tables, k_codes, valid, forced = _case(1, 2, 2, 50, 32, 2, False, False)
    with pytest.raises(RuntimeError, match="forced must be"):
        cpu.select_by_table_cpu(tables["l1"], k_codes, 8, valid, forced[:, :10], False)
    with pytest.raises(RuntimeError, match="disagree in shape"):
        cpu.select_by_table_cpu(tables["l1"][:, :1], k_codes, 8, valid, forced, False)
    centroids = torch.tensor([[-1.0, -0.3, 0.3, 1.0]] * 2)
    with pytest.raises(RuntimeError, match="q_hat, codes and centroids disagree in shape"):
        cpu.select_by_centroids_cpu(torch.randn(1, 4, 32), k_codes, centroids[:1], 2, False, 8, valid, forced)


@needs_extension
@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "seq_len", "head_dim", "budget", "per_query_head"),
    [
        (1, 3, 3, 300, 64, 32, True),
        (2, 2, 4, 129, 32, 7, False),
        (1, 1, 1, 5, 16, 8, True),
        (3, 2, 2, 77, 128, 77, True),
    ],
)
def test_fused_attention_equals_the_reference(
    batch, kv_heads, group, seq_len, head_dim, budget, per_query_head
):
    generator = torch.Generator().manual_seed(seq_len)
    # The filled prefix of a preallocated cache: rows contiguous, heads and batch strided.
    key = torch.randn(batch, kv_heads, seq_len + 13, head_dim, generator=generator)[:, :, :seq_len]
    value = torch.randn(batch, kv_heads, seq_len + 13, head_dim, generator=generator)[:, :, :seq_len]
    query = torch.randn(batch, kv_heads * group, head_dim, generator=generator)
    rows = kv_heads * group if per_query_head else kv_heads
    indices = torch.randint(-1, seq_len, (batch, rows, budget), generator=generator)
    indices[0, 0] = -1  # a row with nothing selected gives zeros
    expected = reference.sparse_decode_attention(query, key, value, indices, head_dim**-0.5)
    got = cpu.sparse_decode_attention_cpu(query, key, value, indices, head_dim**-0.5)
    assert_close("sparse attention", expected, got, 1e-5)
    assert not got[0, 0].any()


@needs_extension
def test_fused_attention_rejects_an_index_past_the_cache() -> None:
    key = torch.randn(1, 1, 10, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.sparse_decode_attention_cpu(torch.randn(1, 1, 16), key, key, torch.tensor([[[3, 10]]]), 0.25)


def test_without_a_toolchain_the_reference_runs_and_says_so(monkeypatch, caplog) -> None:
    """A failed build (no compiler, no ninja) is said once and decoding falls back to the reference."""

    def no_ninja(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_ninja)
    cpu.cpu_extension.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="hf_common"):
            assert cpu.cpu_extension() is None
            _, k_codes, valid, forced = _case(1, 2, 2, 40, 32, 3, False, False)
            query = torch.randn(1, 4, 32)
            centroids = torch.tensor([[-1.0, -0.3, 0.3, 1.0]] * 2)
            got = ops.select_by_centroid_scores(query, k_codes, centroids, 2, False, 8, valid, forced)
        table = reference.centroid_table(query, k_codes, centroids, 2)
        assert torch.equal(got, reference.select_by_table(table, k_codes, 8, valid, forced, True))
        assert "could not be built (Ninja is required" in caplog.text
    finally:
        monkeypatch.undo()
        cpu.cpu_extension.cache_clear()


@needs_extension
@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "seq_len", "head_dim", "count", "budget", "per_query_head"),
    [
        (1, 3, 3, 300, 64, 64, 16, True),
        (2, 2, 4, 129, 32, 40, 7, False),
        (1, 1, 1, 5, 16, 8, 8, True),  # fewer candidates than the budget: -1 fill
        (3, 2, 2, 77, 128, 77, 20, True),
    ],
)
def test_fused_rescoring_equals_the_reference(
    batch, kv_heads, group, seq_len, head_dim, count, budget, per_query_head
):
    generator = torch.Generator().manual_seed(seq_len + count)
    key = torch.randn(batch, kv_heads, seq_len + 9, head_dim, generator=generator)[:, :, :seq_len]
    query = torch.randn(batch, kv_heads * group, head_dim, generator=generator)
    rows = kv_heads * group if per_query_head else kv_heads
    candidates = torch.rand(batch, rows, seq_len, generator=generator).argsort(-1)[..., :count]
    candidates[..., -2:] = -1  # empty slots, as an estimate leaves them
    forced = torch.zeros(batch, seq_len, dtype=torch.bool)
    forced[:, -1] = True
    candidates[..., 0] = seq_len - 1  # the forced current token is always a candidate
    for mask in (None, forced):
        expected = reference.rescore_selection(query, key, candidates, budget, mask)
        assert torch.equal(cpu.rescore_selection_cpu(query, key, candidates, budget, mask), expected)


@needs_extension
def test_fused_rescoring_rejects_a_candidate_past_the_cache() -> None:
    key = torch.randn(1, 1, 10, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.rescore_selection_cpu(torch.randn(1, 1, 16), key, torch.tensor([[[3, 10]]]), 1, None)


@needs_extension
@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "seq_len", "head_dim", "budget"),
    [(1, 3, 3, 300, 64, 16), (2, 2, 4, 129, 32, 7), (1, 1, 1, 5, 16, 8), (3, 2, 2, 77, 128, 77)],
)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("portable", [False, True])
def test_table_built_in_the_op_equals_the_reference(
    batch, kv_heads, group, seq_len, head_dim, budget, shared, bits, portable
):
    generator = torch.Generator().manual_seed(seq_len + bits)
    key = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator)
    query = torch.randn(batch, kv_heads * group, head_dim, generator=generator)
    thresholds = torch.tensor([-0.6, 0.0, 0.6]) if bits == 2 else torch.tensor([0.0])
    k_codes = reference.hadamard_codes(key, thresholds, bits)
    centroids = torch.randn(kv_heads, 2**bits, generator=generator).sort(-1).values
    forced = torch.zeros(batch, seq_len, dtype=torch.bool)
    forced[:, -2:] = True
    valid = torch.arange(seq_len)[None] >= torch.arange(batch)[:, None] * 3
    table = reference.centroid_table(query, k_codes, centroids, bits)
    if shared:
        table = table.sum(2, keepdim=True)
    expected = reference.select_by_table(table, k_codes, budget, valid, forced, True)
    q_hat = reference.hadamard_values(query)
    got = cpu.select_by_centroids_cpu(
        q_hat, k_codes, centroids, bits, shared, budget, valid, forced, portable
    )
    assert torch.equal(got, expected)


@needs_extension
@pytest.mark.parametrize("shape", [(1, 3, 7, 64), (2, 1, 5, 16), (4, 128), (1, 2, 1, 32)])
@pytest.mark.parametrize("bits", [1, 2])
def test_fused_codes_equal_the_reference(shape, bits) -> None:
    generator = torch.Generator().manual_seed(sum(shape) + bits)
    x = torch.randn(*shape, generator=generator)
    thresholds = torch.tensor([-0.5, 0.0, 0.5]) if bits == 2 else torch.tensor([0.0])
    # Values exactly on a threshold (not strictly greater: the lower code), and non-finite ones.
    x_hat = reference.hadamard_values(x)
    x_hat.view(-1)[:3] = thresholds[-1]
    x_hat.view(-1)[3:6] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    x_on_edges = x_hat @ reference.hadamard_matrix(shape[-1])  # H is its own inverse
    for values in (x, x_on_edges):
        assert torch.equal(
            cpu.hadamard_codes_cpu(values, thresholds, bits),
            reference.hadamard_codes(values, thresholds, bits),
        )


@needs_extension
def test_fused_codes_of_no_keys_have_the_reference_shape() -> None:
    empty = torch.randn(1, 3, 0, 64)
    thresholds = torch.tensor([-0.5, 0.0, 0.5])
    got = cpu.hadamard_codes_cpu(empty, thresholds, 2)
    assert got.shape == reference.hadamard_codes(empty, thresholds, 2).shape == (1, 3, 0, 16)


def _fast_scan_case(kind: str, seq_len: int, head_dim: int, group: int, seed: int):
    """Inputs where the fast scan's estimate is coarse or degenerate, for the asymmetric selection."""
    generator = torch.Generator().manual_seed(seed)
    kv_heads = 2
    key = torch.randn(1, kv_heads, seq_len, head_dim, generator=generator)
    q_hat = torch.randn(1, kv_heads * group, head_dim, generator=generator)
    if kind == "zero query":  # every estimate and every score equal: recency decides
        q_hat.zero_()
    elif kind == "repeated keys":  # long runs of equal codes: ties everywhere
        key = key[:, :, :7].repeat(1, 1, -(-seq_len // 7), 1)[:, :, :seq_len].contiguous()
    elif kind == "one dominant dimension":  # one nibble sets the scale, the others quantize to ~0
        q_hat[..., 5] *= 1e4
    elif kind == "tiny query":  # scores near float32 rounding of the centroid products
        q_hat *= 1e-30
    k_codes = reference.hadamard_codes(key, torch.tensor([-0.6, 0.0, 0.6]), 2)
    centroids = torch.randn(kv_heads, 4, generator=generator).sort(-1).values
    return q_hat, k_codes, centroids


@needs_extension
@pytest.mark.parametrize(
    "kind", ["random", "zero query", "repeated keys", "one dominant dimension", "tiny query"]
)
@pytest.mark.parametrize(
    ("seq_len", "head_dim", "group"), [(2085, 64, 3), (1100, 128, 8), (333, 16, 1), (700, 64, 5)]
)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("portable", [False, True])
def test_fast_scan_selection_is_exact_on_hard_inputs(
    kind, seq_len, head_dim, group, shared, portable
) -> None:
    """Across chunk (1024 keys) and block (32) edges, for budgets from 1 to the whole cache."""
    q_hat, k_codes, centroids = _fast_scan_case(kind, seq_len, head_dim, group, seed=seq_len)
    query = q_hat @ reference.hadamard_matrix(head_dim)  # centroid_table transforms its query itself
    table = reference.centroid_table(query, k_codes, centroids, 2)
    if shared:
        table = table.sum(2, keepdim=True)
    forced = torch.zeros(1, seq_len, dtype=torch.bool)
    forced[:, -1] = True
    for budget in (1, 2, 64, 300, seq_len):
        expected = reference.select_by_table(table, k_codes, budget, None, forced, True)
        q_hat_back = reference.hadamard_values(query)
        got = cpu.select_by_centroids_cpu(
            q_hat_back, k_codes, centroids, 2, shared, budget, None, forced, portable
        )
        assert torch.equal(got, expected), (kind, budget)
