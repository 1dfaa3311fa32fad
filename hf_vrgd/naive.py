"""The VRGD spec (arXiv 2309.13681, eq. 7-9): the GSNR multiplier in plain PyTorch, the tests' oracle.

Each element of a tensor's gradient is scaled by its gradient signal-to-noise ratio across the K
gradient groups of one step (ranks x micro-batches), divided by the tensor's mean ratio and clipped to
``[gamma, 1]``; the optimizer then applies its base rule to the scaled gradient::

    r = mean_k(g_k)² / var_k(g_k)          per element
    r = clip(r / mean_j(r_j), gamma, 1)    per tensor
    update = base_rule(r ⊙ g)

`naive_gsnr_multiplier` computes it in float64 from the stacked group gradients, as printed;
`gsnr_multiplier` is the same from the two moments in float32 with the numerics the optimizers use.
The fast in-place foreach path of the optimizers (`hf_vrgd.gsnr.gsnr_multipliers`) is tested against
both.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT32_MAX", "SMALLEST_SUBNORMAL", "gsnr_multiplier", "naive_gsnr_multiplier"]

SMALLEST_SUBNORMAL = 2.0**-149
"""The smallest positive float32: added to ``E[g²]`` so that ``0 / (0 + SMALLEST_SUBNORMAL) = 0`` exactly
where no group had a gradient, while every positive ``E[g²]`` (at least this) stays distinguishable."""
FLOAT32_MAX = torch.finfo(torch.float32).max


def naive_gsnr_multiplier(group_grads: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """The multiplier of one tensor from its K group gradients ``[K, *shape]``, in float64.

    ``r = E[g]² / (var + eps E[g²])`` with the biased (1/K) variance across groups; elements whose
    every group gradient is zero carry no information: they get 1 and stay out of the tensor mean.
    """
    grads = group_grads.double()
    mean = grads.mean(0)
    variance = grads.var(0, unbiased=False)
    mean_sq = grads.square().mean(0)
    informative = mean_sq > 0
    ratio = torch.where(informative, mean.square() / (variance + eps * mean_sq), 0.0)
    normalized = torch.where(ratio == 0, 0.0, ratio / ratio[informative].mean())  # Σ r = 0: gamma
    return torch.where(informative, normalized.clamp(gamma, 1.0), 1.0)


def gsnr_multiplier(mean: torch.Tensor, mean_sq: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """The VRGD multiplier of one tensor: GSNR, divided by its per-tensor mean, clipped to ``[gamma, 1]``.

    .. math::
        q = \\frac{\\tilde g^2}{E[g^2]}, \\quad
        r = \\frac{q}{1 + \\epsilon - q} = \\frac{\\tilde g^2}{\\sigma^2 + \\epsilon E[g^2]}, \\quad
        r \\leftarrow \\mathrm{clip}\\Big(\\frac{r}{\\mathrm{mean}_j\\, r_j}, \\gamma, 1\\Big)

    ``mean`` and ``mean_sq`` are the mean of the K group gradients and of their squares, so
    ``sigma² = E[g²] - E[g]²`` is the paper's biased (1/K) estimator across groups. The variance floor
    ``eps * E[g²]`` is relative, which keeps ``r`` invariant to any common scale of the gradients (loss
    scaling, ``1/accumulation``) and caps it at about ``1/eps`` where every group agrees.

    Elements whose every group gradient is zero (``E[g²] = 0``: embedding rows not in the batch, unused
    branches) carry no information: they count as ``r = 0`` but are left out of the element count of the
    per-tensor mean, and get multiplier 1 (their gradient is zero anyway). If every element has zero
    mean gradient (``Σ r = 0``: pure noise, e.g. two groups ``+g`` and ``-g``) every informative element
    gets ``gamma``. The result is NaN only when an input is (or ``E[g²]`` overflowed to inf).

    Args:
        mean: mean of the group gradients, any shape and floating dtype.
        mean_sq: mean of the squared group gradients, same shape.
        gamma: lower clip, in ``(0, 1]``.
        eps: relative variance floor (> 0).

    Returns:
        The float32 multiplier, same shape as ``mean``, in ``[gamma, 1]``, computed in the moments'
        precision (float32 at least): with few groups ``1 + eps - q`` cancels, so float64 moments (the
        tests' oracle comparison) must not be rounded to float32 first.
    """
    dtype = torch.promote_types(mean.dtype, torch.float32)  # float64 moments stay float64 until the end
    mean = mean.to(dtype)
    mean_sq = mean_sq.to(dtype)
    informative = mean_sq > 0
    agreement = (mean.square() / (mean_sq + SMALLEST_SUBNORMAL)).clamp_max(1.0)  # q, 0 without gradient
    # q / (1 + eps - q), written as 1 / ((1 + eps) / q - 1): 0 where q = 0 (1/0 = inf), never 0/0.
    ratio = (agreement.reciprocal() * (1.0 + eps) - 1.0).reciprocal()
    total = ratio.sum()  # count / Σ r: 0 where every r is 0, capped so that 0 * inverse stays 0
    inverse_mean = torch.where(total == 0, 0.0, informative.sum().to(dtype) / total).clamp_max(FLOAT32_MAX)
    multiplier = (ratio * inverse_mean).clamp(gamma, 1.0)
    return torch.where(informative, multiplier, 1.0).float()
