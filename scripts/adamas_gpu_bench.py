"""Adamas decode self-attention on one GPU against dense decode, at Llama-3-8B shapes; JSON + Markdown + PNG.

One decode step of one layer: 32 query heads over 8 KV heads, head_dim 128, bf16, batch 1, contexts 4K-128K,
budgets 64-4096. Adamas is timed through the package's dispatch (`hf_adamas.ops`, the Triton kernels on CUDA)
in three stages: estimate (Hadamard codes of the query + code distance over the packed key codes), top-k
(`ops.select_topk`, current token forced) and sparse attention; and as the whole pipeline. Dense baselines:
`torch.nn.functional.scaled_dot_product_attention` over the full cache (GQA-native, and over K/V expanded
to the query heads, transformers' fallback when sdpa cannot take GQA), and flash-attn's
`flash_attn_with_kvcache` when importable.
Both selection modes run: one selection per query head (the default) and one per KV group.

Timing: CUDA events, warm-up, median of ``--repeats`` calls, L2 flushed before each call (a decode step
reads each layer's cache cold). The estimate's achieved bandwidth is the packed key codes read per second,
against the device's copy bandwidth measured in the same run. A time guard stops adding points when
``--time-limit-s`` is near and records what it skipped. Without CUDA the script refuses to run, except
``--device cpu --tiny``: the same code path on tiny shapes through the PyTorch reference ops (a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_adamas import ops
from hf_common.outputs import RUNS_DIR, OutputPathError, add_output_arguments, claim_outputs
from hf_common.reporting import command_line, markdown_table, plot_series, write_report

STEM = "adamas_gpu_bench"
FULL = {
    "contexts": [4096, 8192, 16384, 32768, 65536, 131072],
    "budgets": [64, 128, 256, 512, 1024, 2048, 4096],
    "q_heads": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "dtype": torch.bfloat16,
}
TINY = {
    "contexts": [256, 512],
    "budgets": [16, 64],
    "q_heads": 4,
    "kv_heads": 2,
    "head_dim": 64,
    "dtype": torch.float32,
}
THRESHOLDS = torch.tensor([-0.6745, 0.0, 0.6745])
"""Quartiles of N(0, 1): random keys' Hadamard values fall equally into the four 2-bit buckets."""
SELECTIONS = {"per_query_head": False, "shared_per_kv_group": True}
STAGES = ("estimate_ms", "topk_ms", "attention_ms")
FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamas_gpu_bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu needs --tiny.")
    parser.add_argument(
        "--tiny", action="store_true", help="Tiny shapes (4/2 heads, D=64, fp32): a smoke run."
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", help="Context lengths (default 4K..128K; tiny: 256 512)."
    )
    parser.add_argument(
        "--budgets", type=int, nargs="+", help="Token budgets (default 64..4096; tiny: 16 64)."
    )
    parser.add_argument("--repeats", type=int, default=50, help="Timed calls per measurement (median).")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed calls before each measurement.")
    parser.add_argument(
        "--time-limit-s",
        type=float,
        default=420.0,
        help="Stop adding points when this much wall time is near.",
    )
    add_output_arguments(parser, RUNS_DIR / "adamas" / "gpu")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what cannot run, before any tensor is allocated."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "CUDA is not available on this machine. This benchmark times the Triton kernels on a GPU; run it "
            "where torch.cuda.is_available() is True, or pass --device cpu --tiny for a smoke run of the same "
            "code path on tiny shapes (PyTorch reference ops)."
        )
    if args.device == "cpu" and not args.tiny:
        parser.error(
            "--device cpu runs only with --tiny: Llama-3-8B shapes on the reference ops would take hours"
        )
    for name in ("repeats", "warmup"):
        if getattr(args, name) < (1 if name == "repeats" else 0):
            parser.error(f"--{name} is too small: {getattr(args, name)}")
    for name in ("contexts", "budgets"):
        values = getattr(args, name) or []
        if any(value < 2 for value in values):
            parser.error(f"--{name} must be at least 2 tokens each, got {values}")


