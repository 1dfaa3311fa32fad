"""Time one layer's tail-estimate attention (``AdamasConfig(value_code_bits=2)``) against dense sdpa on CPU.

Random decode inputs at the default model's attention shapes (9 query / 3 KV heads, head_dim 64, by
default), float32, one decode token: a cache of ``--contexts`` positions with 2-bit key and value
codes, a selection of ``--budget`` positions per query head and ``--candidates`` more with exact
logits (the default candidate floor). Per context, ``--repeats`` rounds each time one call of every
implementation in turn (so a slow spell of a shared machine hits all alike); the record is the median:

- ``spec``: `hf_adamas.ops.reference.tail_decode_attention` (reads every key: the test oracle);
- ``pytorch``: `hf_adamas.ops.tail.tail_decode_attention` (the GPU / bf16 path);
- ``cpp``: `hf_adamas.ops.cpu.tail_decode_attention_cpu` (the float32 CPU path, its estimates fast-scanned:
  the spec with ``quantized_estimates=True``), when it builds;
- ``sdpa``: dense ``scaled_dot_product_attention`` over the same K/V (``enable_gqa``).

Each implementation's largest deviation from its spec is recorded too, and from the spec with float
estimates (what the quantization of the C++ op's estimates moves). Writes ``tail_op.json``,
``tail_op.md`` and ``tail_op.png`` (milliseconds per call against the context).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from hf_adamas.ops import cpu, reference, tail
from hf_common.outputs import RUNS_DIR, add_output_arguments, claim_outputs
from hf_common.reporting import command_line, markdown_table, plot_series, write_report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192], help="Cache lengths.")
    parser.add_argument("--budget", type=int, default=64, help="Selected positions per query head.")
    parser.add_argument("--candidates", type=int, default=128, help="Exact-logit positions per query head.")
    parser.add_argument("--q-heads", type=int, default=9, help="Query heads.")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads (divides --q-heads).")
    parser.add_argument("--head-dim", type=int, default=64, help="Head dimension (a power of two >= 16).")
    parser.add_argument("--repeats", type=int, default=30, help="Timed rounds per context.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    add_output_arguments(parser, RUNS_DIR / "adamas" / "tail_op")
    args = parser.parse_args(argv)
    if (
        min(
            *args.contexts,
            args.budget,
            args.candidates,
            args.q_heads,
            args.kv_heads,
            args.repeats,
            args.threads,
        )
        < 1
    ):
        parser.error("--contexts, --budget, --candidates, heads, --repeats and --threads must be positive")
    if args.q_heads % args.kv_heads:
        parser.error(f"--q-heads {args.q_heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.head_dim < 16 or args.head_dim & (args.head_dim - 1):
        parser.error(f"--head-dim must be a power of two >= 16, got {args.head_dim}")
    if max(args.budget, args.candidates) > min(args.contexts):
        parser.error("--budget and --candidates must not exceed the smallest context")
    return args


def _inputs(args: argparse.Namespace, length: int) -> dict:
    """Random one-token decode inputs of the tail estimate for a cache of ``length`` positions."""
    generator = torch.Generator().manual_seed(length)
    packed = args.head_dim * 2 // 8

    def codes() -> reference.PackedCodes:
        bytes_ = torch.randint(
            0, 256, (1, args.kv_heads, length, packed), generator=generator, dtype=torch.uint8
        )
        return reference.PackedCodes(bytes_, torch.randn(args.kv_heads, 4, generator=generator), 2)

    def positions(count: int) -> torch.Tensor:
        rows = [torch.randperm(length, generator=generator)[:count] for _ in range(args.q_heads)]
        return torch.stack(rows).unsqueeze(0)

    shape = (1, args.kv_heads, length, args.head_dim)
    return {
        "query": torch.randn(1, args.q_heads, args.head_dim, generator=generator),
        "key": torch.randn(shape, generator=generator),
        "value": torch.randn(shape, generator=generator),
        "indices": positions(args.budget),
        "scaling": args.head_dim**-0.5,
        "key_codes": codes(),
        "value_codes": codes(),
        "valid": None,
        "exact_positions": positions(args.candidates),
    }


def _implementations() -> dict[str, tuple[Callable[..., torch.Tensor], bool | None]]:
    """Name -> (implementation, whether its estimates are the quantized ones; None: not the tail estimate)."""

    def sdpa(query, key, value, **_) -> torch.Tensor:
        out = torch.nn.functional.scaled_dot_product_attention(query[:, :, None], key, value, enable_gqa=True)
        return out[:, :, 0]

    paths = {"spec": (reference.tail_decode_attention, False), "pytorch": (tail.tail_decode_attention, False)}
    if cpu.cpu_extension() is not None:
        paths["cpp"] = (cpu.tail_decode_attention_cpu, True)
    return {**paths, "sdpa": (sdpa, None)}


def _relative_deviation(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got - expected).abs().max() / expected.abs().max()).item())


def measure(args: argparse.Namespace) -> list[dict]:
    """One record per (implementation, context): median milliseconds per call, the deviation from its
    spec (the reference with the estimates it computes) and from the spec with float estimates."""
    implementations = _implementations()
    records = []
    for length in args.contexts:
        inputs = _inputs(args, length)
        float_spec = reference.tail_decode_attention(**inputs)
        quantized_spec = reference.tail_decode_attention(**inputs, quantized_estimates=True)
        deviation, float_deviation = {}, {}
        for name, (run, quantized) in implementations.items():  # also a warm-up call of each
            got = run(**inputs)
            if quantized is not None:
                deviation[name] = _relative_deviation(got, quantized_spec if quantized else float_spec)
                float_deviation[name] = _relative_deviation(got, float_spec)
        times: dict[str, list[float]] = {name: [] for name in implementations}
        for _ in range(args.repeats):
            for name, (run, _) in implementations.items():
                start = time.perf_counter()
                run(**inputs)
                times[name].append(1000 * (time.perf_counter() - start))
        sdpa_ms = statistics.median(times["sdpa"])
        for name, spent in times.items():
            ms = statistics.median(spent)
            records.append(
                {
                    "implementation": name,
                    "context": length,
                    "ms_per_call": ms,
                    "vs_sdpa": sdpa_ms / ms,
                    "max_relative_deviation_from_spec": deviation.get(name, ""),
                    "max_relative_deviation_from_float_estimates": float_deviation.get(name, ""),
                }
            )
        print(
            f"context {length}: " + ", ".join(f"{n} {statistics.median(t):.3f} ms" for n, t in times.items())
        )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse_args(argv)
    stems = [args.output_dir / f"tail_op.{suffix}" for suffix in ("json", "md", "png")]
    claim_outputs(stems, args.overwrite)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        records = measure(args)
    columns = [
        "implementation",
        "context",
        "ms_per_call",
        "vs_sdpa",
        "max_relative_deviation_from_spec",
        "max_relative_deviation_from_float_estimates",
    ]
    shapes = (
        f"{args.q_heads} query / {args.kv_heads} KV heads, head_dim {args.head_dim}, budget {args.budget} + "
        f"{args.candidates} exact candidates, {args.threads} threads, median of {args.repeats} interleaved rounds"
    )
    write_report(
        args.output_dir,
        "tail_op",
        command_line("python", ["scripts/bench_adamas_tail_op.py", *argv]),
        {"settings": vars(args) | {"output_dir": str(args.output_dir)}, "records": records},
        "One layer's tail-estimate attention on CPU against dense sdpa",
        f"{shapes}.\n\n{markdown_table(records, columns)}",
    )
    series = {
        name: ([r["context"] for r in records if r["implementation"] == name],
               [r["ms_per_call"] for r in records if r["implementation"] == name])
        for name in dict.fromkeys(r["implementation"] for r in records)
    }  # fmt: skip
    plot_series(
        stems[2], series, "Tail-estimate attention, one layer", "cached positions", "ms per call", log_y=True
    )
    print(f"Saved {stems[0]}, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
