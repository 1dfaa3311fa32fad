"""Step time and memory of each VR optimizer against its base optimizer on a ~100M-parameter Llama.

What VR adds to a training step is (a) a hook per parameter on every backward pass that accumulates the
float32 sums Σg and Σg², and (b) the GSNR computation inside ``step()``. So one timed iteration is
``k`` backward passes of a synthetic loss ``s_j * Σ_p (p * c_p).sum()`` (its gradient is the fixed random
tensor ``c_p`` times a per-group scale ``s_j``, so groups differ and the GSNR is finite), then one
``step()``. Base and VR pay the same backward; VR additionally pays its hooks. The step is also timed
alone. Memory is the optimizer's own tensors (state plus anything else it holds, parameters and
gradients excluded), counted before and after ``step()``.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_common.reporting import markdown_table, save_json

STEP_TIME_TARGET = 1.25
"""Reported against, not asserted: a VR step should cost at most 1.25x its base."""
MEMORY_TARGET_BUFFERS = 2.0
"""Reported against, not asserted: at most two extra float32 buffers per parameter."""


def _optimizer_pairs() -> dict[str, tuple[Callable, Callable]]:
    """VR optimizer name -> (base factory, VR factory); each factory takes the parameter list."""
    import hf_vrgd

    adam_kwargs = {"lr": 1e-3, "weight_decay": 0.01}
    return {
        "vr-sgd": (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
            lambda p: hf_vrgd.VRSGD(p, lr=0.1, momentum=0.9),
        ),
        "vr-adam": (
            lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
            lambda p: hf_vrgd.VRAdam(p, lr=1e-3),
        ),
        "vr-adamw": (
            lambda p: torch.optim.AdamW(p, foreach=True, **adam_kwargs),
            lambda p: hf_vrgd.VRAdamW(p, **adam_kwargs),
        ),
        "vr-lamb": (lambda p: hf_vrgd.LAMB(p, **adam_kwargs), lambda p: hf_vrgd.VRLAMB(p, **adam_kwargs)),
        "vr-lars": (
            lambda p: hf_vrgd.LARS(p, lr=0.1, momentum=0.9),
            lambda p: hf_vrgd.VRLARS(p, lr=0.1, momentum=0.9),
        ),
    }


BENCH_OPTIMIZERS = ("vr-sgd", "vr-adam", "vr-adamw", "vr-lamb", "vr-lars")


def llama_parameters(target: int, device: torch.device) -> tuple[list[torch.nn.Parameter], str]:
    """The float32 parameters of a Llama (12 layers, vocab ~target/3125) sized to about ``target``.

    Returns the parameters and a one-line description of the shape.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    layers = 12
    vocab = min(32_000, max(256, target // 3125))
    # params ~ layers * 12 h^2 (attention 4h^2, SwiGLU MLP 3 * h * 8h/3) + vocab * h; solve for h.
    hidden = (-vocab + math.sqrt(vocab**2 + 4 * 12 * layers * target)) / (2 * 12 * layers)
    hidden = max(64, round(hidden / 64) * 64)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=round(8 * hidden / 3 / 64) * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    shape = (
        f"Llama hidden {hidden}, {layers} layers, vocab {vocab}, {sum(p.numel() for p in params)} parameters"
    )
    return params, shape


def optimizer_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Bytes of the tensors an optimizer holds (state and attributes), parameters and gradients excluded."""
    excluded = {p.data_ptr() for p in params} | {p.grad.data_ptr() for p in params if p.grad is not None}
    seen: set[int] = set()
    visited: set[int] = set()
    total = 0

    def walk(value: object, depth: int) -> None:
        nonlocal total
        if torch.is_tensor(value):
            pointer = value.untyped_storage().data_ptr()
            if pointer not in excluded and pointer not in seen and value.device.type != "meta":
                seen.add(pointer)
                total += value.untyped_storage().nbytes()
            return
        if depth > 6 or id(value) in visited:
            return
        visited.add(id(value))
        if isinstance(value, dict):
            for item in value.values():
                walk(item, depth + 1)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(item, depth + 1)
        elif hasattr(value, "__dict__") and not callable(value):
            walk(vars(value), depth + 1)

    walk(vars(optimizer), 0)
    return total


def _backward_groups(params: list[torch.Tensor], coefficients: list[torch.Tensor], groups: int) -> None:
    for group in range(groups):
        loss = torch.stack([(p * c).sum() for p, c in zip(params, coefficients, strict=True)]).sum()
        (loss * (1.0 + 0.1 * group)).backward()


def _clock(device: torch.device) -> Callable[[], float]:
    """Seconds of this process's CPU time on the CPU (robust to other jobs on a shared machine), wall time
    after a synchronize on CUDA."""
    if device.type == "cuda":

        def wall() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return wall
    return time.process_time


def time_optimizer(
    factory: Callable,
    params: list[torch.nn.Parameter],
    coefficients: list[torch.Tensor],
    groups: int,
    repeats: int,
) -> dict:
    """Median times (ms) of ``groups`` backward passes + step and of the step alone; optimizer bytes.

    ``*_ms`` is CPU time on the CPU and wall time on CUDA; ``wall_*_ms`` is always wall time.
    """
    device = params[0].device
    clock = _clock(device)
    optimizer = factory(params)
    times: dict[str, list[float]] = {
        "backward_ms": [],
        "step_ms": [],
        "wall_backward_ms": [],
        "wall_step_ms": [],
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for repeat in range(repeats + 1):  # the first iteration allocates state and is not timed
        optimizer.zero_grad(set_to_none=True)
        start, wall_start = clock(), time.perf_counter()
        _backward_groups(params, coefficients, groups)
        backward, wall_backward = clock() - start, time.perf_counter() - wall_start
        bytes_before_step = optimizer_bytes(optimizer, params)
        start, wall_start = clock(), time.perf_counter()
        optimizer.step()
        step, wall_step = clock() - start, time.perf_counter() - wall_start
        bytes_after_step = optimizer_bytes(optimizer, params)
        if repeat:
            for key, seconds in zip(times, (backward, step, wall_backward, wall_step), strict=True):
                times[key].append(1e3 * seconds)
    result = {key: statistics.median(values) for key, values in times.items()}
    result["total_ms"] = statistics.median(
        b + s for b, s in zip(times["backward_ms"], times["step_ms"], strict=True)
    )
    result["wall_total_ms"] = result["wall_backward_ms"] + result["wall_step_ms"]
    result["bytes_before_step"] = bytes_before_step
    result["bytes_after_step"] = bytes_after_step
    if device.type == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    gc.collect()
    return result


def _leftover_hooks(params: list[torch.Tensor]) -> bool:
    return any(getattr(p, "_backward_hooks", None) for p in params)


def run_bench(args: argparse.Namespace) -> int:
    """Benchmark every requested VR optimizer against its base; write ``bench.{json,md,png}``."""
    if args.groups < 2:
        raise SystemExit(f"error: --groups must be >= 2 (GSNR needs two gradient groups), got {args.groups}")
    if args.repeats < 1 or args.params < 1000:
        raise SystemExit("error: --repeats must be >= 1 and --params >= 1000")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    params, shape = llama_parameters(args.params, device)
    n_params = sum(p.numel() for p in params)
    coefficients = [torch.randn_like(p) for p in params]
    pairs = _optimizer_pairs()
    rows = []
    for name in tqdm(args.optimizers, desc=f"bench ({device.type})", unit="pair"):
        base_factory, vr_factory = pairs[name]
        base = time_optimizer(base_factory, params, coefficients, args.groups, args.repeats)
        vr = time_optimizer(vr_factory, params, coefficients, args.groups, args.repeats)
        if _leftover_hooks(params):
            raise RuntimeError(f"{name} left gradient hooks on the parameters; later timings would be wrong")
        rows.append(_compare(name, base, vr, n_params))
    _write_report(args, device, shape, rows)
    return 0


def _compare(name: str, base: dict, vr: dict, n_params: int) -> dict:
    extra_after = (vr["bytes_after_step"] - base["bytes_after_step"]) / n_params
    extra_peak = (vr["bytes_before_step"] - base["bytes_before_step"]) / n_params
    row = {
        "optimizer": name,
        "base_total_ms": base["total_ms"],
        "vr_total_ms": vr["total_ms"],
        "total_ratio": vr["total_ms"] / base["total_ms"],
        "base_step_ms": base["step_ms"],
        "vr_step_ms": vr["step_ms"],
        "step_ratio": vr["step_ms"] / base["step_ms"],
        "base_backward_ms": base["backward_ms"],
        "vr_backward_ms": vr["backward_ms"],
        "base_wall_total_ms": base["wall_total_ms"],
        "vr_wall_total_ms": vr["wall_total_ms"],
        "wall_total_ratio": vr["wall_total_ms"] / base["wall_total_ms"],
        "base_bytes_per_param": base["bytes_after_step"] / n_params,
        "vr_bytes_per_param": vr["bytes_after_step"] / n_params,
        "extra_bytes_per_param": extra_after,
        "extra_bytes_per_param_before_step": extra_peak,
        "extra_fp32_buffers": max(extra_after, extra_peak) / 4,
    }
    if "peak_cuda_bytes" in vr:
        row["extra_peak_cuda_bytes_per_param"] = (vr["peak_cuda_bytes"] - base["peak_cuda_bytes"]) / n_params
    return row


def _machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return f"{name}, {torch.get_num_threads()} torch CPU threads, torch {torch.__version__}"


def _write_report(args: argparse.Namespace, device: torch.device, shape: str, rows: list[dict]) -> None:
    from hf_vrgd.plots import plot_grouped_bars

    command = "hf-vrgd " + " ".join(getattr(args, "argv", []))
    stem = f"bench_{device.type}"
    out: Path = args.output_dir
    clock = "wall time (CUDA synchronized)" if device.type == "cuda" else "process CPU time (single thread)"
    how = (
        f"{args.groups} backward passes of a synthetic loss + one step per iteration, median of "
        f"{args.repeats} iterations after one untimed warm-up; *_ms columns are {clock}"
    )
    payload = {"command": command, "machine": _machine(device), "model": shape, "measured": how, "rows": rows}
    save_json(out / f"{stem}.json", payload)
    columns = [
        "optimizer",
        "base_total_ms",
        "vr_total_ms",
        "total_ratio",
        "wall_total_ratio",
        "base_step_ms",
        "vr_step_ms",
        "step_ratio",
        "extra_bytes_per_param",
        "extra_bytes_per_param_before_step",
        "extra_fp32_buffers",
    ]
    table = markdown_table(rows, columns)
    (out / f"{stem}.md").write_text(
        f"# VR optimizer overhead ({device.type})\n\nCommand: `{command}`\n\nMachine: {_machine(device)}\n\n"
        f"Model: {shape}\n\nMeasured: {how}. Targets (reported, not asserted): step-time ratio <= "
        f"{STEP_TIME_TARGET}, extra memory <= {MEMORY_TARGET_BUFFERS:g} fp32 buffers per parameter.\n\n"
        f"{table}"
    )
    names = [row["optimizer"] for row in rows]
    bars = {
        "backward x k + step": [row["total_ratio"] for row in rows],
        "step alone": [row["step_ratio"] for row in rows],
    }
    title = f"VR / base time ({device.type}, k={args.groups})"
    plot_grouped_bars(out / f"{stem}.png", names, bars, title, "time ratio", reference=STEP_TIME_TARGET)
    print(table)
    print(f"Saved {out}/{stem}.json, .md and .png")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-vrgd bench``."""
    parser.add_argument("--params", type=int, default=100_000_000, help="Target model size (parameters).")
    parser.add_argument("--groups", type=int, default=4, help="Gradient groups (backward passes) per step.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed iterations per optimizer.")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=BENCH_OPTIMIZERS,
        default=list(BENCH_OPTIMIZERS),
        help="VR optimizers.",
    )
    parser.add_argument("--cpu", action="store_true", help="Benchmark on the CPU even when CUDA is present.")
    parser.add_argument("--output-dir", type=Path, default=Path("results/vrgd"), help="Where results go.")
