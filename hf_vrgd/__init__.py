"""VRGD (arXiv 2309.13681): GSNR-scaled variance-reduced optimizers for large-batch training with the HF Trainer."""

from hf_common import __version__

__all__ = ["__version__"]
