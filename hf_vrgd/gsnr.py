"""The fast GSNR path and the gradient-group statistics it is computed from.

`gsnr_multipliers` is the in-place foreach version of the spec `hf_vrgd.naive.gsnr_multiplier` (the
paper's equations 7-9) that the optimizers run, tested against it. `GradientStatistics` collects what
they need: for every trainable parameter, ``S1 = Σ w_k g_k`` and ``S2 = Σ (w_k g_k)²`` over the gradient
groups ``k`` of one optimizer step, where a group is one backward pass (micro-batch) on one rank and
``w_k`` turns the group's gradient into a per-group mean (see `GradientStatistics.set_group_size`).

Numerics (both paths): with ``q = E[g]² / E[g²]`` in ``[0, 1]`` the GSNR is
``r = q / (1 + eps - q) = E[g]² / (var + eps E[g²])``, which never divides by zero. A squared gradient
that overflows float32 (``|g| > 1.8e19``) makes ``r`` NaN; the optimizers then skip the step with a
warning (`GSNRGradientScaler`). Gradients below about ``1e-19`` have subnormal squares, so their GSNR
is imprecise (still finite and in ``[gamma, 1]``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.distributed as dist

from hf_vrgd.naive import FLOAT32_MAX, SMALLEST_SUBNORMAL

__all__ = ["GradientStatistics", "gsnr_multipliers"]


def _inverse_means(totals: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``count / Σ r`` per tensor: 0 where ``Σ r = 0`` (every ``r`` is 0), capped at the float32 maximum
    so that ``0 * inverse`` stays 0; NaN stays NaN (the optimizers check it)."""
    return torch.where(totals == 0, 0.0, counts / totals).clamp_max(FLOAT32_MAX)


