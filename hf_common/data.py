"""Where the project's shared evaluation data lives: ``../shared/data`` next to the repository.

The folder holds GSM8K, the speculative-decoding prompt sets and ``text/tinyshakespeare.txt`` (see its
README). It is found relative to the source tree, as the benchmark commands always did; set
``HF_SHARED_DATA`` to use another copy (for example with a non-editable install).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHARED_DATA_DIR", "shared_data_file"]

SHARED_DATA_ENV = "HF_SHARED_DATA"
SHARED_DATA_DIR = Path(
    os.environ.get(SHARED_DATA_ENV, Path(__file__).resolve().parents[2] / "shared" / "data")
)
"""The shared data folder: ``$HF_SHARED_DATA`` or ``<repository>/../shared/data``."""


def shared_data_file(*parts: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of a file under the shared data folder; a `FileNotFoundError` naming the path if it is missing."""
    path = Path(data_dir if data_dir is not None else SHARED_DATA_DIR).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"Data file {path} not found: put the shared data folder there, or point "
            f"${SHARED_DATA_ENV} (or data_dir=...) at a folder holding {'/'.join(parts)}"
        )
    return path
