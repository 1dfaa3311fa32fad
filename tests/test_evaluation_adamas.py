"""The ``hf-adamas`` lm-eval backend: model_args, scores against plain ``hf``, the passkey tasks, ``eval``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import lm_eval_requests, plain_hflm, random_words, save_with_tokenizer
from huggingface_hub import ModelCard
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import hf_adamas
from hf_adamas.bench.evaluation import PASSKEY_FILLER
from hf_adamas.cli import main as adamas_main
from hf_adamas.lm_eval import AdamasLM
from hf_adamas.tasks import TASKS_DIR


def test_adamas_model_args_become_the_adamas_config(tiny_target_dir: Path) -> None:
    lm = AdamasLM.create_from_arg_string(
        f"pretrained={tiny_target_dir},token_budget=32,selector=quest,dense_layers=1,decode_scoring=False",
        {"batch_size": 1, "device": "cpu"},
    )
    assert lm.model.config._attn_implementation == "adamas"
    assert (lm.adamas_config.token_budget, lm.adamas_config.selector) == (32, "quest")
    assert lm.model.config.adamas_config["dense_layers"] == 1
    assert lm.decode_scoring is False
    assert lm.get_model_info()["adamas"]["token_budget"] == 32


def test_adamas_keeps_the_settings_saved_with_the_model(tmp_path: Path, tiny_target_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    hf_adamas.apply_adamas(model, hf_adamas.AdamasConfig(token_budget=48, sink_tokens=2, dense_layers=1))
    folder = save_with_tokenizer(model, tmp_path / "adamas")
    lm = AdamasLM(pretrained=str(folder), recent_tokens=3)
    assert (lm.adamas_config.token_budget, lm.adamas_config.sink_tokens) == (48, 2)
    assert lm.adamas_config.recent_tokens == 3


def test_bad_adamas_value_names_the_field(tiny_target_dir: Path) -> None:
    with pytest.raises(ValueError, match="token_budget"):
        AdamasLM(pretrained=str(tiny_target_dir), token_budget=0)
    with pytest.raises(ValueError, match="selector"):
        AdamasLM(pretrained=str(tiny_target_dir), selector="nearest")


def test_unknown_model_args_are_refused(tiny_target_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown --model_args for hf-adamas: \['token_budgt'\]"):
        get_model("hf-adamas").create_from_arg_string(f"pretrained={tiny_target_dir},token_budgt=64")


# ---------------------------------------------------------------- scores against plain hf


def test_adamas_loglikelihood_equals_sdpa_when_the_budget_covers_the_sequence(tiny_target_dir: Path) -> None:
    pairs = [(random_words(seed, 60), " " + random_words(seed + 100, 8)) for seed in range(3)]
    expected = [
        score
        for score, _ in plain_hflm(tiny_target_dir).loglikelihood(lm_eval_requests("loglikelihood", pairs))
    ]
    covered = AdamasLM(pretrained=str(tiny_target_dir), token_budget=128, dense_layers=0, batch_size=2)
    scores = [score for score, _ in covered.loglikelihood(lm_eval_requests("loglikelihood", pairs))]
    assert scores == pytest.approx(expected, abs=1e-4)
    # a budget below the length is scored through sparse decode steps, and differs
    sparse = AdamasLM(pretrained=str(tiny_target_dir), token_budget=8, dense_layers=0, batch_size=2)
    sparse_scores = [score for score, _ in sparse.loglikelihood(lm_eval_requests("loglikelihood", pairs))]
    assert max(abs(a - b) for a, b in zip(sparse_scores, expected, strict=True)) > 1e-3
    # without decode scoring, one forward: dense prefill, the same as sdpa at any budget
    one_forward = AdamasLM(
        pretrained=str(tiny_target_dir), token_budget=8, dense_layers=0, decode_scoring=False
    )
    assert [
        s for s, _ in one_forward.loglikelihood(lm_eval_requests("loglikelihood", pairs))
    ] == pytest.approx(expected, abs=1e-5)


def test_adamas_rolling_loglikelihood_equals_sdpa_when_the_budget_covers_it(tiny_target_dir: Path) -> None:
    requests = lm_eval_requests("loglikelihood_rolling", [(random_words(seed, 90),) for seed in range(2)])
    expected = plain_hflm(tiny_target_dir).loglikelihood_rolling(requests)
    lm = AdamasLM(pretrained=str(tiny_target_dir), token_budget=256, dense_layers=0)
    assert lm.loglikelihood_rolling(requests) == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- the passkey tasks


def byte_level_tokenizer_dir(folder: Path) -> Path:
    """A small byte-level BPE trained on the passkey text, so prompts decode back to the same text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([PASSKEY_FILLER * 4, "The pass key is 12345. Remember it."], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(folder)
    return folder


def test_passkey_task_builds_prompts_with_the_key(tmp_path: Path) -> None:
    tokenizer_dir = byte_level_tokenizer_dir(tmp_path / "tokenizer")
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"tokenizer": str(tokenizer_dir)})
    task = manager.load(["passkey_2k"])["tasks"]["passkey_2k"]
    docs = list(task.test_docs())
    assert len(docs) == 10
    assert all(doc["passkey"] in task.doc_to_text(doc) for doc in docs)
    assert all(abs(doc["tokens"] - 2048) < 40 for doc in docs)
    assert task.process_results(docs[0], [f" {docs[0]['passkey']}."]) == {"acc": 1.0}
    assert task.process_results(docs[0], [" 00000"]) == {"acc": 0.0}


# ---------------------------------------------------------------- the eval command


def test_adamas_eval_command_on_a_local_task(
    tmp_path: Path, tiny_target_dir: Path, word_task_dir: Path
) -> None:
    code = adamas_main(
        [
            "eval",
            "--model_args",
            f"pretrained={tiny_target_dir},token_budget=16,dense_layers=1",
            "--tasks",
            "tiny_words",
            "--include_path",
            str(word_task_dir),
            "--output_path",
            str(tmp_path / "out.json"),
            "--card",
            str(tmp_path / "card"),
        ]
    )
    assert code == 0
    (results_file,) = tmp_path.glob("out_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["adamas"]["token_budget"] == 16
    card = ModelCard.load(tmp_path / "card" / "README.md")
    assert [entry.metric_type for entry in card.data.eval_results] == ["exact_match"]
