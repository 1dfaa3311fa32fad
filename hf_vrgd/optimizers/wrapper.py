"""`VRGD`: GSNR scaling in front of any existing torch optimizer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from hf_vrgd.config import VRGDConfig
from hf_vrgd.optimizers.base import OPTIMIZER_CLASS_KEY, GSNRGradientScaler, evaluate_closure, validate_group


class VRGD(Optimizer):
    """Wraps ``base_optimizer``: each ``step()`` multiplies ``p.grad`` by the GSNR multiplier, then calls
    ``base_optimizer.step()``.

    ``VRGD(torch.optim.SGD(params, lr))`` is VR-SGD; with ``beta3`` the multiplier is replaced by its
    bias-corrected EMA, as in `VRAdam` (reconstructed), so ``VRGD(torch.optim.AdamW(...), beta3=0.9)``
    matches `VRAdamW` up to float rounding. ``gamma=1`` (without ``beta3``) gives the base optimizer.

    The wrapper shares ``param_groups`` (so LR schedulers reach the base) and its hooks machinery is
    initialized by ``Optimizer.__init__`` (no ``_optimizer_step_pre_hooks`` ``AttributeError`` as in
    pytorch_optimizer#122). The multiplier EMA lives in the wrapper's own state, not in the base's
    per-parameter state, which torch optimizers expect empty before their first step. ``state_dict()``
    is ``{"optimizer_class": "VRGD", "base_optimizer": base.state_dict(), "gsnr_state": {index: ...}}``.

    Memory: the two float32 statistics buffers per parameter, and ``gsnr_ema`` with ``beta3``.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        gamma: float = 0.1,
        beta3: float | None = None,
        gsnr_eps: float = 1e-6,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        VRGDConfig(gamma=gamma, beta3=beta3, eps=gsnr_eps)
        for group in base_optimizer.param_groups:
            validate_group(group)
        self.base_optimizer = base_optimizer
        self.gamma, self.beta3 = gamma, beta3
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups
        self.gsnr_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        self.gsnr_scaler = GSNRGradientScaler(self._params(), eps=gsnr_eps)

    @property
    def state(self) -> defaultdict:  # the base's state, so code reading optimizer.state sees the moments
        return self.base_optimizer.state

    @state.setter
    def state(self, value: defaultdict) -> None:  # Optimizer.__init__ assigns an empty state; keep the base's
        pass

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        groups = [{**group, "gamma": self.gamma, "beta3": self.beta3} for group in self.param_groups]
        if self.gsnr_scaler.scale_gradients(groups, self.gsnr_state):
            self.base_optimizer.step()
        return loss

    def gsnr_summary(
        self, names: Mapping[torch.Tensor, str] | None = None, per_layer: bool = True
    ) -> dict[str, float]:
        """The last step's multiplier statistics, as `GSNRScaledOptimizer.gsnr_summary`."""
        return self.gsnr_scaler.summary(names, per_layer)

    def state_dict(self) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(self._params())}
        return {
            OPTIMIZER_CLASS_KEY: type(self).__name__,
            "base_optimizer": self.base_optimizer.state_dict(),
            "gsnr_state": {index[id(p)]: dict(state) for p, state in self.gsnr_state.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict.get(OPTIMIZER_CLASS_KEY) != type(self).__name__ or "base_optimizer" not in state_dict:
            raise ValueError(
                f"this state dict was not saved by VRGD (optimizer_class={state_dict.get(OPTIMIZER_CLASS_KEY)!r})"
            )
        params = self._params()
        for index, saved in state_dict["gsnr_state"].items():  # checked before anything is loaded
            if index >= len(params) or saved["gsnr_ema"].shape != params[index].shape:
                raise ValueError(
                    f"gsnr_state of parameter {index} does not match this optimizer's parameters"
                )
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.gsnr_state.clear()
        for index, saved in state_dict["gsnr_state"].items():
            self.gsnr_state[params[index]] = {
                "gsnr_ema": saved["gsnr_ema"].to(device=params[index].device, dtype=torch.float32),
                "gsnr_step": saved["gsnr_step"],
            }
