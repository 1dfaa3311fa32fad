"""Adamas (arXiv 2510.18413): Hadamard-code sparse attention for long-context decoding.

``import hf_adamas`` registers ``attn_implementation="adamas"`` with transformers::

    import hf_adamas
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_id, attn_implementation="adamas")
    hf_adamas.apply_adamas(model, hf_adamas.AdamasConfig(token_budget=128))  # optional: settings

It also registers the lm-eval model type ``hf-adamas`` (`hf_adamas.lm_eval.AdamasLM`, loaded lazily) and
the passkey tasks (`hf_adamas.tasks`) with `hf_common.harness`.
"""

from hf_adamas.cache import AdamasCache, AdamasLayer
from hf_adamas.config import AdamasConfig
from hf_adamas.integration import apply_adamas, register
from hf_adamas.tasks import TASKS_DIR
from hf_common import __version__
from hf_common.default_model import register_saved_attention
from hf_common.harness import register_lm_eval_model, register_lm_eval_tasks

register()
register_saved_attention("adamas_config", "adamas")
register_lm_eval_model("hf-adamas", "hf_adamas.lm_eval:AdamasLM")
register_lm_eval_tasks(TASKS_DIR)

__all__ = ["AdamasCache", "AdamasConfig", "AdamasLayer", "__version__", "apply_adamas", "register"]
