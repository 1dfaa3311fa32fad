"""Scylla (arXiv 2505.07858): speculative decoding with scaled EAGLE-style draft models, through ``generate()``.

Importing it registers the lm-eval model type ``hf-scylla`` (`hf_scylla.harness.ScyllaLM`, loaded lazily).
"""

from pathlib import Path

from hf_common import __version__
from hf_common.harness import register_model_types
from hf_scylla.batched import BatchedOutput, BatchedStats, batched_generate
from hf_scylla.candidate_generator import ScyllaCandidateGenerator, ScyllaStats
from hf_scylla.config import ScyllaDraftConfig, tokenizer_fingerprint
from hf_scylla.generation import ScyllaGenerateOutput, generate, scylla_generate
from hf_scylla.modeling import ScyllaDraftModel
from hf_scylla.reference import reference_speculative_decode
from hf_scylla.tree import TreeConfig, reference_tree_decode

register_model_types(["hf-scylla"])

CUSTOM_GENERATE_DIR = str(Path(__file__).resolve().parent)
"""Pass as ``generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, draft_model=draft)``."""

__all__ = [
    "CUSTOM_GENERATE_DIR",
    "BatchedOutput",
    "BatchedStats",
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
