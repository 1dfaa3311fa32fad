"""Scylla (arXiv 2505.07858): speculative decoding with scaled EAGLE-style draft models, through ``generate()``.

Importing it registers the lm-eval model type ``hf-scylla`` (`hf_scylla.lm_eval.ScyllaLM`, loaded lazily)
with `hf_common.harness`, with its model-card hooks.
"""

from pathlib import Path

from hf_common import __version__
from hf_common.harness import register_lm_eval_model
from hf_scylla.batched import BatchedOutput, batched_generate
from hf_scylla.candidate_generator import ScyllaCandidateGenerator, ScyllaStats
from hf_scylla.config import ScyllaDraftConfig, tokenizer_fingerprint
from hf_scylla.generation import ScyllaGenerateOutput, generate, scylla_generate
from hf_scylla.hub import RESULTS_PLACEHOLDER
from hf_scylla.modeling import ScyllaDraftModel
from hf_scylla.naive import reference_speculative_decode
from hf_scylla.tree import TreeConfig, reference_tree_decode

register_lm_eval_model(
    "hf-scylla",
    "hf_scylla.lm_eval:ScyllaLM",
    card_extras="hf_scylla.lm_eval:speculative_eval_results",
    card_notes="hf_scylla.lm_eval:card_notes",
    card_folder_arg="draft",
    card_placeholder=RESULTS_PLACEHOLDER,
)

CUSTOM_GENERATE_DIR = str(Path(__file__).resolve().parent)
"""Pass as ``generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, draft_model=draft)``."""

__all__ = [
    "CUSTOM_GENERATE_DIR",
    "BatchedOutput",
    "ScyllaCandidateGenerator",
    "ScyllaDraftConfig",
    "ScyllaDraftModel",
    "ScyllaGenerateOutput",
    "ScyllaStats",
    "TreeConfig",
    "__version__",
    "batched_generate",
    "generate",
    "reference_speculative_decode",
    "reference_tree_decode",
    "scylla_generate",
    "tokenizer_fingerprint",
]
