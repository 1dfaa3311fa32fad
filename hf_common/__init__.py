"""Pieces shared by hf_adamas, hf_vrgd and hf_scylla: the embedded default model, CLI plumbing, the demo."""

import importlib.metadata

from hf_common.default_model import DEFAULT_MODEL_ID, default_model_path, load_model_and_tokenizer

try:
    __version__ = importlib.metadata.version("hf-adamas-scylla-vrgd")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["DEFAULT_MODEL_ID", "__version__", "default_model_path", "load_model_and_tokenizer"]
