"""lm-eval integration: model registration, model_args, hf-scylla / hf-adamas against plain hf, tasks, cards, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria
from lm_eval.tasks import TaskManager
from scylla_models import make_draft, make_target
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import hf_adamas
import hf_scylla  # noqa: F401  (registers hf-scylla)
from hf_adamas.cli import main as adamas_main
from hf_adamas.evaluation import PASSKEY_FILLER
from hf_adamas.harness import AdamasLM
from hf_common.harness import TASKS_DIR, harness_eval_results, write_card_results
from hf_common.tasks.local_tasks import gsm8k_dataset, tinyshakespeare_dataset
from hf_scylla.cli import main as scylla_main
from hf_scylla.harness import ScyllaLM, StopStrings, speculative_eval_results
from hf_scylla.hub import stage_draft

WORDS = [f"w{index}" for index in range(128)]
LOCAL_TASKS = [
    "gsm8k_local",
    "passkey_2k",
    "passkey_4k",
    "passkey_8k",
    "passkey_local",
    "tinyshakespeare_ppl",
]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``w0..w127`` (pad w0, bos w1, eos w2), matching the tiny models' ids."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def target_dir(tmp_path: Path) -> Path:
    """A tiny Llama (head_dim 16) that the oracle draft mostly predicts, saved with its tokenizer."""
    return save_model(make_target(context_scale=0.3), tmp_path / "target")


@pytest.fixture
def draft_dir(tmp_path: Path, target_dir: Path) -> Path:
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    folder = tmp_path / "draft"
    make_draft(target, oracle=True).save_pretrained(folder)
    return folder


def plain_hflm(folder: Path) -> HFLM:
    """lm-eval's own ``hf`` model on the same checkpoint (sdpa attention), the reference."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    return HFLM(pretrained=model, tokenizer=word_tokenizer(), batch_size=1)


def generate_requests(contexts: list[str], until: list[str], max_gen_toks: int = 24) -> list[Instance]:
    gen_kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    return [
        Instance(request_type="generate_until", doc={}, arguments=(context, dict(gen_kwargs)), idx=index)
        for index, context in enumerate(contexts)
    ]


def words(seed: int, count: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(4, 128, (count,), generator=generator))


# ---------------------------------------------------------------- registration and model_args


def test_importing_the_packages_registers_the_model_types() -> None:
    assert get_model("hf-adamas") is AdamasLM
    assert get_model("hf-scylla") is ScyllaLM
    assert issubclass(AdamasLM, HFLM) and issubclass(ScyllaLM, HFLM)
    assert get_model("hf") is HFLM  # lm-eval's built-in types are still there


