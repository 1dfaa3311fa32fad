"""LARS (You et al., 2017) and VR-LARS: momentum SGD with a per-tensor trust ratio."""

from __future__ import annotations

from typing import Any

import torch

from hf_vrgd.optimizers.base import (
    GSNRScaledOptimizer,
    StrictStateOptimizer,
    apply_momentum,
    fp32_copies,
    require_finite_non_negative,
    write_back,
)


def lars_hyperparameters(
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
) -> dict[str, Any]:
    """The validated arguments of `LARS` (``ValueError`` outside their ranges)."""
    require_finite_non_negative(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps)
    if not trust_coefficient > 0:
        raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient!r}")
    return dict(
        lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps
    )


def lars_update(group: dict[str, Any], params: list[torch.Tensor], states: list[dict]) -> None:
    """One LARS step in float32, as timm's ``Lars`` with ``always_adapt``.

    ``d = trust · (g + wd·θ)`` with ``trust = c·‖θ‖ / (‖g‖ + wd·‖θ‖ + eps)`` (1 where ``‖θ‖`` or ``‖g‖`` is
    0); ``buf = momentum·buf + d``; ``θ -= lr·buf``.
    """
    params32 = fp32_copies(params)
    grads32 = fp32_copies([p.grad for p in params])
    weight_norms = torch.stack(torch._foreach_norm(params32))
    grad_norms = torch.stack(torch._foreach_norm(grads32))
    ratios = (
        group["trust_coefficient"]
        * weight_norms
        / (grad_norms + group["weight_decay"] * weight_norms + group["eps"])
    )
    ratios = torch.where((weight_norms > 0) & (grad_norms > 0), ratios, 1.0)
    updates = torch._foreach_add(grads32, params32, alpha=group["weight_decay"])
    torch._foreach_mul_(updates, list(ratios.unbind()))
    if group["momentum"] != 0:
        updates = apply_momentum(states, updates, group["momentum"])
    torch._foreach_add_(params32, updates, alpha=-group["lr"])
    write_back(params, params32)


class LARS(StrictStateOptimizer):
    """LARS ([arXiv 1708.03888](https://arxiv.org/abs/1708.03888)) with bf16/fp16 parameter support.

    .. math::
        d_t = c \\frac{\\|\\theta\\|}{\\|g\\| + \\lambda_{wd}\\|\\theta\\| + \\epsilon} (g + \\lambda_{wd}\\theta),
        \\quad b_t = \\mu b_{t-1} + d_t, \\quad \\theta_t = \\theta_{t-1} - \\eta b_t

    The trust ratio applies to every tensor (timm's ``always_adapt``); it is 1 where ``‖θ‖`` or ``‖g‖``
    is 0, so zero-initialized biases still move. State per parameter: ``momentum_buffer`` (float32
    also for low-precision parameters; only with momentum).
    """

    hyperparameters = staticmethod(lars_hyperparameters)
    update_rule = staticmethod(lars_update)
    fp32_state_keys = ("momentum_buffer",)


class VRLARS(GSNRScaledOptimizer, LARS):
    """VR-LARS ([arXiv 2309.13681](https://arxiv.org/abs/2309.13681)): `LARS` on the GSNR-scaled gradient.

    ``g' = r ⊙ g̃`` (no EMA), then the `LARS` rule; the paper omits the pseudo-code ("scale g̃ by r and
    then apply LARS"). The trust ratio resets each tensor's step norm, so GSNR redistributes the step
    inside a tensor. ``gamma=1`` gives `LARS`. State per parameter: ``momentum_buffer`` (float32); plus
    the two float32 statistics buffers. Needs ``K >= 2`` gradient groups per step.
    """
