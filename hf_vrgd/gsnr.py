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

__all__ = ["GradientStatistics", "gsnr_multiplier", "gsnr_multipliers"]


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


def gsnr_multipliers(
    means: list[torch.Tensor], mean_sqs: list[torch.Tensor], gamma: float, eps: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`gsnr_multiplier` for a list of float32 tensors with foreach ops (a few kernels for all of them).

    Works **in place**: the returned multipliers are the ``means`` tensors, and ``mean_sqs`` is
    overwritten too (the optimizer passes its statistics buffers, which it resets afterwards). Also
    returns a ``[len(means), 5]`` float32 table on the tensors' device (no host sync), from which
    `GSNRScaledOptimizer.gsnr_summary` logs. Its columns per tensor: element count, informative
    elements (``E[g²] > 0``), and over those: the sum of multipliers, how many sit at ``gamma``, at 1.
    """
    tiny = torch.finfo(torch.float32).tiny
    scratch = torch._foreach_mul(mean_sqs, eps)
    multipliers = means
    torch._foreach_mul_(multipliers, means)  # signal E[g]²
    denominators = mean_sqs
    torch._foreach_sub_(denominators, multipliers)
    torch._foreach_clamp_min_(denominators, 0.0)
    torch._foreach_add_(denominators, scratch)  # var + eps E[g²]: zero exactly where E[g²] = 0
    informative = torch.stack(torch._foreach_norm(denominators, 0))  # ord 0 counts the nonzero elements
    torch._foreach_copy_(scratch, denominators)
    torch._foreach_sign_(scratch)  # 1 where informative, 0 elsewhere
    torch._foreach_clamp_min_(denominators, tiny)  # 0 / tiny = 0 where E[g²] = 0
    torch._foreach_div_(multipliers, denominators)
    inverse_means = informative / torch.stack(torch._foreach_norm(multipliers, 1)).clamp_min(tiny)
    torch._foreach_mul_(multipliers, list(inverse_means.unbind()))
    torch._foreach_clamp_min_(multipliers, gamma)
    torch._foreach_clamp_max_(multipliers, 1.0)
    # r <- r sign(E[g²]) + (1 - sign(E[g²])): elements without any gradient get 1, the others stay exact
    torch._foreach_mul_(multipliers, scratch)
    torch._foreach_neg_(scratch)
    torch._foreach_add_(scratch, 1.0)
    torch._foreach_add_(multipliers, scratch)

    numel = torch.tensor([float(m.numel()) for m in multipliers], device=informative.device)
    multiplier_sum = torch.stack(torch._foreach_norm(multipliers, 1)) - (numel - informative)
    at_one = informative - _count_nonzero_after_sub(scratch, multipliers, 1.0)
    # Clipped elements hold float32(gamma) exactly; subtracting the float64 gamma would leave a residue.
    gamma32 = torch.tensor(gamma, dtype=torch.float32).item()
    at_gamma = numel - _count_nonzero_after_sub(scratch, multipliers, gamma32) if gamma < 1.0 else informative
    return multipliers, torch.stack([numel, informative, multiplier_sum, at_gamma, at_one], dim=1)


def _count_nonzero_after_sub(
    scratch: list[torch.Tensor], tensors: list[torch.Tensor], value: float
) -> torch.Tensor:
    """Per tensor, how many elements differ from ``value`` (computed in ``scratch``)."""
    torch._foreach_copy_(scratch, tensors)
    torch._foreach_sub_(scratch, value)
    return torch.stack(torch._foreach_norm(scratch, 0))


class GradientStatistics:
    """``S1 = Σ g`` and ``S2 = Σ g²`` (float32) of each trainable parameter over one step's gradient groups.

    A hook on every parameter (``p.register_hook``) sees each backward's *local* gradient before it is
    accumulated into ``.grad``, also under DDP's ``no_sync``; a multi-grad hook counts backward passes.
    `all_reduce` sums ``[S1; S2; count]`` across ranks in one collective, so the number of groups is
    ``K = ranks x micro-batches``. Memory: two float32 buffers per parameter that received a gradient;
    with several ranks the all-reduce also packs them into one temporary flat buffer.

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
        if grad.layout != torch.strided:
            raise ValueError(
                f"GSNR statistics need dense gradients, got a {grad.layout} one "
                "(nn.Embedding(sparse=True)?); use dense gradients with VR optimizers"
            )
        grad = grad.detach().float()
        if self._sums[index] is None:
            self._sums[index] = torch.zeros_like(grad)
            self._sums_of_squares[index] = torch.zeros_like(grad)
        self._sums[index].add_(grad)
        self._sums_of_squares[index].addcmul_(grad, grad)

    def all_reduce(self) -> int:
        """Sums the statistics over ranks (one coalesced all-reduce) and returns ``K``, the group count."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.backward_passes
        device = next((s.device for s in self._sums if s is not None), self.params[0].device)
        count = torch.tensor([float(self.backward_passes)], device=device)
        # Every rank must contribute the same layout, so parameters without a gradient here get zeros.
        for i, p in enumerate(self.params):
            if self._sums[i] is None:
                self._sums[i] = torch.zeros_like(p, dtype=torch.float32, device=device)
                self._sums_of_squares[i] = torch.zeros_like(p, dtype=torch.float32, device=device)
        buffers = [*self._sums, *self._sums_of_squares, count]
        flat = torch.cat([b.reshape(-1).to(device) for b in buffers])
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
