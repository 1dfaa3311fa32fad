"""VRGD optimizers and the base optimizers torch lacks (LAMB, LARS), with the one name table."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from hf_vrgd.optimizers.adam import VRAdam, VRAdamW
from hf_vrgd.optimizers.base import GSNRScaledOptimizer
from hf_vrgd.optimizers.lamb import LAMB, VRLAMB
from hf_vrgd.optimizers.lars import LARS, VRLARS
from hf_vrgd.optimizers.sgd import VRSGD
from hf_vrgd.optimizers.wrapper import VRGD

BASE_OPTIMIZERS: dict[type[Optimizer], type[Optimizer]] = {
    VRSGD: torch.optim.SGD,
    VRAdam: torch.optim.Adam,
    VRAdamW: torch.optim.AdamW,
    VRLAMB: LAMB,
    VRLARS: LARS,
}
"""Each VR optimizer's base: it takes the same arguments, minus the GSNR ones, and ``gamma=1`` equals it."""

OPTIMIZERS: dict[str, type[Optimizer]] = {
    **{cls.__name__.lower(): cls for pair in BASE_OPTIMIZERS.items() for cls in pair},
    "vrmomentum": VRSGD,
    "momentum": torch.optim.SGD,
}
"""Name -> optimizer class: each VR optimizer and its base (``"vradamw"`` -> `VRAdamW`, ``"adamw"`` ->
``torch.optim.AdamW``, ``"lamb"`` -> `LAMB`)."""


def load_optimizer(name: str) -> type[Optimizer]:
    """The optimizer class registered as ``name`` (case-insensitive, ``-``/``_`` ignored: ``"VR-AdamW"``).

    Raises ``ValueError`` for an unknown name.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[key]


def optimizer_pair(name: str, **kwargs: Any) -> tuple[Callable, Callable]:
    """``(base factory, VR factory)`` for a VR optimizer ``name`` (``"vr-adamw"``), both with ``kwargs``.

    Each factory takes the parameters; torch bases get ``foreach=True`` (their fastest CPU/GPU path).
    """
    vr_class = load_optimizer(name)
    base_class = BASE_OPTIMIZERS[vr_class]
    base_kwargs = dict(kwargs)
    if "foreach" in inspect.signature(base_class).parameters:
        base_kwargs["foreach"] = True
    return (lambda params: base_class(params, **base_kwargs)), (lambda params: vr_class(params, **kwargs))


__all__ = [
    "BASE_OPTIMIZERS",
    "LAMB",
    "LARS",
    "OPTIMIZERS",
    "VRGD",
    "VRLAMB",
    "VRLARS",
    "VRSGD",
    "GSNRScaledOptimizer",
    "VRAdam",
    "VRAdamW",
    "load_optimizer",
    "optimizer_pair",
]
