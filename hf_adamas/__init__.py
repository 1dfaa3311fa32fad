"""Adamas (arXiv 2510.18413): Hadamard-code sparse attention for long-context decoding, as ``attn_implementation="adamas"``."""

from hf_common import __version__

__all__ = ["__version__"]
