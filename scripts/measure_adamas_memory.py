"""Peak memory of a long-prompt generation: sdpa with transformers' DynamicCache against Adamas.

Each method runs in a fresh child process (so one method's freed memory cannot hide another's peak):
load the default model, reset the kernel's peak-RSS counter (``/proc/self/clear_refs``), run
``generate()`` on ``--prompt-tokens`` tokens of ``tinyshakespeare.txt`` plus ``--new-tokens`` greedy
tokens under ``torch.profiler`` with ``profile_memory=True``, and report:

- the peak of torch's CPU allocations during the call: the running sum, in start order, of each
  operator's net allocation (``self_cpu_memory_usage``) as the profiler records it (the primary
  figure: it counts every tensor byte, reserved or not, and nothing else);
- the rise of the peak resident set size (``VmHWM`` minus the ``VmRSS`` before the call, after a
  short warm-up generation that pages the weights in): what the OS sees, including allocator
  caching and untouched reserved pages, so noisier;
- the bytes the cache tensors hold at the end (allocated capacity and filled part).

Methods:

- ``sdpa``: dense attention, the ``DynamicCache`` generate builds (``torch.cat`` per step);
- ``adamas``: `apply_adamas`, so generate announces prompt + ``max_new_tokens`` and each code-cache
  layer reserves it once;
- ``adamas-unannounced``: ``attn_implementation="adamas"`` set without `apply_adamas` (the
  ``from_pretrained`` route), so the code cache grows by `hf_adamas.cache.GROWTH` when full.

Linux only (reads ``/proc``). Finished methods are kept in ``<output-dir>/memory.progress.json`` and
skipped when the command is run again with the same settings, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hf_common.data import SHARED_DATA_DIR
from hf_common.outputs import RUNS_DIR, add_output_arguments, claim_outputs
from hf_common.reporting import command_line, markdown_table, save_json, write_report

METHODS = ("sdpa", "adamas", "adamas-unannounced")
SHAKESPEARE = SHARED_DATA_DIR / "text" / "tinyshakespeare.txt"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt-tokens", type=int, default=8000, help="Prompt length in tokens.")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens generated (max_new_tokens).")
    parser.add_argument("--budget", type=int, default=256, help="Adamas token budget.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="Methods.")
    parser.add_argument(
        "--text", type=Path, default=SHAKESPEARE, help="Text whose first tokens are the prompt."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each child.")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    add_output_arguments(parser, RUNS_DIR / "adamas" / "memory")
    args = parser.parse_args(argv)
    if min(args.prompt_tokens, args.new_tokens, args.budget, args.threads) < 1:
        parser.error("--prompt-tokens, --new-tokens, --budget and --threads must be positive")
    if not args.text.is_file():
        parser.error(f"text file {args.text} not found (pass another with --text)")
    return args


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _cache_bytes(cache) -> dict[str, int]:
    """Bytes of the cache's tensors: ``allocated`` (whole buffers) and ``filled`` (the stored positions)."""
    from hf_adamas.cache import AdamasLayer

    allocated = filled = codes = 0
    for layer in cache.layers:
        buffers = getattr(layer, "_buffers", None)
        tensors = list(buffers) if buffers is not None else [layer.keys, layer.values]
        if isinstance(layer, AdamasLayer):
            tensors.extend(layer.code_buffers())
        allocated += sum(t.untyped_storage().nbytes() for t in tensors)
        views = (layer.keys, layer.values, getattr(layer, "key_codes", None))
        filled += sum(t.numel() * t.element_size() for t in views if t is not None)
        if views[2] is not None:
            codes += views[2].numel()
    return {"cache_allocated_bytes": allocated, "cache_filled_bytes": filled, "code_bytes": codes}


def _run_child(args: argparse.Namespace) -> dict:
    import gc

    from hf_adamas import AdamasConfig, apply_adamas
    from hf_common import load_model_and_tokenizer
    from hf_common.compat import output_cache

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer()
    input_ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids[:, : args.prompt_tokens]
    settings = AdamasConfig(token_budget=args.budget)
    if args.child == "adamas":
        apply_adamas(model, settings)
    elif args.child == "adamas-unannounced":
        settings.save_to_model_config(model.config)
        model.set_attn_implementation("adamas")
    with torch.inference_mode():  # pages the memory-mapped weights in before the peak counter is reset
        model.generate(input_ids=input_ids[:, :64], max_new_tokens=2, do_sample=False)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
    peak = _status_kib("VmHWM")
    allocated = peak_allocated = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        allocated += event.self_cpu_memory_usage
        peak_allocated = max(peak_allocated, allocated)
    cache = output_cache(output)
    positions = cache.get_seq_length()
    return {
        "method": args.child,
        "prompt_tokens": int(input_ids.shape[1]),
        "new_tokens": int(output.sequences.shape[1] - input_ids.shape[1]),
        "cache_positions": positions,
        "peak_torch_allocated_mib": peak_allocated / 2**20,
        "rss_before_mib": before / 1024,
        "peak_rss_increase_mib": (peak - before) / 1024,
        **_cache_bytes(cache),
    }


def _settings_key(args: argparse.Namespace) -> dict:
    return {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "budget": args.budget,
            "text": str(args.text), "threads": args.threads, "metrics": 2}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.child:
        print(json.dumps(_run_child(args)))
        return 0
    claim_outputs([args.output_dir / "memory.json", args.output_dir / "memory.md"], args.overwrite)
    progress_path = args.output_dir / "memory.progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    if progress.get("settings") != _settings_key(args):
        progress = {"settings": _settings_key(args), "records": {}}
    for method in args.methods:
        if method in progress["records"]:
            print(f"{method}: done in an earlier run, kept")
            continue
        print(f"{method}: running", flush=True)
        child = [sys.executable, __file__, *argv, "--child", method]
        result = subprocess.run(child, capture_output=True, text=True, check=False)
        if result.returncode:
            raise SystemExit(f"{method} failed:\n{result.stderr[-4000:]}")
        progress["records"][method] = json.loads(result.stdout.strip().splitlines()[-1])
        save_json(progress_path, progress)
    records = [progress["records"][m] for m in args.methods]
    for record in records:
        record["cache_allocated_bytes_per_position"] = (
            record["cache_allocated_bytes"] / record["cache_positions"]
        )
        record["code_bytes_per_position"] = record["code_bytes"] / record["cache_positions"]
    columns = ["method", "peak_torch_allocated_mib", "peak_rss_increase_mib", "cache_allocated_bytes", "cache_filled_bytes",
               "cache_allocated_bytes_per_position", "code_bytes_per_position"]  # fmt: skip
    table = markdown_table(records, columns)
    body = (
        f"Prompt of {args.prompt_tokens} tokens plus {args.new_tokens} generated, default model, budget "
        f"{args.budget}; one fresh process per method, {args.threads} torch thread(s). Peak torch allocated: "
        "running sum of per-operator net CPU allocations recorded by torch.profiler(profile_memory=True) "
        "over generate(), its maximum. Peak RSS increase: rise of the peak resident set size (VmHWM after "
        "clear_refs) over generate(), noisier (allocator caching). Cache bytes: storage of the "
        "cache tensors at the end (all layers, K/V and key codes).\n\n" + table
    )
    title = "Peak memory of a long-prompt generation: sdpa vs Adamas"
    command = command_line("python", ["scripts/measure_adamas_memory.py", *argv])
    write_report(
        args.output_dir,
        "memory",
        command,
        {"settings": progress["settings"], "records": records},
        title,
        body,
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