def test_registration_does_not_import_the_model_classes() -> None:
    code = (
        "import sys, hf_adamas, hf_scylla\n"
        "from lm_eval.api.registry import model_registry\n"
        "assert 'hf-adamas' in model_registry and 'hf-scylla' in model_registry\n"
        "print(sorted(m for m in ('lm_eval.models.huggingface', 'hf_adamas.harness', 'hf_scylla.harness') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_adamas_model_args_become_the_adamas_config(target_dir: Path) -> None:
    lm = AdamasLM.create_from_arg_string(
        f"pretrained={target_dir},token_budget=32,selector=quest,dense_layers=1,decode_scoring=False",
        {"batch_size": 1, "device": "cpu"},
    )
    assert lm.model.config._attn_implementation == "adamas"
    assert (lm.adamas_config.token_budget, lm.adamas_config.selector) == (32, "quest")
    assert lm.model.config.adamas_config["dense_layers"] == 1
    assert lm.decode_scoring is False
    assert lm.get_model_info()["adamas"]["token_budget"] == 32


def test_adamas_keeps_the_settings_saved_with_the_model(tmp_path: Path, target_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    hf_adamas.apply_adamas(model, hf_adamas.AdamasConfig(token_budget=48, sink_tokens=2, dense_layers=1))
    folder = save_model(model, tmp_path / "adamas")
    lm = AdamasLM(pretrained=str(folder), recent_tokens=3)
    assert (lm.adamas_config.token_budget, lm.adamas_config.sink_tokens) == (48, 2)
    assert lm.adamas_config.recent_tokens == 3


@pytest.mark.parametrize("model_type", ["hf-adamas", "hf-scylla"])
def test_unknown_model_args_are_refused(model_type: str, target_dir: Path, draft_dir: Path) -> None:
    extra = f",draft={draft_dir}" if model_type == "hf-scylla" else ""
    with pytest.raises(ValueError, match=rf"Unknown --model_args for {model_type}: \['token_budgt'\]"):
        get_model(model_type).create_from_arg_string(f"pretrained={target_dir},token_budgt=64{extra}")


def test_bad_adamas_value_names_the_field(target_dir: Path) -> None:
    with pytest.raises(ValueError, match="token_budget"):
        AdamasLM(pretrained=str(target_dir), token_budget=0)
    with pytest.raises(ValueError, match="selector"):
        AdamasLM(pretrained=str(target_dir), selector="nearest")


# ---------------------------------------------------------------- hf-scylla


def test_stop_strings_sees_a_stop_inside_an_accepted_chunk() -> None:
    tokenizer = word_tokenizer()
    ids = torch.tensor([[5, 6, 9, 7, 8, 10, 11, 12]])  # prompt w5 w6; then six tokens accepted in one cycle
    assert bool(StopStrings(tokenizer, ["w7"], prompt_length=2)(ids, None)[0])
    assert not bool(StopStrings(tokenizer, ["w40"], prompt_length=2)(ids, None)[0])
    # lm-eval's own check only decodes the last few tokens, so it misses it
    assert not bool(stop_sequences_criteria(tokenizer, ["w7"], 2, 1)(ids, None)[0])


def test_scylla_generate_until_equals_plain_hf_greedy(target_dir: Path, draft_dir: Path) -> None:
    contexts = [words(seed, 12) for seed in range(4)]
    until = ["w9", "w17"]
    expected = plain_hflm(target_dir).generate_until(generate_requests(contexts, until))
    lm = ScyllaLM(pretrained=str(target_dir), draft=str(draft_dir), baseline=True, device="cpu")
    assert lm.generate_until(generate_requests(contexts, until)) == expected
    stats = lm.get_model_info()["scylla"]
    assert stats["requests"] == len(contexts)
    assert stats["tau"] > 1.0  # the oracle draft gets whole chunks accepted
    assert stats["outputs_equal_to_baseline"] == len(contexts)
    assert stats["tokens_per_second"] > 0 and stats["baseline_tokens_per_second"] > 0
    assert stats["speedup"] == pytest.approx(stats["tokens_per_second"] / stats["baseline_tokens_per_second"])


def test_scylla_refuses_a_draft_for_another_target(tmp_path: Path, target_dir: Path) -> None:
    other = make_target(head_dim=32)  # hidden size 64, not 32
    folder = tmp_path / "other-draft"
    make_draft(other).save_pretrained(folder)
    with pytest.raises(ValueError, match="hidden size"):
        ScyllaLM(pretrained=str(target_dir), draft=str(folder))


def test_scylla_needs_a_draft_folder_and_batch_size_one(
    tmp_path: Path, target_dir: Path, draft_dir: Path
) -> None:
    with pytest.raises(ValueError, match="needs a draft"):
        ScyllaLM(pretrained=str(target_dir))
    with pytest.raises(ValueError, match="neither a folder"):
        ScyllaLM(pretrained=str(target_dir), draft=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="batch_size=4"):
        ScyllaLM(pretrained=str(target_dir), draft=str(draft_dir), batch_size=4)


# ---------------------------------------------------------------- hf-adamas


def loglikelihood_requests(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=index)
        for index, pair in enumerate(pairs)
    ]


def test_adamas_loglikelihood_equals_sdpa_when_the_budget_covers_the_sequence(target_dir: Path) -> None:
    pairs = [(words(seed, 60), " " + words(seed + 100, 8)) for seed in range(3)]
    expected = [score for score, _ in plain_hflm(target_dir).loglikelihood(loglikelihood_requests(pairs))]
    covered = AdamasLM(pretrained=str(target_dir), token_budget=128, dense_layers=0, batch_size=2)
    scores = [score for score, _ in covered.loglikelihood(loglikelihood_requests(pairs))]
    assert scores == pytest.approx(expected, abs=1e-4)
    # a budget below the length is scored through sparse decode steps, and differs
    sparse = AdamasLM(pretrained=str(target_dir), token_budget=8, dense_layers=0, batch_size=2)
    sparse_scores = [score for score, _ in sparse.loglikelihood(loglikelihood_requests(pairs))]
    assert max(abs(a - b) for a, b in zip(sparse_scores, expected, strict=True)) > 1e-3
    # without decode scoring, one forward: dense prefill, the same as sdpa at any budget
    one_forward = AdamasLM(pretrained=str(target_dir), token_budget=8, dense_layers=0, decode_scoring=False)
    assert [s for s, _ in one_forward.loglikelihood(loglikelihood_requests(pairs))] == pytest.approx(
        expected, abs=1e-5
    )


def test_adamas_rolling_loglikelihood_equals_sdpa_when_the_budget_covers_it(target_dir: Path) -> None:
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(words(seed, 90),), idx=seed)
        for seed in range(2)
    ]
    expected = plain_hflm(target_dir).loglikelihood_rolling(requests)
    lm = AdamasLM(pretrained=str(target_dir), token_budget=256, dense_layers=0)
    assert lm.loglikelihood_rolling(requests) == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- tasks


