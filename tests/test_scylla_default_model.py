"""Scylla on the real default model (SmolLM2-135M-Instruct): lossless greedy, shared tensors, tokenizer check."""

from __future__ import annotations

import pytest
import torch

from hf_scylla import ScyllaDraftConfig, ScyllaDraftModel, generate
from hf_scylla.data import encode_prompt

pytestmark = pytest.mark.slow


def test_untrained_draft_is_lossless_on_the_default_model(default_model_and_tokenizer, tmp_path) -> None:
    target, tokenizer = default_model_and_tokenizer
    torch.manual_seed(0)
    draft = ScyllaDraftModel(ScyllaDraftConfig.from_target_config(target.config, 1, tokenizer)).eval()
    draft.attach_target(target, tokenizer)
    assert draft.lm_head.weight.data_ptr() == target.get_output_embeddings().weight.data_ptr()
    prompt = encode_prompt(tokenizer, "Name three colours.")
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    result = generate(target, draft, prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(result.output, plain)

    draft.save_pretrained(tmp_path)
    loaded = ScyllaDraftModel.from_pretrained(tmp_path, target=target, target_tokenizer=tokenizer)
    assert loaded.config.target_tokenizer_hash == draft.config.target_tokenizer_hash
    assert loaded.config.target_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
