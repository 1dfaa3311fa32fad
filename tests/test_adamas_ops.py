"""Adamas ops: the PyTorch reference against brute force, then the Triton kernels against the reference.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set in conftest.py), so shapes stay small.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script
from helpers import assert_close

from hf_adamas import ops
from hf_adamas.ops.reference import (
    _hadamard_matrix,
    code_distance,
    hadamard_codes,
    hadamard_matrix,
    pack_codes,
    select_topk,
    sparse_decode_attention,
    unpack_codes,
)

try:
    from hf_adamas.ops.kernels import (
        code_distance_triton,
        hadamard_codes_triton,
        sparse_decode_attention_triton,
    )
    from hf_adamas.ops.kernels.sparse_attention import _launch_sparse_decode_attention

    TRITON_IMPORT_ERROR = None
except ImportError as error:  # e.g. no triton wheel for this platform
    TRITON_IMPORT_ERROR = error

requires_triton = pytest.mark.skipif(
    TRITON_IMPORT_ERROR is not None, reason=f"triton cannot be imported: {TRITON_IMPORT_ERROR}"
)

# Thresholds that make every code value occur for N(0, 1) inputs (the paper's ±10 rarely fires).
THRESHOLDS = {1: torch.tensor([0.0]), 2: torch.tensor([-1.0, 0.0, 1.0])}
# Transformed values closer than this to a threshold may round to either side between matmul orders.
NEAR_THRESHOLD = 1e-4


def brute_force_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes from a float64 transform and torch.bucketize, plus a mask of values too near a threshold."""
    dim = x.shape[-1]
    x_hat = x.double() @ hadamard_matrix(dim, x.device, torch.float64)
    t = THRESHOLDS[bits].double()
    codes = torch.bucketize(x_hat, t, right=False)  # number of thresholds strictly below x̂
    near = (x_hat.unsqueeze(-1) - t).abs().lt(NEAR_THRESHOLD).any(-1)
    return codes, near


