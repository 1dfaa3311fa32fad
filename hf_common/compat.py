"""The one transformers API rename this project straddles: the cache argument.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (model forwards, attention modules, generate
and model outputs); 5.23 only knows ``past_key_values``. Code that passes or reads the cache goes through
these names so it runs warning-free on both.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

CACHE_ARGUMENT = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"

__all__ = ["CACHE_ARGUMENT", "cache_kwargs", "output_cache"]


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever this transformers expects."""
    return {CACHE_ARGUMENT: cache}


def output_cache(output: Any) -> Any:
    """The cache held by a model or generate output."""
    return getattr(output, CACHE_ARGUMENT)
