"""VR-SGD and VR-Momentum (the paper's Algorithm 1): ``torch.optim.SGD`` on the GSNR-scaled gradient."""

from __future__ import annotations

from typing import Any

import torch

from hf_vrgd.optimizers.base import (
    GSNRScaledOptimizer,
    apply_momentum,
    fp32_copies,
    require_finite_non_negative,
    write_back,
)


def sgd_hyperparameters(
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> dict[str, Any]:
    """The validated arguments of ``torch.optim.SGD`` that `sgd_update` implements."""
    require_finite_non_negative(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    return dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)


def sgd_update(group: dict[str, Any], params: list[torch.Tensor], states: list[dict]) -> None:
    """One ``torch.optim.SGD`` step (coupled weight decay, momentum, dampening, Nesterov) in float32."""
    params32 = fp32_copies(params)
    updates = fp32_copies([p.grad for p in params])
    if group["weight_decay"] != 0:
        updates = torch._foreach_add(updates, params32, alpha=group["weight_decay"])
    if group["momentum"] != 0:
        buffers = apply_momentum(states, updates, group["momentum"], group["dampening"])
        updates = (
            torch._foreach_add(updates, buffers, alpha=group["momentum"]) if group["nesterov"] else buffers
        )
    torch._foreach_add_(params32, updates, alpha=-group["lr"])
    write_back(params, params32)


class VRSGD(GSNRScaledOptimizer):
    """VR-SGD / VR-Momentum ([arXiv 2309.13681](https://arxiv.org/abs/2309.13681), Algorithm 1).

    .. math::
        \\theta_t = \\theta_{t-1} - \\lambda \\cdot \\mathrm{SGD}(r_t \\odot \\tilde g_t)

    ``r_t`` is the GSNR multiplier in ``[gamma, 1]`` (see `gsnr_multiplier`); the rule after scaling is
    exactly ``torch.optim.SGD`` with the same arguments (``momentum > 0`` gives VR-Momentum, whose
    pseudo-code the paper omits: scaling before momentum is how we read "scale g̃ by r then apply
    momentum"). ``gamma=1`` gives ``torch.optim.SGD``. VRGD only shrinks steps, so re-tune ``lr``.

    State per parameter: ``momentum_buffer`` (float32, only with momentum); plus the two float32
    statistics buffers of `GradientStatistics`. Needs ``K >= 2`` gradient groups per step.
    """

    hyperparameters = staticmethod(sgd_hyperparameters)
    update_rule = staticmethod(sgd_update)
    fp32_state_keys = ("momentum_buffer",)
