"""The transformers API changes this project straddles: the cache argument and ``Cache.crop``.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (model forwards, attention modules, generate
and model outputs); 5.23 only knows ``past_key_values``. Code that passes or reads the cache goes through
these names so it runs warning-free on both. ``crop`` took a final length in 5.23 (negative: tokens to
drop, so ``crop(0)`` emptied the cache) and takes only tokens to drop in 5.24; `crop_cache` means the
same on both.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

CACHE_ARGUMENT = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"

__all__ = ["CACHE_ARGUMENT", "cache_kwargs", "crop_cache", "output_cache"]


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever this transformers expects."""
    return {CACHE_ARGUMENT: cache}


def output_cache(output: Any) -> Any:
    """The cache held by a model or generate output."""
    return getattr(output, CACHE_ARGUMENT)


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of ``cache`` (a no-op when it holds no more)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