def brute_force_distance(q_codes: torch.Tensor, k_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Per query head ``Σ_i |c_q,i - c_k,i|`` over unpacked codes, ``[B, Hq, S]``."""
    q, k = unpack_codes(q_codes, bits).long(), unpack_codes(k_codes, bits).long()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q.unsqueeze(2) - k).abs().sum(-1)


def dense_attention(query, key, value, scaling, mask=None):
    """SDPA over all positions with GQA via repeat_interleave; ``mask`` is bool ``[B, Hq, S]``."""
    group = query.shape[1] // key.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (key, value))
    attn_mask = None if mask is None else mask.unsqueeze(2)
    out = F.scaled_dot_product_attention(query.float().unsqueeze(2), k, v, attn_mask=attn_mask, scale=scaling)
    return out.squeeze(2)


# --------------------------------------------------------------------------- reference vs brute force


@pytest.mark.parametrize("dim", [16, 64, 128, 256])
def test_hadamard_matrix_is_orthonormal_sylvester(dim: int) -> None:
    h = hadamard_matrix(dim, "cpu")
    torch.testing.assert_close(h @ h.T, torch.eye(dim), atol=1e-6, rtol=0)
    i = torch.arange(dim)
    and_bits = i[:, None] & i[None, :]
    parity = sum((and_bits >> b) & 1 for b in range(int(math.log2(dim))))
    # Sylvester: H[i, j] = (-1)^popcount(i & j) / sqrt(dim).
    torch.testing.assert_close(h, (1 - 2 * (parity % 2)).float() / math.sqrt(dim))
    assert hadamard_matrix(dim, "cpu") is h, "the matrix is cached per (dim, device, dtype)"


def test_hadamard_matrix_cached_in_inference_mode_works_with_autograd() -> None:
    """A first call under inference_mode must not cache an inference tensor (a later forward with grad failed)."""
    _hadamard_matrix.cache_clear()
    with torch.inference_mode():
        hadamard_codes(torch.randn(2, 32), THRESHOLDS[2], 2)
    x = torch.randn(2, 32, requires_grad=True)
    assert hadamard_codes(x, THRESHOLDS[2], 2).shape == (2, 8)


def test_hadamard_preserves_dot_products() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(5, 128), torch.randn(7, 128)
    h = hadamard_matrix(128, "cpu")
    torch.testing.assert_close((q @ h) @ (k @ h).T, q @ k.T, atol=1e-4, rtol=1e-5)


def test_pack_layout_is_little_end_first() -> None:
    codes = torch.tensor([1, 2, 3, 0, 0, 0, 0, 3] + [0] * 8, dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [1 | 2 << 2 | 3 << 4, 3 << 6, 0, 0]
    bits1 = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1] + [0] * 6, dtype=torch.uint8)
    assert pack_codes(bits1, 1).tolist() == [1 | 1 << 7, 1 << 1]


@pytest.mark.parametrize("bits", [1, 2])
def test_unpack_inverts_pack(bits: int) -> None:
    torch.manual_seed(0)
    codes = torch.randint(0, 2**bits, (3, 4, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 4, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bits", [1, 2])
def test_codes_match_bucketize(bits: int, dim: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 33, dim) * 1.5
    packed = hadamard_codes(x, THRESHOLDS[bits], bits)
    assert packed.shape == (2, 3, 33, dim * bits // 8) and packed.dtype == torch.uint8
    expected, near = brute_force_codes(x, bits)
    got = unpack_codes(packed, bits).long()
    assert torch.equal(got[~near], expected[~near])
    assert set(got.unique().tolist()) == set(range(2**bits)), "every code value occurs"


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("group", [1, 3])
def test_distance_matches_brute_force(bits: int, group: int) -> None:
    torch.manual_seed(0)
    q = torch.randint(0, 256, (2, 2 * group, 32 * bits // 2), dtype=torch.uint8)
    k = torch.randint(0, 256, (2, 2, 45, 32 * bits // 2), dtype=torch.uint8)
    expected = brute_force_distance(q, k, bits)
    per_head = code_distance(q, k, bits, shared_per_kv_group=False)
    assert per_head.dtype == torch.int32 and torch.equal(per_head.long(), expected)
    shared = code_distance(q, k, bits, shared_per_kv_group=True)
    assert torch.equal(shared.long(), expected.unflatten(1, (2, group)).sum(2))


def test_distance_is_exact_l1_not_the_popcount_metric() -> None:
    # One dimension with codes 1 and 2: exact L1 is 1; the official kernel's popcount metric gives 3.
    q = pack_codes(torch.tensor([[[1] + [0] * 15]]), 2)
    k = pack_codes(torch.tensor([[[[2] + [0] * 15]]]), 2)
    assert code_distance(q, k, 2, shared_per_kv_group=False).item() == 1


def test_topk_prefers_small_distance_then_recent() -> None:
    torch.manual_seed(0)
    distance = torch.randint(0, 4, (2, 3, 50), dtype=torch.int32)
    chosen = select_topk(distance, 7, valid=None, forced=None)
    assert chosen.dtype == torch.int64 and chosen.shape == (2, 3, 7)
    for b in range(2):
        for h in range(3):
            ranked = sorted(range(50), key=lambda s, b=b, h=h: (distance[b, h, s].item(), -s))
            assert chosen[b, h].tolist() == sorted(ranked[:7])


def test_topk_ties_go_to_the_most_recent() -> None:
    distance = torch.zeros(1, 1, 10, dtype=torch.int32)
    assert select_topk(distance, 3, None, None).tolist() == [[[7, 8, 9]]]


def test_topk_forced_and_valid() -> None:
    distance = torch.arange(10, dtype=torch.int32).flip(0).view(1, 1, 10).repeat(1, 2, 1)  # position 9 best
    forced = torch.zeros(1, 10, dtype=torch.bool)
    forced[0, [0, 1]] = True
    valid = torch.ones(1, 10, dtype=torch.bool)
    valid[0, [1, 9]] = False  # padding wins over forcing
    assert select_topk(distance, 4, valid, forced).tolist() == [[[0, 6, 7, 8]] * 2]
    many_forced = torch.ones(1, 10, dtype=torch.bool)
    assert select_topk(distance, 3, None, many_forced).tolist() == [[[7, 8, 9]] * 2]


def test_topk_pads_with_minus_one() -> None:
    distance = torch.zeros(2, 1, 6, dtype=torch.int32)
    valid = torch.zeros(2, 6, dtype=torch.bool)
    valid[0, [2, 4]] = True
    valid[1] = True
    chosen = select_topk(distance, 4, valid, None)
    assert chosen.tolist() == [[[2, 4, -1, -1]], [[2, 3, 4, 5]]]
    assert select_topk(distance, 8, None, None)[0, 0].tolist() == [0, 1, 2, 3, 4, 5, -1, -1]


@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "shared"])
def test_attention_over_all_positions_is_dense(shared: bool) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 64), torch.randn(2, 2, 19, 64), torch.randn(2, 2, 19, 64)
    indices = torch.arange(19).flip(0).expand(2, 2 if shared else 6, 19).contiguous()  # order is irrelevant
    out = sparse_decode_attention(q, k, v, indices, 0.125)
    assert_close("all positions", dense_attention(q, k, v, 0.125), out, 1e-5)


@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "shared"])
def test_attention_over_subset_is_masked_dense(shared: bool) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 64), torch.randn(2, 2, 19, 64), torch.randn(2, 2, 19, 64)
    rows = 2 if shared else 6
    indices = torch.stack([torch.randperm(19)[:8] for _ in range(2 * rows)]).view(2, rows, 8)
    indices[..., ::3] = -1
    keep = torch.zeros(2, rows, 20, dtype=torch.bool)  # column 19 collects the skipped -1 entries
    keep.scatter_(2, indices.where(indices >= 0, 19), True)
    mask = keep[..., :19].repeat_interleave(6 // rows, dim=1)
    out = sparse_decode_attention(q, k, v, indices, 0.125)
    assert_close("subset", dense_attention(q, k, v, 0.125, mask), out, 1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "cache_prefix", "transposed"])
def test_position_gather_matches_torch_gather(layout: str) -> None:
    """The row-copy fast path (contiguous and cache-prefix views) and the fallback agree with gather."""
    from hf_adamas.ops.reference import gather_positions

    torch.manual_seed(0)
    full = torch.randn(2, 3, 40, 16)
    states = {
        "contiguous": full,
        "cache_prefix": full[:, :, :29],
        "transposed": full.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :29],
    }[layout]
    positions = torch.randint(0, 29, (2, 3, 7))
    expected = states.gather(2, positions.unsqueeze(-1).expand(-1, -1, -1, 16))
    assert torch.equal(gather_positions(states, positions), expected)


def test_attention_row_without_indices_is_zero() -> None:
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 5, 16)
    out = sparse_decode_attention(q, k, k, torch.full((1, 2, 3), -1), 0.25)
    assert torch.equal(out, torch.zeros_like(q))


def test_ops_dispatch_to_reference_on_cpu() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 64)
    assert torch.equal(ops.hadamard_codes(x, THRESHOLDS[2], 2), hadamard_codes(x, THRESHOLDS[2], 2))
    ops.force_reference(True)
    try:
        q, k = ops.hadamard_codes(x[:, :, 0], THRESHOLDS[2], 2), ops.hadamard_codes(x, THRESHOLDS[2], 2)
        assert torch.equal(ops.code_distance(q, k, 2, False), code_distance(q, k, 2, False))
    finally:
        ops.force_reference(False)


# --------------------------------------------------------------------------- bad input

IMPLEMENTATIONS = [pytest.param(hadamard_codes, id="reference")]
if TRITON_IMPORT_ERROR is None:
    IMPLEMENTATIONS.append(pytest.param(hadamard_codes_triton, id="triton"))


@pytest.mark.parametrize("codes_fn", IMPLEMENTATIONS)
def test_bad_code_inputs_raise(codes_fn) -> None:
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="48"):
        codes_fn(torch.randn(2, 48), THRESHOLDS[2], 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        codes_fn(x, torch.tensor([0.0, -1.0, 1.0]), 2)
    with pytest.raises(ValueError, match="need 3 thresholds"):
        codes_fn(x, torch.tensor([0.0]), 2)
    with pytest.raises(ValueError, match="bits must be 1 or 2"):
        codes_fn(x, THRESHOLDS[2], 3)


def test_bad_distance_and_attention_inputs_raise() -> None:
    q, k = torch.zeros(1, 4, 16, dtype=torch.uint8), torch.zeros(1, 3, 5, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        code_distance(q, k, 2, False)
    with pytest.raises(ValueError, match="uint8"):
        code_distance(q.float(), k, 2, False)
    with pytest.raises(ValueError, match="int64"):
        sparse_decode_attention(
            torch.randn(1, 2, 16), *[torch.randn(1, 1, 5, 16)] * 2, torch.zeros(1, 1, 3), 1.0
        )
    with pytest.raises(ValueError, match="budget"):
        select_topk(torch.zeros(1, 1, 4, dtype=torch.int32), 0, None, None)
    with pytest.raises(ValueError, match="forced must be a bool"):
        select_topk(torch.zeros(1, 1, 4, dtype=torch.int32), 2, None, torch.ones(1, 5, dtype=torch.bool))


# --------------------------------------------------------------------------- Triton vs reference

CODE_CASES = [
    # (B, H, S, D, bits, dtype)
    (1, 2, 37, 64, 2, torch.float32),
    (2, 3, 100, 128, 2, torch.bfloat16),
    (1, 4, 37, 128, 1, torch.float32),
    (2, 1, 5, 64, 1, torch.bfloat16),
    (1, 2, 9, 256, 2, torch.float16),
    (1, 1, 3, 16, 1, torch.float32),
]


@requires_triton
@pytest.mark.parametrize(
    ("B", "H", "S", "D", "bits", "dtype"),
    [pytest.param(*c, id="B{}-H{}-S{}-D{}-bits{}-{}".format(*c[:5], str(c[5])[6:])) for c in CODE_CASES],
)
def test_codes_kernel_matches_reference(B, H, S, D, bits, dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(B, H, S, D) * 1.5).to(dtype)
    ref = hadamard_codes(x, THRESHOLDS[bits], bits)
    tri = hadamard_codes_triton(x, THRESHOLDS[bits], bits)
    assert tri.shape == ref.shape and tri.dtype == torch.uint8
    _, near = brute_force_codes(x, bits)
    mismatch = unpack_codes(ref, bits) != unpack_codes(tri, bits)
    assert not (mismatch & ~near).any(), "codes differ away from a threshold"


DISTANCE_CASES = [
    # (B, Hq, Hkv, S, D, bits)
    (1, 4, 2, 37, 64, 2),
    (2, 8, 2, 100, 128, 2),
    (1, 6, 2, 300, 64, 1),
    (2, 2, 2, 1, 128, 1),
    (1, 3, 1, 37, 16, 1),
]


@requires_triton
@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize(
    ("B", "Hq", "Hkv", "S", "D", "bits"),
    [pytest.param(*c, id="B{}-Hq{}-Hkv{}-S{}-D{}-bits{}".format(*c)) for c in DISTANCE_CASES],
)
def test_distance_kernel_matches_reference(B, Hq, Hkv, S, D, bits, shared) -> None:
    torch.manual_seed(0)
    q = torch.randint(0, 256, (B, Hq, D * bits // 8), dtype=torch.uint8)
    k = torch.randint(0, 256, (B, Hkv, S, D * bits // 8), dtype=torch.uint8)
    ref = code_distance(q, k, bits, shared)
    tri = code_distance_triton(q, k, bits, shared)
    assert tri.dtype == torch.int32 and torch.equal(tri, ref)


@requires_triton
@pytest.mark.parametrize("num_bytes", [16, 2], ids=["words", "bytes"])
def test_distance_kernel_reads_strided_cache_views(num_bytes: int) -> None:
    torch.manual_seed(0)
    cache = torch.randint(0, 256, (1, 2, 64, num_bytes), dtype=torch.uint8)
    q = torch.randint(0, 256, (1, 4, num_bytes), dtype=torch.uint8)
    k = cache[:, :, :41]  # the filled prefix of a preallocated code cache
    assert torch.equal(code_distance_triton(q, k, 2, False), code_distance(q, k, 2, False))


ATTENTION_CASES = [
    # (B, Hq, Hkv, S, D, K, shared, dtype)
    (1, 4, 2, 37, 64, 20, False, torch.float32),
    (2, 8, 2, 100, 128, 53, True, torch.bfloat16),
    (1, 4, 4, 37, 64, 37, True, torch.float32),
    (2, 6, 2, 100, 64, 70, False, torch.bfloat16),
    (1, 6, 2, 45, 128, 33, True, torch.float32),
]


@requires_triton
@pytest.mark.parametrize(
    ("B", "Hq", "Hkv", "S", "D", "K", "shared", "dtype"),
    [
        pytest.param(
            *c,
            id="B{}-Hq{}-Hkv{}-S{}-D{}-K{}-{}-{}".format(
                *c[:6], "shared" if c[6] else "per-head", str(c[7])[6:]
            ),
        )
        for c in ATTENTION_CASES
    ],
)
def test_attention_kernel_matches_reference(B, Hq, Hkv, S, D, K, shared, dtype) -> None:
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(B, Hq, D).to(dtype),
        torch.randn(B, Hkv, S, D).to(dtype),
        torch.randn(B, Hkv, S, D).to(dtype),
    )
    rows = Hkv if shared else Hq
    indices = torch.stack([torch.randperm(S)[:K] for _ in range(B * rows)]).view(B, rows, K)
    indices[..., ::7] = -1
    indices[0, 0] = -1  # a row with nothing to attend to
    ref = sparse_decode_attention(q, k, v, indices, D**-0.5)
    ratio = 1e-3 if dtype == torch.float32 else 1e-2
    tri = sparse_decode_attention_triton(q, k, v, indices, D**-0.5)
    assert tri.dtype == dtype
    assert_close("o", ref, tri, ratio)
    for num_splits in (1, 3):
        split = _launch_sparse_decode_attention(q, k, v, indices, D**-0.5, Hq // Hkv, num_splits)
        assert_close(f"o ({num_splits} splits)", ref, split, ratio)


@requires_triton
def test_attention_kernel_reads_strided_views() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 64)[:, :, -1]  # the last token of a [B, H, T, D] projection
    cache = torch.randn(2, 2, 2, 64, 64)  # preallocated [B, Hkv, {k, v}, S_max, D] buffer
    k, v = cache[:, :, 0, :29], cache[:, :, 1, :29]
    indices = torch.stack([torch.randperm(29)[:11] for _ in range(4)]).view(2, 2, 11)
    ref = sparse_decode_attention(q, k, v, indices, 0.125)
    assert_close("o (strided)", ref, sparse_decode_attention_triton(q, k, v, indices, 0.125), 1e-3)


@pytest.mark.gpu
def test_ops_use_kernels_on_cuda() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 300, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k_codes, q_codes = ops.hadamard_codes(x, THRESHOLDS[2], 2), ops.hadamard_codes(q, THRESHOLDS[2], 2)
    ref_k, near = hadamard_codes(x, THRESHOLDS[2], 2), brute_force_codes(x, 2)[1]
    assert not ((unpack_codes(k_codes, 2) != unpack_codes(ref_k, 2)) & ~near).any()
    distance = ops.code_distance(q_codes, k_codes, 2, True)
    assert torch.equal(distance, code_distance(q_codes, k_codes, 2, True))
    indices = select_topk(distance, 64, None, None)
    out = ops.sparse_decode_attention(q, x, x, indices, 128**-0.5)
    assert_close("o (cuda)", sparse_decode_attention(q, x, x, indices, 128**-0.5), out, 1e-2)


@pytest.mark.slow
def test_profile_script_lists_operators_for_every_method(tmp_path: Path) -> None:
    profiler = load_script("profile_adamas_decode")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    args = [
        "--text",
        str(text),
        "--context",
        "320",
        "--budget",
        "64",
        "--steps",
        "1",
        "--rows",
        "3",
        "--output-dir",
        str(tmp_path),
    ]
    assert profiler.main(args) == 0
    report = (tmp_path / "decode_profile_320.md").read_text()
    for method in ("dense", "dense-static", "asymmetric-online", "adamas"):
        assert f"## {method}:" in report
    assert report.count("| `aten::") == 4 * 3
