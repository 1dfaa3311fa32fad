"""The committed draft for the default model (model_cards/SmolLM2-135M-Instruct-scylla-D1): complete,
small, carrying measured results, and lossless on the real target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_common.default_model import DEFAULT_MODEL_ID
from hf_common.demo import timed_chat_generation
from hf_scylla import CUSTOM_GENERATE_DIR, ScyllaDraftConfig, ScyllaDraftModel, generate
from hf_scylla.data import encode_prompt
from hf_scylla.demo import STAGED_DRAFT_NAME, find_staged_draft, scylla_chat
from hf_scylla.hub import STAGE_MANIFEST, check_staged_folder

FOLDER = Path(__file__).resolve().parents[1] / "model_cards" / STAGED_DRAFT_NAME
REPO_ID = f"hf-adamas-scylla-vrgd/{STAGED_DRAFT_NAME}"
MAX_WEIGHT_BYTES = 25 * 1024 * 1024


def test_demo_finds_the_staged_draft() -> None:
    assert find_staged_draft() == FOLDER
    assert find_staged_draft("no-such-draft") is None  # the demo then skips its Scylla step


def test_staged_folder_is_complete_and_small() -> None:
    files = {file.path: file.size for file in check_staged_folder(FOLDER, REPO_ID)}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert {"custom_generate/generate.py", "custom_generate/requirements.txt"} <= set(files)
    assert files["model.safetensors"] <= MAX_WEIGHT_BYTES
    config = ScyllaDraftConfig.from_pretrained(FOLDER)
    assert config.target_name_or_path == DEFAULT_MODEL_ID
    assert not config.save_embeddings


def test_staged_folder_carries_the_packaged_recipe_and_a_manifest() -> None:
    packaged = Path(CUSTOM_GENERATE_DIR) / "custom_generate" / "generate.py"
    assert (FOLDER / "custom_generate" / "generate.py").read_bytes() == packaged.read_bytes()
    manifest = json.loads((FOLDER / STAGE_MANIFEST).read_text())
    assert manifest["repo_name"] == REPO_ID
    assert set(manifest["files"]) == {file.path for file in check_staged_folder(FOLDER, REPO_ID)}


def test_model_card_holds_measured_tau_and_speedup() -> None:
    card = ModelCard.load(FOLDER / "README.md").data
    assert card.license == "apache-2.0"
    assert card.base_model == DEFAULT_MODEL_ID
    assert card.library_name == "transformers"
    assert "scylla" in card.tags and card.datasets
    metrics: dict[str, list[float]] = {}
    for result in card.eval_results:
        metrics.setdefault(result.metric_type, []).append(result.metric_value)
    # the bench's tau and speedup per prompt set (held-out ones included), and the lm-eval GSM8K run's
    # exact match, tau and speedup
    assert set(metrics) == {"mean_accepted_tokens", "speedup", "exact_match"}
    assert len(metrics["mean_accepted_tokens"]) == len(metrics["speedup"]) >= 3
    assert {"local/heldout", "openai/gsm8k"} <= {result.dataset_type for result in card.eval_results}
    assert min(metrics["mean_accepted_tokens"]) >= 1.0 and min(metrics["speedup"]) > 0
    assert {result.dataset_type for result in card.eval_results if result.metric_type == "exact_match"} == {
        "gsm8k_local"
    }


@pytest.mark.slow
def test_staged_draft_loads_and_decodes_losslessly(default_model_and_tokenizer) -> None:
    target, tokenizer = default_model_and_tokenizer
    draft = ScyllaDraftModel.from_pretrained(FOLDER, target=target, target_tokenizer=tokenizer).eval()
    assert draft.embed_tokens is target.get_input_embeddings()
    for question in ("What is 12 times 7? Explain step by step.", "Name three colours."):
        prompt = encode_prompt(tokenizer, question)
        plain = target.generate(prompt, max_new_tokens=32, do_sample=False)
        result = generate(target, draft, prompt, max_new_tokens=32, do_sample=False)
        assert torch.equal(result.output, plain)
        assert result.stats.tau >= 1.0 and result.stats.cycles > 0


@pytest.mark.slow
def test_demo_scylla_step_equals_greedy(default_model_and_tokenizer) -> None:
    target, tokenizer = default_model_and_tokenizer
    prompt = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"
    greedy = timed_chat_generation(target, tokenizer, prompt, 24, "greedy")
    result = scylla_chat(target, tokenizer, prompt, 24, FOLDER, greedy)
    assert result.lossless and result.token_ids == greedy.token_ids and result.text == greedy.text
    assert result.tau >= 1.0 and result.tokens_per_second > 0
