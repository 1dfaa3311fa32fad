"""GSNR math and the gradient-group statistics it is computed from.

`gsnr_multiplier` is the plain-PyTorch reference of the paper's equations 7-9. `GradientStatistics`
collects what it needs: for every trainable parameter, ``S1 = Σ g`` and ``S2 = Σ g²`` over the
gradient groups of one optimizer step, where a group is one backward pass (micro-batch) on one rank.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.distributed as dist

__all__ = ["GradientStatistics", "gsnr_multiplier"]


def gsnr_multiplier(mean: torch.Tensor, mean_sq: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """The VRGD multiplier of one tensor: GSNR, divided by its per-tensor mean, clipped to ``[gamma, 1]``.

    .. math::
        \\sigma^2 = E[g^2] - \\tilde g^2, \\quad
        r = \\frac{\\tilde g^2}{\\sigma^2 + \\epsilon E[g^2]}, \\quad
        r \\leftarrow \\mathrm{clip}\\Big(\\frac{r}{\\mathrm{mean}_j\\, r_j}, \\gamma, 1\\Big)

    ``mean`` and ``mean_sq`` are the mean of the K group gradients and of their squares, so the variance
    is the paper's biased (1/K) estimator across groups. The variance floor ``eps * E[g²]`` is relative,
    which keeps ``r`` invariant to any common scale of the gradients (loss scaling, ``1/accumulation``).

    Elements whose every group gradient is zero (``E[g²] = 0``: embedding rows not in the batch, unused
    branches) carry no information: they are left out of the per-tensor mean and get multiplier 1 (their
    gradient is zero anyway). If every informative element has zero mean gradient the tensor is pure
    noise and gets ``gamma``.

    Args:
        mean: mean of the group gradients, any shape.
        mean_sq: mean of the squared group gradients, same shape.
        gamma: lower clip, in ``(0, 1]``.
        eps: relative variance floor (> 0).

    Returns:
        The float32 multiplier, same shape as ``mean``, in ``[gamma, 1]``.
    """
    mean = mean.float()
    mean_sq = mean_sq.float()
    signal = mean.square()
    variance = (mean_sq - signal).clamp_min_(0.0)
    informative = mean_sq > 0
    ratio = torch.where(informative, signal / (variance + eps * mean_sq), 0.0)
    tensor_mean = ratio.sum() / informative.sum().clamp_min(1)
    multiplier = (ratio / tensor_mean.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(gamma, 1.0)
    return torch.where(informative, multiplier, 1.0)


class GradientStatistics:
    """``S1 = Σ g`` and ``S2 = Σ g²`` (float32) of each trainable parameter over one step's gradient groups.

    A hook on every parameter (``p.register_hook``) sees each backward's *local* gradient before it is
    accumulated into ``.grad``, also under DDP's ``no_sync``; a multi-grad hook counts backward passes.
    `all_reduce` sums ``[S1; S2; count]`` across ranks in one collective, so the number of groups is
    ``K = ranks x micro-batches``. Memory: two float32 buffers per parameter that received a gradient.

    Caveats: reentrant activation checkpointing (``use_reentrant=True``) runs nested backward passes,
    which miscounts groups, so it is not supported. A backward that starts while every ``.grad`` is
    ``None`` although groups were already counted starts a new window: the last step was skipped (a
    GradScaler overflow) and the model was zeroed, so the old sums are dropped.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(dict.fromkeys(p for p in params if p.requires_grad))
        if not self.params:
            raise ValueError("GSNR statistics need at least one parameter with requires_grad=True")
        sharded = sorted({type(p).__name__ for p in self.params} & {"DTensor", "FlatParameter"})
        if sharded:
            raise ValueError(
                f"parameters of type {sharded} are sharded or flattened (FSDP): per-tensor GSNR statistics "
                "are not available; use DDP"
            )
        self._index = {p: i for i, p in enumerate(self.params)}
        self._sums: list[torch.Tensor | None] = [None] * len(self.params)
        self._sums_of_squares: list[torch.Tensor | None] = [None] * len(self.params)
        self.backward_passes = 0
        self_ref = weakref.ref(self)
        # The counting hook is registered first so that it runs before the accumulating hooks of the
        # same backward, and can drop a stale window before they add to it.
        handles = [
            torch.autograd.graph.register_multi_grad_hook(
                self.params, partial(_count_backward, self_ref), mode="any"
            )
        ]
        handles += [p.register_hook(partial(_accumulate, self_ref, i)) for i, p in enumerate(self.params)]
        # The hooks outlive this object only as no-ops; removing them when it is collected keeps
        # the parameters clean.
        self._finalizer = weakref.finalize(self, _remove_handles, handles)

    def add(self, index: int, grad: torch.Tensor) -> None:
        """Adds one group gradient of parameter ``index``."""
        grad = grad.detach().float()
        if self._sums[index] is None:
            self._sums[index] = torch.zeros_like(grad)
            self._sums_of_squares[index] = torch.zeros_like(grad)
        self._sums[index].add_(grad)
        self._sums_of_squares[index].addcmul_(grad, grad)

    def all_reduce(self) -> int:
        """Sums the statistics over ranks (one coalesced all-reduce) and returns ``K``, the group count."""
        device = next((s.device for s in self._sums if s is not None), self.params[0].device)
        count = torch.tensor([float(self.backward_passes)], device=device)
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.backward_passes
        # Every rank must contribute the same layout, so parameters without a gradient here get zeros.
        for i, p in enumerate(self.params):
            if self._sums[i] is None:
                self._sums[i] = torch.zeros_like(p, dtype=torch.float32, device=device)
                self._sums_of_squares[i] = torch.zeros_like(p, dtype=torch.float32, device=device)
        buffers = [*self._sums, *self._sums_of_squares, count]
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        torch._foreach_copy_(
            buffers,
            [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in buffers]), buffers, strict=True)],
        )
        return int(count.item())

    def moments(self, param: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(E[g], E[g²])`` of ``param`` over ``groups`` groups, in place of the sums; None if it got no hook call."""
        index = self._index.get(param)
        if index is None or self._sums[index] is None:
            return None
        return self._sums[index].div_(groups), self._sums_of_squares[index].div_(groups)

    def reset(self) -> None:
        """Starts a new window (called by the optimizer at every step; the buffers are kept)."""
        torch._foreach_zero_([s for s in (*self._sums, *self._sums_of_squares) if s is not None])
        self.backward_passes = 0


def _count_backward(stats_ref: Callable[[], GradientStatistics | None], _grad: torch.Tensor) -> None:
    stats = stats_ref()
    if stats is None:
        return
    if stats.backward_passes > 0 and all(p.grad is None for p in stats.params):
        stats.reset()
    stats.backward_passes += 1


def _accumulate(stats_ref: Callable[[], GradientStatistics | None], index: int, grad: torch.Tensor) -> None:
    stats = stats_ref()
    if stats is not None:
        stats.add(index, grad)


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
