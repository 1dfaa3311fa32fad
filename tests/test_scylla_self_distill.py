"""Self-distilled training data (issue 12 item 3): Magpie user turns and batched greedy answers,
journaled so an interrupted run resumes, saved as a `datasets` folder that training reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import word_tokenizer
from scylla_models import make_target

from hf_scylla.cli import main
from hf_scylla.data import read_conversations, read_journal, regenerate_responses
from hf_scylla.self_distill import (
    SelfDistillSettings,
    sample_user_turns,
    self_distilled_conversations,
    user_turn_prefix,
)

SETTINGS = SelfDistillSettings(user_turns=6, user_turn_tokens=6, response_tokens=4, batch_size=2)


@pytest.fixture(scope="module")
def target():
    return make_target(context_scale=0.3)


@pytest.fixture
def tokenizer():
    """Word tokenizer (eos ``w2``) with a system prefix ``w10 w11`` before each user turn."""
    backend = word_tokenizer(special_tokens=True)
    backend.chat_template = (
        "{% for m in messages %}w10 w11 {{ m['content'] }} w2 {% endfor %}"
        "{% if add_generation_prompt %}w3{% endif %}"
    )
    return backend


def count_generate_calls(target, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = target.generate
    monkeypatch.setattr(target, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_user_turn_prefix_is_the_template_before_the_users_words(tokenizer) -> None:
    assert user_turn_prefix(tokenizer) == "w10 w11 "
    tokenizer.chat_template = "{% for m in messages %}w10 {% endfor %}"  # drops the content
    with pytest.raises(ValueError, match="does not place the user's words"):
        user_turn_prefix(tokenizer)


def test_journal_drops_a_line_cut_by_an_interrupt_and_refuses_a_corrupt_one(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    journal.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_journal(journal) == [{"a": 1}, {"a": 2}]
    assert journal.read_text() == '{"a": 1}\n{"a": 2}\n'  # appends after it stay valid JSONL
    journal.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_journal(journal)
    assert read_journal(tmp_path / "absent.jsonl") == []


def test_sampled_turns_resume_after_an_interrupt_to_the_same_result(
    target, tokenizer, tmp_path: Path, monkeypatch
) -> None:
    whole = tmp_path / "whole.jsonl"
    turns = sample_user_turns(target, tokenizer, SETTINGS, whole)
    records = read_journal(whole)
    assert len(records) == SETTINGS.user_turns and {r["batch"] for r in records} == {0, 1, 2}
    assert turns == list(dict.fromkeys(r["turn"] for r in records if r["closed"] and r["turn"]))

    interrupted = tmp_path / "interrupted.jsonl"
    lines = whole.read_text().splitlines()
    interrupted.write_text("\n".join(lines[:4]) + "\n" + lines[4][:7])  # killed while writing batch 2
    calls = count_generate_calls(target, monkeypatch)
    assert sample_user_turns(target, tokenizer, SETTINGS, interrupted) == turns
    assert len(calls) == 1  # only the missing batch, with its own seed
    assert read_journal(interrupted) == records


def test_batched_answers_equal_one_at_a_time_answers(target, tokenizer) -> None:
    prompts = ["w5 w6", "w9 w10 w11 w12 w13", "w20"]
    one = regenerate_responses(target, tokenizer, prompts, max_new_tokens=4)
    batched = regenerate_responses(target, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    assert batched == one


def test_run_saves_a_dataset_that_training_reads_and_resumes_without_regenerating(
    target, tokenizer, tmp_path: Path, monkeypatch
) -> None:
    run = tmp_path / "run"
    seeds = ["w40 w41", "w50"]
    dataset = self_distilled_conversations(target, tokenizer, run, SETTINGS, seed_prompts=seeds)
    assert dataset.column_names == ["prompt", "response", "source"]
    assert dataset["prompt"][:2] == seeds and set(dataset["source"]) <= {"seed", "sampled"}
    assert all(dataset["response"])
    pairs = read_conversations(run / "dataset")
    assert pairs == list(zip(dataset["prompt"], dataset["response"], strict=True))
    assert read_conversations(run / "dataset", limit=1) == pairs[:1]

    calls = count_generate_calls(target, monkeypatch)
    again = self_distilled_conversations(target, tokenizer, run, SETTINGS, seed_prompts=seeds)
    assert again["prompt"] == dataset["prompt"] and not calls

    with pytest.raises(ValueError, match=r"other settings .*response_tokens"):
        changed = SelfDistillSettings(**{**SETTINGS.__dict__, "response_tokens": 5})
        self_distilled_conversations(target, tokenizer, run, changed, seed_prompts=seeds)
    with pytest.raises(ValueError, match=r"other settings .*seed_prompts"):
        self_distilled_conversations(target, tokenizer, run, SETTINGS, seed_prompts=["w60"])


def test_a_dataset_folder_not_made_by_a_run_is_never_replaced(target, tokenizer, tmp_path: Path) -> None:
    foreign = tmp_path / "run" / "dataset"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not made by a self-distillation run"):
        self_distilled_conversations(target, tokenizer, tmp_path / "run", SETTINGS)
    assert (foreign / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--seed-samples", "0"], "--seed-samples must be >= 1"),
        (["--seed-prompts", "missing.jsonl"], "pass another with --seed-prompts"),
    ],
)
def test_make_data_rejects_bad_arguments_before_loading_the_model(
    tmp_path: Path, arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["make-data", "--model", str(tmp_path / "no-target"), "--output-dir", str(tmp_path / "out")]
    assert main([*command, *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_settings_file_records_what_the_run_was_made_with(target, tokenizer, tmp_path: Path) -> None:
    self_distilled_conversations(target, tokenizer, tmp_path, SETTINGS, ["w5"], target_name="tiny")
    recorded = json.loads((tmp_path / "settings.json").read_text())
    assert recorded["target"] == "tiny" and recorded["response_tokens"] == 4 and recorded["seed"] == 0
    assert torch.is_tensor(target.model.embed_tokens.weight)  # the target itself is untouched


def test_reduced_head_corpus_counts_text_jsonl_and_a_dataset_folder_alike(
    target, tokenizer, tmp_path: Path
) -> None:
    from hf_scylla.bench.verify_cost import training_token_counts

    text, jsonl = tmp_path / "text.txt", tmp_path / "chats.jsonl"
    text.write_text("w47 w47 w58")
    jsonl.write_text(json.dumps({"question": "w69", "answer": "w72 w72"}) + "\n")
    dataset = self_distilled_conversations(target, tokenizer, tmp_path / "run", SETTINGS, seed_prompts=["w5"])
    counts = training_token_counts(tokenizer, [text, jsonl, tmp_path / "run" / "dataset"])
    assert counts[47] == 2 and counts[58] == 1 and counts[72] >= 2
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        for p, r in [("w69", "w72 w72"), *zip(dataset["prompt"], dataset["response"], strict=True)]
    ]
    assert int(counts.sum()) == 3 + sum(len(ids) for ids in chats)


def test_a_run_that_yields_no_conversation_says_why(target, tokenizer, tmp_path: Path) -> None:
    cut_short = SelfDistillSettings(user_turns=2, user_turn_tokens=1, response_tokens=2, batch_size=2)
    with pytest.raises(ValueError, match="no conversation to save"):
        self_distilled_conversations(target, tokenizer, tmp_path, cut_short)
    assert not (tmp_path / "dataset").exists()


def test_a_corrupt_dataset_shard_is_a_clear_error(target, tokenizer, tmp_path: Path, capsys) -> None:
    self_distilled_conversations(target, tokenizer, tmp_path / "run", SETTINGS, ["w5"])
    (shard,) = (tmp_path / "run" / "dataset").glob("*.arrow")
    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(ValueError, match="not a readable datasets folder"):
        read_conversations(tmp_path / "run" / "dataset")
    command = ["train", "--model", str(tmp_path / "no-target"), "--data", str(tmp_path / "run" / "dataset")]
    assert main([*command, "--output-dir", str(tmp_path / "out")]) == 2
    assert "a shard is corrupt or missing" in capsys.readouterr().err
