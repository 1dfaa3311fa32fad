"""Adamas (arXiv 2510.18413): Hadamard-code sparse attention for long-context decoding.

``import hf_adamas`` registers ``attn_implementation="adamas"`` with transformers::

    import hf_adamas
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_id, attn_implementation="adamas")
    hf_adamas.apply_adamas(model, hf_adamas.AdamasConfig(token_budget=128))  # optional: settings

It also registers the lm-eval model type ``hf-adamas`` (`hf_adamas.harness.AdamasLM`, loaded lazily).
"""

from hf_adamas.cache import AdamasCache, AdamasLayer
from hf_adamas.config import AdamasConfig
from hf_adamas.integration import apply_adamas, register
from hf_common import __version__
from hf_common.harness import register_model_types

register()
register_model_types(["hf-adamas"])

__all__ = ["AdamasCache", "AdamasConfig", "AdamasLayer", "__version__", "apply_adamas", "register"]
