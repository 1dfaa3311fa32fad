"""A float32 CPU ``linear`` for inputs of a few rows that reads the weight once (speculative verification).

On the project's x86 CPUs, torch's float32 ``linear`` (MKL) costs 1.5-3x more for 2-16 input rows than
for one, although the weight, which dominates the memory traffic, is read once either way: a forward of
SmolLM2-135M over 2-4 new tokens after a 300-token cache took about 105 ms against 60 ms for one token
(``results/scylla/few_rows_linear``). That gap is what verifying a speculative draft costs.
`few_rows_linear` is a C++ AVX2 kernel (``csrc/few_rows_linear.cpp``) that streams each pair of weight
rows once and multiplies it by every input row while it is in cache; its twin is
``torch.nn.functional.linear``, which it matches up to float32 summation order.

`few_rows_linear_layers` switches the ``nn.Linear`` layers of models to it for the inputs whose row
count lies in ``[min_rows, max_rows]`` (default 2-16: one-row decoding stays exactly ``F.linear``, as
in plain greedy decoding), inside a ``with`` block only. Layers it cannot serve (not float32, not on
the CPU, gradients wanted) and machines without AVX2/FMA or a C++ toolchain use ``F.linear``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from hf_common.cpp_extension import load_cpu_extension

__all__ = ["FewRowsLinear", "few_rows_linear", "few_rows_linear_available", "few_rows_linear_layers"]

SOURCE = Path(__file__).parent / "csrc" / "few_rows_linear.cpp"
DEFAULT_ROWS = (2, 16)
"""Row counts the layers use the kernel for: from 17 rows on, MKL's GEMM is as fast on this CPU."""


@functools.cache
def _extension() -> ModuleType | None:
    extension = load_cpu_extension("hf_common_few_rows_linear", SOURCE, "linear layers use F.linear")
    return extension if extension is not None and extension.few_rows_linear_supported() else None


def few_rows_linear_available() -> bool:
    """Whether the kernel runs here (built, and the CPU has AVX2 and FMA)."""
    return _extension() is not None


def few_rows_linear(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(inputs, weight, bias)`` by the kernel: float32 CPU tensors, no autograd.

    ``inputs`` is ``[..., in_features]``; any row count works, but it pays only for few rows
    (`DEFAULT_ROWS`). Raises when the kernel is not available here (`few_rows_linear_available`).
    """
    extension = _extension()
    if extension is None:
        raise RuntimeError("few_rows_linear is not available here (no C++ toolchain, or no AVX2/FMA)")
    for name, tensor in (("inputs", inputs), ("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dtype != torch.float32 or tensor.device.type != "cpu"):
            raise ValueError(
                f"few_rows_linear takes float32 CPU tensors, got {name} {tensor.dtype} on {tensor.device}"
            )
    return _kernel(extension, inputs, weight, bias)


def _kernel(
    extension: ModuleType, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The kernel on tensors already known to be float32 on the CPU (the layers' hot path)."""
    rows = inputs.reshape(-1, inputs.shape[-1]).contiguous()
    out = extension.few_rows_linear(
        rows, weight.contiguous(), torch.empty(0) if bias is None else bias.contiguous()
    )
    return out.view(*inputs.shape[:-1], weight.shape[0])


class FewRowsLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters and state dict) whose inputs of ``min_rows``-``max_rows`` rows
    use `few_rows_linear`; `few_rows_linear_layers` turns layers into these for a ``with`` block."""

    min_rows: int
    max_rows: int

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.numel() // self.in_features
        grad = torch.is_grad_enabled() and (inputs.requires_grad or self.weight.requires_grad)
        if self.min_rows <= rows <= self.max_rows and not grad and inputs.dtype == torch.float32:
            # the layer was switched only with the kernel available and a float32 CPU weight
            return _kernel(_extension(), inputs, self.weight, self.bias)
        return nn.functional.linear(inputs, self.weight, self.bias)


def _servable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    )


@contextmanager
def few_rows_linear_layers(
    *models: nn.Module, min_rows: int = DEFAULT_ROWS[0], max_rows: int = DEFAULT_ROWS[1]
) -> Iterator[int]:
    """Inside the block, every float32 CPU ``nn.Linear`` of ``models`` is a `FewRowsLinear` for inputs of
    ``min_rows``-``max_rows`` rows; yields how many layers were switched (0 where the kernel is not
    available). On exit they are plain ``nn.Linear`` again. A layer shared by several models, or already
    switched by an enclosing block, is switched once (the outer block's rows apply)."""
    if not 1 <= min_rows <= max_rows:
        raise ValueError(f"need 1 <= min_rows <= max_rows, got min_rows={min_rows}, max_rows={max_rows}")
    layers = []
    if few_rows_linear_available():
        layers = list({id(m): m for model in models for m in model.modules() if _servable(m)}.values())
    for module in layers:
        module.__class__ = FewRowsLinear
        module.min_rows, module.max_rows = min_rows, max_rows
    try:
        yield len(layers)
    finally:
        for module in layers:
            del module.min_rows, module.max_rows
            module.__class__ = nn.Linear
