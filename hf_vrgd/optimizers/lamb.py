"""LAMB (You et al., 2019) and VR-LAMB: Adam directions rescaled per tensor by a trust ratio."""

from __future__ import annotations

from typing import Any

import torch

from hf_vrgd.optimizers.adam import adam_hyperparameters, adam_moments
from hf_vrgd.optimizers.base import GSNRScaledOptimizer, StrictStateOptimizer, fp32_copies, write_back


def trust_ratios(numerators: list[torch.Tensor], denominators: list[torch.Tensor]) -> list[torch.Tensor]:
    """``numerator / denominator`` per tensor, 1 where either is zero (layer-wise adaptation, LARS/LAMB)."""
    numerator = torch.stack(numerators)
    denominator = torch.stack(denominators)
    ratio = torch.where((numerator > 0) & (denominator > 0), numerator / denominator, 1.0)
    return list(ratio.unbind())


def lamb_hyperparameters(
    lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01
) -> dict[str, Any]:
    """The validated arguments of `LAMB`: Adam's, with a larger ``eps`` and weight decay on by default."""
    return adam_hyperparameters(lr, betas, eps, weight_decay)


def lamb_update(group: dict[str, Any], params: list[torch.Tensor], states: list[dict]) -> None:
    """One LAMB step in float32: ``u = m̂/(√v̂+eps) + wd·θ``, ``θ -= lr · ‖θ‖/‖u‖ · u``."""
    params32 = fp32_copies(params)
    exp_avgs, denominators, bias_corrections = adam_moments(
        group, states, fp32_copies([p.grad for p in params])
    )
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_div_(updates, bias_corrections)
    if group["weight_decay"] != 0:
        torch._foreach_add_(updates, params32, alpha=group["weight_decay"])
    ratios = trust_ratios(torch._foreach_norm(params32), torch._foreach_norm(updates))
    torch._foreach_mul_(updates, ratios)
    torch._foreach_add_(params32, updates, alpha=-group["lr"])
    write_back(params, params32)


class LAMB(StrictStateOptimizer):
    """LAMB ([arXiv 1904.00962](https://arxiv.org/abs/1904.00962)) with bf16/fp16 parameter support.

    .. math::
        u_t = \\frac{\\hat m_t}{\\sqrt{\\hat v_t} + \\epsilon} + \\lambda_{wd} \\theta_{t-1}, \\quad
        \\theta_t = \\theta_{t-1} - \\eta \\frac{\\|\\theta_{t-1}\\|}{\\|u_t\\|} u_t

    Bias-corrected moments, decoupled weight decay inside the trust ratio, trust ratio 1 where
    ``‖θ‖`` or ``‖u‖`` is 0, no clamp (as optax's ``lamb``). Unlike apex ``FusedLAMB`` there is no
    internal gradient clipping (the Trainer's ``max_grad_norm`` clips once). To exempt biases and norms,
    give them their own group with ``weight_decay=0``.

    State per parameter, float32 also for low-precision parameters (the math runs in float32):
    ``exp_avg``, ``exp_avg_sq``, ``step``.
    """

    hyperparameters = staticmethod(lamb_hyperparameters)
    update_rule = staticmethod(lamb_update)
    fp32_state_keys = ("exp_avg", "exp_avg_sq")


class VRLAMB(GSNRScaledOptimizer, LAMB):
    """VR-LAMB ([arXiv 2309.13681](https://arxiv.org/abs/2309.13681), §4.2): `LAMB` on the GSNR-scaled gradient.

    "VR-Adam plus LAMB's trust ratio": ``g' = p̂_t ⊙ g̃`` with ``p̂`` the bias-corrected ``beta3`` EMA of the
    GSNR multiplier (reconstructed, see `VRAdam`), then the `LAMB` rule. The trust ratio resets each
    tensor's update norm, so GSNR only redistributes the step inside a tensor. ``gamma=1`` gives `LAMB`.

    State per parameter (float32): ``exp_avg``, ``exp_avg_sq``, ``gsnr_ema``, ``step``/``gsnr_step``; plus
    the two float32 statistics buffers. Needs ``K >= 2`` gradient groups per step.
    """

    gsnr_ema = True
