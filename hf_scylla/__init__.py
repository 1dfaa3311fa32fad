"""Scylla (arXiv 2505.07858): speculative decoding with scaled EAGLE-style draft models, through ``generate()``."""

from hf_common import __version__

__all__ = ["__version__"]
