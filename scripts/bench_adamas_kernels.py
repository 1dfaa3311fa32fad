"""Time the Adamas decode ops against dense SDPA decode and save JSON + a plot to runs/adamas/ (or --out).

On CUDA it runs the Triton kernels at Llama-3-8B decode shapes (32 query heads, 8 KV heads, head_dim 128,
bf16) over contexts 4K-128K and budgets 64-4096, and reports the achieved memory bandwidth of the distance
scan. On CPU it runs the PyTorch reference ops at small sizes, so the script stays testable anywhere.

Stages timed per decode step and layer: estimate (query codes + code distance against the cached key
codes), top-k (``torch.topk``), sparse attention over the selected positions, and dense SDPA for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_adamas import ops
from hf_common.outputs import RUNS_DIR, claim_outputs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths (default: 4K..128K on CUDA)")
    parser.add_argument("--budgets", type=int, nargs="+", help="token budgets (default: 64..4096 on CUDA)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, help="query heads (default: 32 on CUDA, 4 on CPU)")
    parser.add_argument("--kv-heads", type=int, help="KV heads (default: 8 on CUDA, 2 on CPU)")
    parser.add_argument("--head-dim", type=int, help="head_dim (default: 128 on CUDA, 64 on CPU)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="K/V/query dtype (default: bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--bits", type=int, choices=(1, 2), default=2)
    parser.add_argument(
        "--shared", action="store_true", help="one selection per KV group instead of per head"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed repetitions per measurement (default: 50 CUDA, 3 CPU)"
    )
    parser.add_argument("--out", type=Path, default=RUNS_DIR / "adamas", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace this script's files in --out")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    defaults = {
        "contexts": [4096, 8192, 16384, 32768, 65536, 131072] if cuda else [512, 2048],
        "budgets": [64, 256, 1024, 4096] if cuda else [64, 256],
        "q_heads": 32 if cuda else 4,
        "kv_heads": 8 if cuda else 2,
        "head_dim": 128 if cuda else 64,
        "dtype": "bf16" if cuda else "fp32",
        "repeats": 50 if cuda else 3,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on the GPU, after warm-up)."""
    fn()
    samples = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(samples)


def bench_context(args: argparse.Namespace, context: int, device: torch.device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    shape = (args.batch, args.kv_heads, context, args.head_dim)
    key, value = (
        torch.randn(shape, device=device, dtype=dtype),
        torch.randn(shape, device=device, dtype=dtype),
    )
    query = torch.randn(args.batch, args.q_heads, args.head_dim, device=device, dtype=dtype)
    thresholds = torch.tensor([-1.0, 0.0, 1.0] if args.bits == 2 else [0.0])
    k_codes = ops.hadamard_codes(key, thresholds, args.bits)  # what the key-code cache holds
    scaling = args.head_dim**-0.5
    forced = torch.zeros(args.batch, context, dtype=torch.bool, device=device)
    forced[:, -1] = True  # the current token

    def estimate() -> torch.Tensor:
        q_codes = ops.hadamard_codes(query, thresholds, args.bits)
        return ops.code_distance(q_codes, k_codes, args.bits, args.shared)

    q_codes = ops.hadamard_codes(query, thresholds, args.bits)
    distance = estimate()
    distance_ms = time_ms(lambda: ops.code_distance(q_codes, k_codes, args.bits, args.shared), args.repeats)
    distance_bytes = k_codes.numel() + q_codes.numel() + distance.numel() * distance.element_size()
    estimate_ms = time_ms(estimate, args.repeats)
    sdpa_ms = time_ms(
        lambda: F.scaled_dot_product_attention(
            query.unsqueeze(2), key, value, scale=scaling, enable_gqa=True
        ),
        args.repeats,
    )
    rows = []
    for budget in args.budgets:
        if budget >= context:
            continue
        indices = ops.select_topk(distance, budget, None, forced)
        topk_ms = time_ms(lambda b=budget: ops.select_topk(distance, b, None, forced), args.repeats)
        sparse_ms = time_ms(
            lambda i=indices: ops.sparse_decode_attention(query, key, value, i, scaling), args.repeats
        )
        total_ms = estimate_ms + topk_ms + sparse_ms
        rows.append(
            {
                "context": context,
                "budget": budget,
                "estimate_ms": estimate_ms,
                "distance_ms": distance_ms,
                "distance_gbps": distance_bytes / (distance_ms * 1e-3) / 1e9,
                "topk_ms": topk_ms,
                "sparse_attention_ms": sparse_ms,
                "adamas_total_ms": total_ms,
                "sdpa_ms": sdpa_ms,
                "speedup_vs_sdpa": sdpa_ms / total_ms,
            }
        )
        print(
            f"S={context:>6} B={budget:>4}  estimate {estimate_ms:7.3f} ms ({rows[-1]['distance_gbps']:6.1f} GB/s)"
            f"  top-k {topk_ms:7.3f}  sparse {sparse_ms:7.3f}  total {total_ms:7.3f}  sdpa {sdpa_ms:7.3f}"
            f"  x{sdpa_ms / total_ms:.2f}"
        )
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.5))
    contexts = sorted({r["context"] for r in rows})
    sdpa = {r["context"]: r["sdpa_ms"] for r in rows}
    ax_time.plot(contexts, [sdpa[c] for c in contexts], "k--o", label="SDPA (dense)")
    for budget in sorted({r["budget"] for r in rows}):
        sel = [r for r in rows if r["budget"] == budget]
        ax_time.plot(
            [r["context"] for r in sel], [r["adamas_total_ms"] for r in sel], "-o", label=f"Adamas B={budget}"
        )
    ax_time.set(
        xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per layer step", title=title
    )
    ax_time.legend(fontsize=8)
    bandwidth = {r["context"]: r["distance_gbps"] for r in rows}
    ax_bw.plot(contexts, [bandwidth[c] for c in contexts], "-o")
    ax_bw.set(
        xscale="log", xlabel="context (tokens)", ylabel="GB/s", title="code-distance achieved bandwidth"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (reference ops)"
    print(
        f"device: {name}; Hq={args.q_heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype} bits={args.bits}"
    )
    claim_outputs([args.out / "bench_kernels.json", args.out / "bench_kernels.png"], args.overwrite)
    rows = [row for context in args.contexts for row in bench_context(args, context, device)]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"device": name, "torch": torch.__version__, "config": config, "rows": rows}
    (args.out / "bench_kernels.json").write_text(json.dumps(report, indent=2))
    if rows:
        plot(
            rows,
            args.out / "bench_kernels.png",
            f"{name}, Hq={args.q_heads}/Hkv={args.kv_heads}, D={args.head_dim}",
        )
    print(f"saved {args.out / 'bench_kernels.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
