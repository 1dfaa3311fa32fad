"""What both large-batch experiments (`byte_experiment`, `lm_experiment`) plan: runs and their config keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


def config_fingerprint(config: object) -> str:
    """A short hash of a dataclass config: finished run records are reused only under the same one."""
    return hashlib.sha1(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class RunSpec:
    """One training run: optimizer, global batch (sequences), learning rate, its multiplier of the base LR, seed."""

    optimizer: str
    batch: int
    lr: float
    lr_multiplier: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}_b{self.batch}_lr{self.lr:.3g}_s{self.seed}"
