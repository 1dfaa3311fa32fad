"""VRGD optimizers and the base optimizers torch lacks (LAMB, LARS), with a name registry."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from hf_vrgd.optimizers.adam import VRAdam, VRAdamW
from hf_vrgd.optimizers.base import GSNRScaledOptimizer
from hf_vrgd.optimizers.lamb import LAMB, VRLAMB
from hf_vrgd.optimizers.lars import LARS, VRLARS
from hf_vrgd.optimizers.sgd import VRSGD
from hf_vrgd.optimizers.wrapper import VRGD

OPTIMIZERS: dict[str, type[Optimizer]] = {
    **{cls.__name__.lower(): cls for cls in (VRSGD, VRAdam, VRAdamW, VRLAMB, VRLARS, LAMB, LARS)},
    "vrmomentum": VRSGD,
    "sgd": torch.optim.SGD,
    "momentum": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
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


__all__ = [
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
]