def gsnr_multipliers(
    sums: list[torch.Tensor],
    sums_of_squares: list[torch.Tensor],
    groups: int,
    gamma: float,
    eps: float,
    with_table: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """`gsnr_multiplier` for float32 tensors given as sums over ``groups`` groups, with foreach ops.

    Works **in place**, in 16 elementwise passes over the two buffers (two of them read-only norms):
    the returned multipliers are the ``sums`` tensors, and ``sums_of_squares`` is overwritten too (the
    optimizer passes its statistics buffers, which it resets afterwards). ``q = E[g]²/E[g²]`` is
    ``(Σg)² / (K Σg²)``, so no pass divides by ``K``.

    Returns ``(multipliers, totals, table)``: ``totals`` is ``Σ r`` per tensor before normalization; it
    is finite exactly when every multiplier is (``r >= 0``, and an infinite ``r * (count / Σ r)`` clips
    to 1), so checking it is the finite check on the multipliers. ``table`` (only ``with_table``; a few
    more passes) is a ``[len(sums), 5]`` float32 tensor on the tensors' device (no host sync) for
    `GSNRScaledOptimizer.gsnr_summary`: element count, informative elements (``E[g²] > 0``), and over
    those the sum of multipliers, how many sit at ``gamma`` and at 1.
    """
    scale = float(groups)
    ratios, masks = sums, sums_of_squares
    torch._foreach_mul_(ratios, sums)  # (Σg)²
    torch._foreach_add_(masks, SMALLEST_SUBNORMAL)
    torch._foreach_div_(ratios, masks)  # K q
    torch._foreach_clamp_max_(ratios, scale)  # q <= 1 up to rounding
    torch._foreach_reciprocal_(ratios)
    torch._foreach_mul_(ratios, scale * (1.0 + eps))  # (1 + eps) / q
    torch._foreach_sub_(ratios, 1.0)
    torch._foreach_reciprocal_(ratios)  # r = q / (1 + eps - q)
    # (Σg² + s) / -s + 2 is 1 where Σg² = 0 and <= 0 elsewhere (s: the smallest subnormal, so exact).
    torch._foreach_div_(masks, -SMALLEST_SUBNORMAL)
    torch._foreach_add_(masks, 2.0)
    torch._foreach_clamp_min_(masks, 0.0)  # 1 without gradient, 0 elsewhere
    device = ratios[0].device
    without = torch.stack(torch._foreach_norm(masks, 1)).to(device)
    totals = torch.stack(torch._foreach_norm(ratios, 1)).to(device)
    numel = torch.tensor([float(r.numel()) for r in ratios], device=device)
    informative = numel - without
    torch._foreach_mul_(ratios, list(_inverse_means(totals, informative).unbind()))
    torch._foreach_clamp_min_(ratios, gamma)
    torch._foreach_clamp_max_(ratios, 1.0)
    multipliers = ratios
    torch._foreach_maximum_(multipliers, masks)  # 1 where no group had a gradient
    if not with_table:
        return multipliers, totals, None
    # Clipped elements hold float32(gamma) exactly; comparing with the float64 gamma would miss them.
    gamma32 = torch.tensor(gamma, dtype=torch.float32).item()
    at_one = torch.stack([torch.count_nonzero(m == 1.0) for m in multipliers]).float() - without
    at_gamma = torch.stack([torch.count_nonzero(m == gamma32) for m in multipliers]).float()
    if gamma32 == 1.0:
        at_gamma = at_gamma - without
    multiplier_sum = torch.stack(torch._foreach_norm(multipliers, 1)).to(device) - without
    return multipliers, totals, torch.stack([numel, informative, multiplier_sum, at_gamma, at_one], dim=1)


class GradientStatistics:
    """``S1 = Σ w g`` and ``S2 = Σ (w g)²`` (float32) of each trainable parameter over one step's gradient groups.

    A hook on every parameter (``p.register_hook``) sees each backward's *local* gradient before it is
    accumulated into ``.grad``, also under DDP's ``no_sync``; a multi-grad hook counts backward passes.
    `all_reduce` sums ``[S1; S2; count]`` across ranks in one collective, so the number of groups is
    ``K = ranks x micro-batches``. Memory: two float32 buffers per parameter that received a gradient,
    written in place (the first gradient of a window overwrites them, so a new window costs no zeroing
    pass); with several ranks the all-reduce also packs them into one temporary flat buffer.

    ``w`` is ``1 / n`` for a group of ``n`` items (`set_group_size`): a loss normalized over the whole
    window (the Trainer's ``num_items_in_batch``) gives group gradients proportional to each group's
    item count, and dividing by it makes them per-group means, so that unequal micro-batches do not
    pose as gradient noise. `VRGDTrainer` sets it; without it ``w = 1`` (right for per-micro-batch mean
    losses, whose group gradients already are means).

    Caveats: reentrant activation checkpointing (``use_reentrant=True``) runs nested backward passes,
    which miscounts groups, so it is not supported. A backward that starts while every ``.grad`` is
    ``None`` although groups were already counted starts a new window: the last step was skipped (a
    GradScaler overflow) and the model was zeroed, so the old sums are dropped. A parameter without a
    gradient in some groups contributes 0 there; ``K`` counts every backward pass.
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
        self._seen = [False] * len(self.params)  # whether the buffers hold this window's sums
        self.backward_passes = 0
        self.group_weight = 1.0
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

    def set_group_size(self, items: float) -> None:
        """Weights the following backward passes by ``1 / items`` (see the class notes)."""
        if not items > 0:
            raise ValueError(f"a gradient group needs a positive number of items, got {items!r}")
        self.group_weight = 1.0 / float(items)

    def add(self, index: int, grad: torch.Tensor) -> None:
        """Adds one group gradient of parameter ``index`` (in place; the first one of a window overwrites)."""
        if grad.layout != torch.strided:
            raise ValueError(
                f"GSNR statistics need dense gradients, got a {grad.layout} one "
                "(nn.Embedding(sparse=True)?); use dense gradients with VR optimizers"
            )
        grad = grad.detach().float()
        weight = self.group_weight
        if self._sums[index] is None:
            self._sums[index] = torch.empty_like(grad, dtype=torch.float32)
            self._sums_of_squares[index] = torch.empty_like(grad, dtype=torch.float32)
        sums, squares = self._sums[index], self._sums_of_squares[index]
        if not self._seen[index]:
            torch.mul(grad, weight, out=sums)
            torch.mul(sums, sums, out=squares)
            self._seen[index] = True
        else:
            sums.add_(grad, alpha=weight)
            squares.addcmul_(grad, grad, value=weight * weight)

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
            elif not self._seen[i]:
                self._sums[i].zero_()
                self._sums_of_squares[i].zero_()
            self._seen[i] = True
        buffers = [*self._sums, *self._sums_of_squares, count]
        flat = torch.cat([b.reshape(-1).to(device) for b in buffers])
        dist.all_reduce(flat)
        torch._foreach_copy_(
            buffers,
            [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in buffers]), buffers, strict=True)],
        )
        return int(count.item())

    def sums(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This window's ``(S1, S2)`` buffers of ``param`` (the fast path works in them); None if no hook call."""
        index = self._index.get(param)
        if index is None or not self._seen[index]:
            return None
        return self._sums[index], self._sums_of_squares[index]

    def moments(self, param: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(E[g], E[g²])`` of ``param`` over ``groups`` groups (new tensors), the input of `gsnr_multiplier`."""
        sums = self.sums(param)
        return None if sums is None else (sums[0] / groups, sums[1] / groups)

    def reset(self) -> None:
        """Starts a new window (called by the optimizer at every step; the buffers are kept for reuse)."""
        self._seen = [False] * len(self.params)
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