class Timer:
    """Median time of a callable: CUDA events around each call (L2 flushed first), or perf_counter on CPU."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.flush = (
            torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None
        )

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.repeats):
            if self.flush is None:
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
                continue
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples)


def copy_bandwidth_gbps(timer: Timer, device: torch.device, tiny: bool) -> float:
    """Device memory bandwidth from a large device-to-device copy (bytes read + written per second)."""
    source = torch.empty((4 if tiny else 1024) * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    milliseconds = timer(lambda: target.copy_(source))
    return 2 * source.numel() / (milliseconds * 1e-3) / 1e9


def flash_attention() -> Callable | None:
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def dense_times(
    timer: Timer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> dict[str, float]:
    """Dense decode baselines over the full cache, in ms."""
    group = query.shape[1] // key.shape[1]
    q = query[:, :, None]  # [B, Hq, 1, D]
    times = {"sdpa_ms": timer(lambda: F.scaled_dot_product_attention(q, key, value, enable_gqa=True))}
    expanded_key, expanded_value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    times["sdpa_repeat_kv_ms"] = timer(
        lambda: F.scaled_dot_product_attention(q, expanded_key, expanded_value)
    )
    flash = flash_attention()
    if flash is not None and query.is_cuda:
        key_cache, value_cache = key.transpose(1, 2).contiguous(), value.transpose(1, 2).contiguous()
        q_flash = query[:, None]  # [B, 1, Hq, D]
        times["flash_attn_ms"] = timer(lambda: flash(q_flash, key_cache, value_cache))
    return times


def adamas_times(
    timer: Timer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    budget: int,
    shared: bool,
) -> dict[str, float]:
    """The three Adamas stages and the whole pipeline, in ms, through `hf_adamas.ops`."""
    forced = torch.zeros(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
    forced[:, -1] = True  # the current token
    scaling = query.shape[-1] ** -0.5

    def estimate() -> torch.Tensor:
        return ops.code_distance(ops.hadamard_codes(query, THRESHOLDS, 2), key_codes, 2, shared)

    def pipeline() -> torch.Tensor:
        indices = ops.select_topk(estimate(), budget, None, forced)
        return ops.sparse_decode_attention(query, key, value, indices, scaling)

    distance = estimate()
    indices = ops.select_topk(distance, budget, None, forced)
    times = {
        "estimate_ms": timer(estimate),
        "topk_ms": timer(lambda: ops.select_topk(distance, budget, None, forced)),
        "attention_ms": timer(lambda: ops.sparse_decode_attention(query, key, value, indices, scaling)),
        "adamas_ms": timer(pipeline),
    }
    times["code_bytes"] = key_codes.numel() * key_codes.element_size()
    times["distance_bytes"] = distance.numel() * distance.element_size()
    return times


def run(args: argparse.Namespace, shapes: dict, device: torch.device) -> dict:
    """Every (context, budget, selection) point the time limit allows; returns rows, skipped points, peak."""
    started = time.monotonic()
    timer = Timer(device, args.repeats, args.warmup)
    peak = copy_bandwidth_gbps(timer, device, args.tiny)
    print(f"copy bandwidth: {peak:.0f} GB/s", flush=True)
    rows, skipped, slowest_point_s = [], [], 0.0
    generator = torch.Generator(device=device).manual_seed(0)
    for context in args.contexts:
        points = [(b, s) for b in args.budgets if b < context for s in SELECTIONS]
        shape = (1, shapes["kv_heads"], context, shapes["head_dim"])
        if time.monotonic() - started + 2 * slowest_point_s > args.time_limit_s:
            skipped += [{"context": context, "budget": b, "selection": s} for b, s in points]
            continue
        key, value = (
            torch.randn(shape, generator=generator, device=device).to(shapes["dtype"]) for _ in "kv"
        )
        query = torch.randn(1, shapes["q_heads"], shapes["head_dim"], generator=generator, device=device)
        query = query.to(shapes["dtype"])
        key_codes = ops.hadamard_codes(key, THRESHOLDS, 2)  # what the code cache holds
        dense = dense_times(timer, query, key, value)
        fastest_dense = min(dense.values())
        for budget, selection in points:
            point_start = time.monotonic()
            if point_start - started + 2 * slowest_point_s > args.time_limit_s:
                skipped.append({"context": context, "budget": budget, "selection": selection})
                continue
            times = adamas_times(timer, query, key, value, key_codes, budget, SELECTIONS[selection])
            code_bytes, distance_bytes = times.pop("code_bytes"), times.pop("distance_bytes")
            row = {"context": context, "budget": budget, "selection": selection, **times, **dense}
            row["estimate_code_gbps"] = code_bytes / (times["estimate_ms"] * 1e-3) / 1e9
            row["estimate_code_fraction_of_copy"] = row["estimate_code_gbps"] / peak
            row["estimate_all_bytes_gbps"] = (
                (code_bytes + distance_bytes) / (times["estimate_ms"] * 1e-3) / 1e9
            )
            row["speedup_vs_sdpa"] = dense["sdpa_ms"] / times["adamas_ms"]
            row["speedup_vs_fastest_dense"] = fastest_dense / times["adamas_ms"]
            rows.append(row)
            slowest_point_s = max(slowest_point_s, time.monotonic() - point_start)
            print(
                f"S={context:>6} B={budget:>4} {selection:<19} estimate {times['estimate_ms']:.4f} "
                f"({row['estimate_code_fraction_of_copy']:.0%} of copy)  top-k {times['topk_ms']:.4f}  "
                f"attention {times['attention_ms']:.4f}  adamas {times['adamas_ms']:.4f} ms  "
                f"sdpa {dense['sdpa_ms']:.4f} ms  x{row['speedup_vs_sdpa']:.2f}",
                flush=True,
            )
        del key, value, query, key_codes
    return {
        "rows": rows,
        "skipped": skipped,
        "copy_bandwidth_gbps": peak,
        "seconds": time.monotonic() - started,
    }


def plots(output_dir: Path, rows: list[dict], title: str) -> list[Path]:
    """Time vs context per budget (with the dense baselines), and speed-up over SDPA vs context."""
    mine = [row for row in rows if row["selection"] == "per_query_head"]
    contexts = sorted({row["context"] for row in mine})
    first = {context: next(row for row in mine if row["context"] == context) for context in contexts}
    timing, speedup = {}, {}
    for budget in sorted({row["budget"] for row in mine}):
        points = [row for row in mine if row["budget"] == budget]
        xs = [row["context"] for row in points]
        timing[f"Adamas B={budget}"] = (xs, [row["adamas_ms"] for row in points])
        speedup[f"B={budget}"] = (xs, [row["speedup_vs_sdpa"] for row in points])
    for name in ("sdpa_ms", "sdpa_repeat_kv_ms", "flash_attn_ms"):
        if contexts and name in first[contexts[0]]:
            timing[name.removesuffix("_ms")] = (contexts, [first[c][name] for c in contexts])
    return [
        plot_series(
            output_dir / f"{STEM}_time.png",
            timing,
            title,
            "context (tokens)",
            "ms per layer",
            log_x=True,
            log_y=True,
        ),
        plot_series(
            output_dir / f"{STEM}_speedup.png",
            speedup,
            "Adamas (per query head) speed-up over SDPA decode",
            "context (tokens)",
            "SDPA time / Adamas time",
            baselines={"equal time": 1.0},
            log_x=True,
        ),
    ]


def report_body(result: dict, shapes: dict, kernels: str) -> str:
    columns = ["context", "budget", "selection", *STAGES, "adamas_ms", "sdpa_ms", "sdpa_repeat_kv_ms"]
    columns += ["flash_attn_ms"] if any("flash_attn_ms" in row for row in result["rows"]) else []
    columns += [
        "speedup_vs_sdpa",
        "speedup_vs_fastest_dense",
        "estimate_code_gbps",
        "estimate_code_fraction_of_copy",
    ]
    skipped = result["skipped"]
    return (
        f"Shapes: {shapes['q_heads']} query heads over {shapes['kv_heads']} KV heads, head_dim {shapes['head_dim']}, "
        f"{str(shapes['dtype']).removeprefix('torch.')}, batch 1, 2-bit codes. Ops: {kernels}. One layer's decode "
        "step; times are medians of CUDA-event-timed calls with L2 flushed before each (perf_counter on CPU). "
        "`adamas_ms` is the whole pipeline timed as one; the stages are timed alone. Bandwidth: packed key codes "
        f"read per second by the estimate; device copy bandwidth measured in this run: "
        f"{result['copy_bandwidth_gbps']:.0f} GB/s. Wall time {result['seconds']:.0f} s.\n\n"
        + markdown_table(result["rows"], columns)
        + (
            f"\nSkipped by the time guard: {len(skipped)} points: {skipped}\n"
            if skipped
            else "\nNothing skipped.\n"
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    shapes = TINY if args.tiny else FULL
    args.contexts, args.budgets = args.contexts or shapes["contexts"], args.budgets or shapes["budgets"]
    outputs = [
        args.output_dir / f"{STEM}{suffix}" for suffix in (".json", ".md", "_time.png", "_speedup.png")
    ]
    try:
        claim_outputs(outputs, args.overwrite)
    except OutputPathError as error:
        parser.error(str(error))
    device = torch.device(args.device)
    uses_triton = device.type == "cuda" and ops.triton_available()
    kernels = (
        "Triton kernels (hf_adamas.ops.kernels)"
        if uses_triton
        else "PyTorch reference ops (hf_adamas.ops.reference)"
    )
    if device.type == "cuda" and not uses_triton:
        print("warning: Triton cannot be imported, so this run times the PyTorch reference ops", flush=True)
    with torch.inference_mode():
        result = run(args, shapes, device)
    command = "python " + command_line("scripts/adamas_gpu_bench.py", argv)
    settings = {**vars(args), "output_dir": str(args.output_dir), "dtype": str(shapes["dtype"])}
    settings |= {name: shapes[name] for name in ("q_heads", "kv_heads", "head_dim")}
    payload = {
        "settings": settings,
        "ops": kernels,
        "flash_attn_available": flash_attention() is not None,
        **result,
    }
    title = (
        f"Adamas decode attention vs dense, {torch.cuda.get_device_name() if uses_triton else device.type}"
    )
    write_report(args.output_dir, STEM, command, payload, title, report_body(result, shapes, kernels))
    if result["rows"]:
        plots(args.output_dir, result["rows"], title)
    print(f"saved {', '.join(str(path) for path in outputs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
