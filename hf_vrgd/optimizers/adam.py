"""VR-Adam and VR-AdamW: Adam moments of the GSNR-scaled gradient (reconstructed from the paper's text)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from hf_vrgd.optimizers.base import (
    GSNRScaledOptimizer,
    fp32_copies,
    require_finite_non_negative,
    write_back,
)


def adam_hyperparameters(
    lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
) -> dict[str, Any]:
    """The validated arguments of ``torch.optim.Adam`` that `adam_update` implements."""
    require_finite_non_negative(lr=lr, eps=eps, weight_decay=weight_decay)
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def adam_moments(
    group: dict[str, Any], states: list[dict], grads32: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Updates the Adam moments (float32 state); returns ``m``, ``√v̂ + eps`` and ``1 - β1^t`` per parameter."""
    beta1, beta2 = group["betas"]
    for state, grad in zip(states, grads32, strict=True):
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
    exp_avgs = [state["exp_avg"] for state in states]
    exp_avg_sqs = [state["exp_avg_sq"] for state in states]
    torch._foreach_lerp_(exp_avgs, grads32, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads32, grads32, 1.0 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, [math.sqrt(1.0 - beta2 ** state["step"]) for state in states])
    torch._foreach_add_(denominators, group["eps"])
    return exp_avgs, denominators, [1.0 - beta1 ** state["step"] for state in states]


def adam_update(
    group: dict[str, Any], params: list[torch.Tensor], states: list[dict], decoupled: bool = False
) -> None:
    """One Adam (``decoupled=False``, L2 added to the gradient) or AdamW step, as in ``torch.optim``."""
    params32 = fp32_copies(params)
    grads32 = fp32_copies([p.grad for p in params])
    if group["weight_decay"] != 0:
        if decoupled:
            torch._foreach_mul_(params32, 1.0 - group["lr"] * group["weight_decay"])
        else:
            grads32 = torch._foreach_add(grads32, params32, alpha=group["weight_decay"])
    exp_avgs, denominators, bias_corrections = adam_moments(group, states, grads32)
    step_sizes = [-group["lr"] / correction for correction in bias_corrections]
    torch._foreach_addcdiv_(params32, exp_avgs, denominators, step_sizes)
    write_back(params, params32)


class VRAdam(GSNRScaledOptimizer):
    """VR-Adam ([arXiv 2309.13681](https://arxiv.org/abs/2309.13681), §4.2), L2 weight decay as ``torch.optim.Adam``.

    .. math::
        p_t = \\beta_3 p_{t-1} + (1-\\beta_3) r_t, \\quad \\hat p_t = p_t / (1-\\beta_3^t), \\quad
        g'_t = \\hat p_t \\odot \\tilde g_t, \\quad \\theta_t = \\mathrm{Adam}(g'_t)

    The paper prints only the idea ("GSNR ... used to adapt the gradient mean *before* gradients'
    momentum estimation ... momentum mechanism on GSNR"); its Appendix D pseudo-code was not available,
    so the bias correction of ``p`` and feeding ``g'`` to both moments are **reconstructed**. ``gamma=1``
    gives ``torch.optim.Adam``. Adam's ``v`` normalizes away GSNR scales that stay constant for ~1/(1-β2)
    steps; only relative changes of GSNR change the step.

    State per parameter (float32): ``exp_avg``, ``exp_avg_sq``, ``gsnr_ema``, ``step``/``gsnr_step``;
    plus the two float32 statistics buffers. Needs ``K >= 2`` gradient groups per step.
    """

    hyperparameters = staticmethod(adam_hyperparameters)
    update_rule = staticmethod(adam_update)
    fp32_state_keys = ("exp_avg", "exp_avg_sq")
    gsnr_ema = True


class VRAdamW(VRAdam):
    """VR-AdamW: `VRAdam` with decoupled weight decay (``torch.optim.AdamW``; default 0.01).

    ``gamma=1`` gives ``torch.optim.AdamW``. Same arguments (``weight_decay`` and those after it are
    keyword-only), state and reconstruction notes as `VRAdam`.
    """

    hyperparameters = staticmethod(partial(adam_hyperparameters, weight_decay=0.01))
    update_rule = staticmethod(partial(adam_update, decoupled=True))
