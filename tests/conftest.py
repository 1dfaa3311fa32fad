"""Shared fixtures: tiny random configs, a saved tiny target and draft, a user lm-eval task, the real default model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

TINY_FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
TINY_HEAD_DIMS = (64, 128)


def make_tiny_config(family: str, head_dim: int = 64, **overrides) -> PretrainedConfig:
    """A tiny random config with grouped-query attention (4 query heads over 2 KV heads)."""
    kwargs = dict(
        vocab_size=128,
        hidden_size=2 * head_dim,
        intermediate_size=4 * head_dim,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return TINY_FAMILIES[family](**kwargs)


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (the scripts are not a package) to call its ``main``."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(
    params=[(f, d) for f in TINY_FAMILIES for d in TINY_HEAD_DIMS], ids=lambda p: f"{p[0]}-d{p[1]}"
)
def tiny_config(request: pytest.FixtureRequest) -> PretrainedConfig:
    """Each tiny family at head_dim 64 and 128."""
    family, head_dim = request.param
    return make_tiny_config(family, head_dim)


@pytest.fixture
def tiny_model(tiny_config: PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config).eval()


@pytest.fixture
def tiny_target_dir(tmp_path: Path) -> Path:
    """A tiny Llama (head_dim 16) that the oracle draft mostly predicts, saved with its word tokenizer."""
    from helpers import save_with_tokenizer
    from scylla_models import make_target

    return save_with_tokenizer(make_target(context_scale=0.3), tmp_path / "target")


@pytest.fixture
def tiny_draft_dir(tmp_path: Path, tiny_target_dir: Path) -> Path:
    """An oracle Scylla draft of ``tiny_target_dir``, saved."""
    from scylla_models import make_draft

    folder = tmp_path / "draft"
    make_draft(AutoModelForCausalLM.from_pretrained(tiny_target_dir), oracle=True).save_pretrained(folder)
    return folder


@pytest.fixture
def word_task_dir(tmp_path: Path) -> Path:
    """A user lm-eval task (via --include_path, next to ours): continue a word sequence until w9."""
    from helpers import random_words

    folder = tmp_path / "tasks"
    folder.mkdir()
    lines = [json.dumps({"context": random_words(seed, 10), "target": "w9"}) for seed in range(3)]
    (folder / "words.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "tiny_words.yaml").write_text(
        f"""task: tiny_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "words.jsonl"}
output_type: generate_until
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["w9"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return folder


@pytest.fixture(scope="session")
def default_model_and_tokenizer():
    """The real SmolLM2-135M-Instruct, loaded once per test session (converts the GGUF on first use)."""
    from hf_common import load_model_and_tokenizer

    return load_model_and_tokenizer()
