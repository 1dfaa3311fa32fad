"""`VRGDConfig`: the GSNR settings shared by every VR optimizer, validated in one place."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field


@dataclass
class VRGDConfig:
    """GSNR settings of VRGD ([arXiv 2309.13681](https://arxiv.org/abs/2309.13681)).

    Each gradient element is scaled by its gradient signal-to-noise ratio ``r = mean² / var``, measured
    across gradient groups (ranks x micro-batches), divided by its per-tensor mean and clipped to
    ``[gamma, 1]``. Every VR optimizer validates its GSNR arguments through this class, and
    `VRGDConfig.optimizer_kwargs` turns a config into keyword arguments for one of them:
    ``VRAdamW(model.parameters(), lr=1e-3, **config.optimizer_kwargs(VRAdamW))``.

    Args:
        gamma (`float`, *optional*, defaults to `0.1`):
            Lower clip of the multiplier, in ``(0, 1]``. The paper uses 0.1 everywhere; ``gamma=1`` turns
            every VR optimizer into its base optimizer (it still counts groups and needs ``K >= 2``).
        beta3 (`float` or `None`, *optional*, defaults to `0.9`):
            EMA factor of the multiplier used by VR-Adam/VR-AdamW/VR-LAMB (bias-corrected, reconstructed
            from the paper's main text). ``None`` means no EMA (VR-SGD, VR-Momentum, VR-LARS).
        eps (`float`, *optional*, defaults to `1e-6`):
            Relative floor of the variance: ``r = mean² / (var + eps * E[g²])``. Being relative to
            ``E[g²]`` it keeps ``r`` invariant to loss scaling, and it caps ``r`` at ``1 / eps`` where every
            group agrees exactly (``var = 0``).
    """

    gamma: float = field(default=0.1, metadata={"help": "Lower clip of the GSNR multiplier, in (0, 1]."})
    beta3: float | None = field(default=0.9, metadata={"help": "EMA factor of the multiplier (Adam/LAMB)."})
    eps: float = field(default=1e-6, metadata={"help": "Relative variance floor: var + eps * E[g^2]."})

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and 0.0 < self.gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if self.beta3 is not None and not (isinstance(self.beta3, (int, float)) and 0.0 <= self.beta3 < 1.0):
            raise ValueError(f"beta3 must be in [0, 1) or None, got {self.beta3!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0.0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps!r}")

    def optimizer_kwargs(self, optimizer_cls: type) -> dict[str, float]:
        """Keyword arguments of ``optimizer_cls`` (a VR optimizer or `VRGD`) that this config sets."""
        accepted = inspect.signature(optimizer_cls).parameters
        kwargs: dict[str, float] = {"gamma": self.gamma, "gsnr_eps": self.eps}
        if "beta3" in accepted and self.beta3 is not None:
            kwargs["beta3"] = self.beta3
        return kwargs
