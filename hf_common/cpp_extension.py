"""Building the packages' C++ CPU ops: `torch.utils.cpp_extension.load` once per machine, a fallback otherwise.

Each op's source lives under its package's ``csrc/``; the first use compiles it (about 30 s, cached
under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). Where no compiler or ninja is
found, or the build fails, the caller's PyTorch path runs instead and the reason is said once.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from transformers.utils import logging

__all__ = ["load_cpu_extension"]

logger = logging.get_logger(__name__)


def load_cpu_extension(name: str, source: Path, fallback: str) -> ModuleType | None:
    """The compiled extension ``name`` built from ``source``, or None when it cannot be built here.

    ``fallback`` completes the warning given then, e.g. ``"decoding uses the PyTorch reference ops"``.
    Callers cache the result (one build attempt and one warning per process).
    """
    from torch.utils.cpp_extension import load

    try:
        return load(
            name=name,
            sources=[str(source)],
            extra_cflags=["-O3", "-fopenmp"],  # at::parallel_for runs serially without OpenMP
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as error:  # no compiler / ninja, or a failed build
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.warning("The C++ op %s could not be built (%s); %s (correct, slower).", name, reason, fallback)
        return None
