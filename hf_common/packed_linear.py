"""MKL's packed GEMM for a CPU model's linear layers at one row count (speculative verification).

On x86 CPUs, torch's float32 ``linear`` is far less efficient for 4-16 input rows than for 1-3: a
5-token forward of SmolLM2-135M after a 300-token cache costs 1.6x a 1-token one, most of it in the
matrix products, though the weights are read once either way. MKL can pack a weight once for a given
row count (``cblas_sgemm_pack``) and multiply inputs of exactly that many rows against the packed
copy (``torch.ops.mkl._mkl_linear``, what inductor's CPU freezing uses). `pack_linear_weights` gives
every ``nn.Linear`` of a float32 CPU model such a copy (one more copy of those weights in memory);
while `packed_weights_enabled` is on, inputs of that many rows use it and all others use
``F.linear``. A speculative decoder whose verification always has the same width (e.g. prompt-lookup
proposals of 4 tokens plus the last accepted one) gets cheaper verification; results equal
``F.linear`` up to float32 summation order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["PackedLinear", "pack_linear_weights", "packed_weights_enabled", "unpack_linear_weights"]


def _check_packable(module: nn.Linear) -> None:
    if not (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")):
        raise RuntimeError("packed linear weights need a torch build with MKL (x86 CPU builds have it)")
    if module.weight.device.type != "cpu" or module.weight.dtype != torch.float32:
        raise ValueError(
            f"packed linear weights are for float32 CPU layers, got {module.weight.dtype} on "
            f"{module.weight.device}"
        )


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters and state dict) that also holds an MKL-packed copy of its weight
    for inputs of ``packed_rows`` rows; `pack_linear_weights` turns linear layers into these."""

    packed_rows: int
    packed_enabled: bool

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.numel() // self.in_features
        if self.packed_enabled and rows == self.packed_rows and self.weight._version == self._packed_version:
            return torch.ops.mkl._mkl_linear(inputs, self.packed_weight, self.weight, self.bias, rows)
        return nn.functional.linear(inputs, self.weight, self.bias)


@torch.no_grad()
def pack_linear_weights(model: nn.Module, rows: int) -> int:
    """Give every ``nn.Linear`` of ``model`` an MKL-packed weight for inputs of ``rows`` rows (enabled);
    returns how many layers were packed. Inference only: a weight changed in place afterwards makes its
    layer fall back to ``F.linear``. Packing again replaces the earlier copies."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    layers = [module for module in model.modules() if isinstance(module, nn.Linear)]
    for module in layers:
        _check_packable(module)
    for module in layers:
        module.__class__ = PackedLinear
        module.register_buffer(
            "packed_weight", torch.ops.mkl._mkl_reorder_linear_weight(module.weight, rows), persistent=False
        )
        module.packed_rows, module.packed_enabled = rows, True
        module._packed_version = module.weight._version
    return len(layers)


def unpack_linear_weights(model: nn.Module) -> int:
    """Turn `PackedLinear` layers back into plain ``nn.Linear`` and free their packed copies."""
    layers = [module for module in model.modules() if isinstance(module, PackedLinear)]
    for module in layers:
        del module.packed_weight, module.packed_rows, module.packed_enabled, module._packed_version
        module.__class__ = nn.Linear
    return len(layers)


@contextmanager
def packed_weights_enabled(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Use (or bypass) the packed copies of ``model``'s `PackedLinear` layers inside the block."""
    layers = [module for module in model.modules() if isinstance(module, PackedLinear)]
    before = [module.packed_enabled for module in layers]
    for module in layers:
        module.packed_enabled = enabled
    try:
        yield
    finally:
        for module, state in zip(layers, before, strict=True):
            module.packed_enabled = state