def byte_level_tokenizer_dir(folder: Path) -> Path:
    """A small byte-level BPE trained on the passkey text, so prompts decode back to the same text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([PASSKEY_FILLER * 4, "The pass key is 12345. Remember it."], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(folder)
    return folder


def test_local_task_yamls_are_registered() -> None:
    manager = TaskManager(include_path=str(TASKS_DIR))
    assert set(LOCAL_TASKS) <= set(manager.all_tasks)


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


@pytest.mark.skipif(not (TASKS_DIR.parents[2] / "shared" / "data").is_dir(), reason="no shared data folder")
def test_gsm8k_and_shakespeare_tasks_read_the_shared_data() -> None:
    manager = TaskManager(include_path=str(TASKS_DIR))
    tasks = manager.load(["gsm8k_local", "tinyshakespeare_ppl"])["tasks"]
    gsm8k = tasks["gsm8k_local"]
    docs = list(gsm8k.test_docs())
    assert len(docs) == 1319 and "####" in docs[0]["answer"]
    assert gsm8k.doc_to_text(docs[0]).startswith("Question: ")
    shakespeare = list(tasks["tinyshakespeare_ppl"].test_docs())
    assert [len(doc["text"]) for doc in shakespeare] == [8000] * 4
    assert shakespeare[0]["text"].startswith("First Citizen:")


def test_missing_data_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gsm8k" / "train.jsonl"))):
        gsm8k_dataset(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "text" / "tinyshakespeare.txt"))):
        tinyshakespeare_dataset(data_dir=tmp_path)
    # the same through lm-eval: --metadata data_dir=... reaches the dataset builder
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"gsm8k/train\.jsonl"):
        manager.load(["gsm8k_local"])


# ---------------------------------------------------------------- the eval command and model cards


@pytest.fixture
def word_task_dir(tmp_path: Path) -> Path:
    """A user task (via --include_path, next to ours): continue a word sequence until w9."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    lines = [json.dumps({"context": words(seed, 10), "target": "w9"}) for seed in range(3)]
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


def test_scylla_eval_command_writes_results_and_the_card(
    tmp_path: Path, target_dir: Path, draft_dir: Path, word_task_dir: Path
) -> None:
    stage_draft(
        make_draft(AutoModelForCausalLM.from_pretrained(target_dir), oracle=True),
        word_tokenizer(),
        tmp_path / "staged",
        repo_name="org/tiny-draft",
        base_model="org/tiny-target",
    )
    code = scylla_main(
        [
            "eval",
            "--model_args",
            f"pretrained={target_dir},baseline=True",
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


def test_adamas_eval_command_on_a_local_task(tmp_path: Path, target_dir: Path, word_task_dir: Path) -> None:
    code = adamas_main(
        [
            "eval",
            "--model_args",
            f"pretrained={target_dir},token_budget=16,dense_layers=1",
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


def lm_eval_results(value: float, tau: float | None = None) -> dict:
    """The parts of an lm-eval results dict the card writer reads."""
    config = {"model": "hf-scylla", "model_args": {"draft": "d"}, "limit": 5}
    if tau is not None:
        config["scylla"] = {"tau": tau, "tokens_per_second": 3.0}
    return {
        "results": {
            "gsm8k_local": {
                "alias": "gsm8k_local",
                "exact_match,flexible-extract": value,
                "exact_match_stderr,flexible-extract": 0.1,
            }
        },
        "n-samples": {"gsm8k_local": {"original": 1319, "effective": 5}},
        "config": config,
        "lm_eval_version": "0.4.13",
    }


def test_card_needs_an_output_path(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--card needs --output_path"):
        adamas_main(["eval", "--tasks", "tinyshakespeare_ppl", "--card", str(tmp_path)])


def test_card_entries_are_replaced_not_duplicated(tmp_path: Path) -> None:
    earlier = lm_eval_results(0.2, tau=1.4)
    earlier["n-samples"]["gsm8k_local"]["effective"] = 3
    write_card_results(tmp_path, earlier)
    results = lm_eval_results(0.4, tau=1.6)
    readme = write_card_results(tmp_path, results, extra_eval_results=speculative_eval_results(results))
    card = ModelCard.load(readme)
    values = {(entry.dataset_type, entry.metric_type): entry.metric_value for entry in card.data.eval_results}
    assert values == {("gsm8k_local", "exact_match"): 0.4, ("gsm8k_local", "mean_accepted_tokens"): 1.6}
    assert card.text.count("lm-eval results: begin") == 1
    assert "| gsm8k_local | exact_match | flexible-extract | 0.4 | 0.1 | 5 |" in card.text
    (entry,) = harness_eval_results(results)
    assert (entry.metric_name, entry.dataset_args) == ("exact_match (flexible-extract)", {"samples": 5})
