"""The ``hf-scylla`` lm-eval backend: generation equal to plain ``hf`` greedy, draft checks, ``eval --card``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import generate_requests, plain_hflm, random_words, word_tokenizer
from huggingface_hub import ModelCard
from lm_eval.api.registry import get_model
from lm_eval.models.utils_hf import stop_sequences_criteria
from scylla_models import make_draft, make_target
from transformers import AutoModelForCausalLM

from hf_scylla.cli import main as scylla_main
from hf_scylla.hub import stage_draft
from hf_scylla.lm_eval import ScyllaLM, StopStrings


def test_unknown_model_args_are_refused(tiny_target_dir: Path, tiny_draft_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown --model_args for hf-scylla: \['token_budgt'\]"):
        get_model("hf-scylla").create_from_arg_string(
            f"pretrained={tiny_target_dir},token_budgt=64,draft={tiny_draft_dir}"
        )


def test_stop_strings_sees_a_stop_inside_an_accepted_chunk() -> None:
    tokenizer = word_tokenizer(special_tokens=True)
    ids = torch.tensor([[5, 6, 9, 7, 8, 10, 11, 12]])  # prompt w5 w6; then six tokens accepted in one cycle
    assert bool(StopStrings(tokenizer, ["w7"], prompt_length=2)(ids, None)[0])
    assert not bool(StopStrings(tokenizer, ["w40"], prompt_length=2)(ids, None)[0])
    # lm-eval's own check only decodes the last few tokens, so it misses it
    assert not bool(stop_sequences_criteria(tokenizer, ["w7"], 2, 1)(ids, None)[0])


@pytest.mark.parametrize("lookup_tokens", [None, 4])
def test_scylla_generate_until_equals_plain_hf_greedy(
    tiny_target_dir: Path, tiny_draft_dir: Path, lookup_tokens: int | None
) -> None:
    contexts = [" ".join([random_words(seed, 6)] * 2) for seed in range(4)]  # repeats: lookup has matches
    until = ["w9", "w17"]
    expected = plain_hflm(tiny_target_dir).generate_until(generate_requests(contexts, until))
    arguments = f"pretrained={tiny_target_dir},draft={tiny_draft_dir},baseline=True,device=cpu"
    if lookup_tokens is not None:
        arguments += f",lookup_tokens={lookup_tokens}"
    lm = get_model("hf-scylla").create_from_arg_string(arguments)
    assert lm.generate_until(generate_requests(contexts, until)) == expected
    stats = lm.get_model_info()["scylla"]
    assert stats["lookup_tokens"] == (lookup_tokens or 0)
    assert (stats["lookup_cycles"] > 0) == bool(lookup_tokens)
    assert stats["requests"] == len(contexts)
    assert stats["tau"] > 1.0  # the oracle draft gets whole chunks accepted
    assert stats["outputs_equal_to_baseline"] == len(contexts)
    assert stats["tokens_per_second"] > 0 and stats["baseline_tokens_per_second"] > 0
    assert stats["speedup"] == pytest.approx(stats["tokens_per_second"] / stats["baseline_tokens_per_second"])


def test_scylla_refuses_a_draft_for_another_target(tmp_path: Path, tiny_target_dir: Path) -> None:
    other = make_target(head_dim=32)  # hidden size 64, not 32
    folder = tmp_path / "other-draft"
    make_draft(other).save_pretrained(folder)
    with pytest.raises(ValueError, match="hidden size"):
        ScyllaLM(pretrained=str(tiny_target_dir), draft=str(folder))


def test_scylla_needs_a_draft_folder_and_batch_size_one(
    tmp_path: Path, tiny_target_dir: Path, tiny_draft_dir: Path
) -> None:
    with pytest.raises(ValueError, match="needs a draft"):
        ScyllaLM(pretrained=str(tiny_target_dir))
    with pytest.raises(ValueError, match="neither a folder"):
        ScyllaLM(pretrained=str(tiny_target_dir), draft=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="batch_size=4"):
        ScyllaLM(pretrained=str(tiny_target_dir), draft=str(tiny_draft_dir), batch_size=4)


# ---------------------------------------------------------------- the eval command and the card


def test_scylla_eval_command_writes_results_and_the_card(
    tmp_path: Path, tiny_target_dir: Path, tiny_draft_dir: Path, word_task_dir: Path
) -> None:
    stage_draft(
        make_draft(AutoModelForCausalLM.from_pretrained(tiny_target_dir), oracle=True),
        word_tokenizer(special_tokens=True),
        tmp_path / "staged",
        repo_name="org/tiny-draft",
        base_model="org/tiny-target",
    )
    code = scylla_main(
        [
            "eval",
            "--model_args",
            f"pretrained={tiny_target_dir},baseline=True",
            "--device",
            "cpu",
            "--tasks",
            "tiny_words",
            "--include_path",
            str(word_task_dir),
            "--output_path",
            str(tmp_path / "out"),
            "--card",
            str(tmp_path / "staged"),
        ]
    )
    assert code == 0
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "hf-scylla"
    assert results["config"]["scylla"]["outputs_equal_to_baseline"] == 3
    assert results["config"]["scylla"]["draft"] == str(tmp_path / "staged")
    card = ModelCard.load(tmp_path / "staged" / "README.md")
    metrics = {(entry.dataset_type, entry.metric_type) for entry in card.data.eval_results}
    assert ("tiny_words", "exact_match") in metrics
    assert ("tiny_words", "mean_accepted_tokens") in metrics
    assert "Not evaluated yet" not in card.text
    assert "| tiny_words | exact_match |" in card.text
    assert "## Usage" in card.text and "## Limitations" in card.text  # the staged card is kept
