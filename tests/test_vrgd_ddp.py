"""Two DDP processes (gloo, CPU): the GSNR statistics all-reduced across ranks equal brute force over
every rank's group gradients, and the parameters stay identical on both ranks after each step."""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from hf_vrgd import VRSGD, VRAdamW
from hf_vrgd.naive import naive_gsnr_multiplier

WORLD_SIZE = 2
LEARNING_RATE = 0.5
STEPS = 2
JOIN_TIMEOUT_S = 300


def group_batch(step: int, rank: int, micro: int) -> torch.Tensor:
    """The micro-batch every process can rebuild: one group per (step, rank, micro-batch)."""
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(1000 * step + 10 * rank + micro))


def loss_of(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs).square().mean()


def expected_vr_sgd_parameters(model: torch.nn.Module, step: int, accumulation: int) -> list[torch.Tensor]:
    """``θ - lr · r ⊙ mean(g)`` from the explicit gradients of all ``ranks x accumulation`` groups."""
    reference = copy.deepcopy(model).double()
    batches = [group_batch(step, r, m).double() for r in range(WORLD_SIZE) for m in range(accumulation)]
    per_group = [torch.autograd.grad(loss_of(reference, x), list(reference.parameters())) for x in batches]
    expected = []
    for param, grads in zip(reference.parameters(), zip(*per_group, strict=True), strict=True):
        stacked = torch.stack(grads)
        expected.append(
            param.detach() - LEARNING_RATE * naive_gsnr_multiplier(stacked, 0.1, eps=1e-6) * stacked.mean(0)
        )
    return expected


def run_rank(rank: int, init_file: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    results: dict[str, list[float]] = {"brute_force_error": [], "rank_difference": []}
    for accumulation, make_optimizer in ((1, VRSGD), (3, VRSGD), (2, VRAdamW)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        ddp_model = DistributedDataParallel(model)
        optimizer = make_optimizer(model.parameters(), lr=LEARNING_RATE)
        for step in range(STEPS):
            expected = expected_vr_sgd_parameters(model, step, accumulation)
            for micro in range(accumulation):
                last = micro == accumulation - 1
                with contextlib.nullcontext() if last else ddp_model.no_sync():
                    (loss_of(ddp_model, group_batch(step, rank, micro)) / accumulation).backward()
            optimizer.step()
            optimizer.zero_grad()
            if make_optimizer is VRSGD:
                errors = [
                    (p.double() - e).abs().max().item()
                    for p, e in zip(model.parameters(), expected, strict=True)
                ]
                results["brute_force_error"].append(max(errors))
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
            dist.all_gather(gathered, flat)
            results["rank_difference"].append((gathered[0] - gathered[1]).abs().max().item())
    torch.save(results, Path(output_dir) / f"rank{rank}.pt")
    # Free DDP's reducer while the peer is still connected: freeing it after destroy_process_group can
    # leave gloo's destructor waiting for the peer that has already exited (a hang, seen in CI).
    del ddp_model, model, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_match_brute_force_and_each_other(tmp_path: Path) -> None:
    # fork: the workers inherit the imported modules instead of importing torch and transformers again
    context = mp.start_processes(
        run_rank,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the DDP ranks did not finish within {JOIN_TIMEOUT_S} s (killed)")
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert len(results["brute_force_error"]) == 2 * STEPS
        assert max(results["brute_force_error"]) < 1e-5, results
        assert results["rank_difference"] == [0.0] * 3 * STEPS, results
