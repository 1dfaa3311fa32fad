"""The harder passkey test: varied haystack prompts, splits, the resumable ``hf-adamas passkey`` and its lm-eval task."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config
from lm_eval.tasks import TaskManager
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import hf_common.few_rows_linear
from hf_adamas import AdamasConfig
from hf_adamas.bench.evaluation import method_grid, run_decode_speed
from hf_adamas.bench.needle import NEEDLE_FORMATS, needle_prompt, sentence_pools
from hf_adamas.bench.passkey import passkey_trials, read_records
from hf_adamas.cli import _with_linear_kernel
from hf_adamas.cli import main as adamas_main
from hf_adamas.tasks import TASKS_DIR
from hf_common.data import SHARED_DATA_DIR
from hf_common.few_rows_linear import few_rows_linear_available

pytestmark = pytest.mark.skipif(
    not (SHARED_DATA_DIR / "gsm8k" / "test.jsonl").is_file(),
    reason="no shared data folder (haystack sources)",
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE, so any text round-trips (vocabulary 300, like the tiny model's)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(sentence_pools("tuning")["gsm8k"][:200]), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def test_splits_draw_from_disjoint_sources() -> None:
    tuning, heldout = sentence_pools("tuning"), sentence_pools("heldout")
    assert all(len(pool) > 500 for pool in (*tuning.values(), *heldout.values()))
    assert not set(tuning["gsm8k"]) & set(heldout["gsm8k"])  # GSM8K train vs test
    shared = set(tuning["stdlib"]) & set(heldout["stdlib"])  # other files: only stock phrases recur
    assert len(shared) < 0.02 * len(set(heldout["stdlib"]))
    with pytest.raises(ValueError, match="split must be one of"):
        sentence_pools("test")


@pytest.mark.parametrize("needle_format", sorted(NEEDLE_FORMATS))
def test_needle_prompt_fits_the_length_and_puts_the_needle_at_its_depth(
    tokenizer, needle_format: str
) -> None:
    trial = needle_prompt(tokenizer, 600, 0.25, needle_format, random.Random(1), "heldout")
    ids = trial.input_ids[0].tolist()
    assert 600 - 400 < len(ids) <= 600 and trial.answer.startswith(" ") and trial.answer.strip().isdigit()
    text = tokenizer.decode(ids)
    assert trial.answer.strip() in text
    needle_at = text.index(trial.answer.strip()) / len(text)
    assert 0.15 < needle_at < 0.35
    question = tokenizer.decode(ids[-trial.question_length :])
    assert question.strip().startswith("What")
    assert trial.info == {"haystack": "varied", "split": "heldout", "format": needle_format, "depth": 0.25}
    again = needle_prompt(tokenizer, 600, 0.25, needle_format, random.Random(1), "heldout")
    assert again.input_ids.equal(trial.input_ids)  # the same rng state, the same prompt


def test_needle_prompt_rejects_bad_input(tokenizer) -> None:
    with pytest.raises(ValueError, match="needle format"):
        needle_prompt(tokenizer, 600, 0.5, "riddle", random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        needle_prompt(tokenizer, 600, 1.5, "code", random.Random(0))
    with pytest.raises(ValueError, match="no room"):
        needle_prompt(tokenizer, 20, 0.5, "passkey", random.Random(0))


def test_trials_do_not_depend_on_how_many_are_drawn(tokenizer) -> None:
    few = dict(passkey_trials(tokenizer, "varied", [300], [0.5], ["code", "secret"], 2))
    many = dict(passkey_trials(tokenizer, "varied", [300], [0.5], ["code", "secret"], 4))
    assert set(few) == {"tuning/300/0", "heldout/300/0", "tuning/300/1", "heldout/300/1"}
    assert all(many[key].input_ids.equal(trial.input_ids) for key, trial in few.items())
    assert many["heldout/300/1"].info["format"] == "secret"


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer) -> Path:
    config = make_tiny_config("llama", vocab_size=300, num_hidden_layers=3, max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize(
    ("name", "selector", "calibration", "gqa_selection"),
    [
        ("adamas", "adamas", "fixed", "per_query_head"),
        ("adamas-calibrated", "adamas", "fixed", "per_query_head"),
        ("asymmetric-online", "adamas_asymmetric", "online", "per_query_head"),
        ("asymmetric-online-kvgroup", "adamas_asymmetric", "online", "shared_per_kv_group"),
        ("streaming_llm", "streaming_llm", "fixed", "per_query_head"),
        ("quest", "quest", "fixed", "per_query_head"),
    ],
)
def test_method_grid_maps_names_to_configs(name, selector, calibration, gqa_selection) -> None:
    calibrated = {"thresholds": [[-1.0, 0.0, 1.0]], "centroids": [[-2.0, -0.5, 0.5, 2.0]]}
    dense, *methods = method_grid(["dense", name], [16, 64], calibrated=calibrated)
    assert dense.config is None and [m.budget for m in methods] == [16, 64]
    config = methods[0].config
    assert (config.selector, config.calibration, config.gqa_selection) == (
        selector,
        calibration,
        gqa_selection,
    )
    assert (config.thresholds == calibrated["thresholds"]) == name.endswith("-calibrated")
    if name == "streaming_llm":
        assert config.sink_tokens == 4


@pytest.mark.parametrize(("name", "rescore_factor", "value_code_bits"), [
    ("asymmetric-online", 1, 0),
    ("asymmetric-online-rescore", 4, 0),
    ("asymmetric-online-tail2", 1, 2),
    ("asymmetric-online-tail4", 1, 4),
])  # fmt: skip
def test_method_grid_suffixes_set_the_second_stages(name, rescore_factor, value_code_bits) -> None:
    (method,) = method_grid([name], [64])
    assert (method.config.rescore_factor, method.config.value_code_bits) == (rescore_factor, value_code_bits)


def test_method_grid_sets_the_candidate_floor_when_asked() -> None:
    default = AdamasConfig().rescore_candidates
    assert [m.config.rescore_candidates for m in method_grid(["asymmetric-online", "adamas"], [64])] == [
        default
    ] * 2
    methods = method_grid(["asymmetric-online", "adamas"], [64], rescore_candidates=200)
    assert [m.config.candidate_pool for m in methods] == [200, 200]


def test_method_grid_names_the_bad_point() -> None:
    with pytest.raises(ValueError, match="unknown methods"):
        method_grid(["dense", "bogus"], [64])
    with pytest.raises(ValueError, match="method streaming_llm at budget 0"):
        method_grid(["streaming_llm"], [0])


def test_decode_speed_splits_sparse_tokens_and_runs_a_static_dense_baseline() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama")).eval()
    methods = method_grid(["dense", "dense-static", "asymmetric-online", "adamas"], [8])
    records = run_decode_speed(model, torch.randint(3, 128, (1, 40)), methods, steps=3, rounds=3)
    assert [r["method"] for r in records] == ["dense", "dense-static", "asymmetric-online", "adamas"]
    for record in records:  # the median of the methods' interleaved rounds
        assert len(record["round_ms_per_token"]) == 3
        assert record["ms_per_token"] == pytest.approx(statistics.median(record["round_ms_per_token"]))
    asymmetric, adamas = records[2:]
    assert asymmetric["fused_step_ms"] > 0 and asymmetric["selection_ms"] == asymmetric["attention_ms"] == 0
    assert adamas["selection_ms"] > 0 and adamas["attention_ms"] > 0 and adamas["fused_step_ms"] == 0
    for record in records[2:]:
        parts = record["selection_ms"] + record["attention_ms"] + record["fused_step_ms"] + record["rest_ms"]
        assert parts == pytest.approx(record["ms_per_token"])
    assert "selection_ms" not in records[1] and records[1]["tokens_per_second"] > 0


@pytest.mark.skipif(not few_rows_linear_available(), reason="hf_common.few_rows_linear is not built here")
def test_decode_speed_runs_a_method_on_the_one_row_linear_kernel(monkeypatch) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama")).eval()
    rows_served = []
    kernel = hf_common.few_rows_linear._kernel

    def counting_kernel(extension, inputs, weight, bias):
        rows_served.append(inputs.numel() // weight.shape[1])
        return kernel(extension, inputs, weight, bias)

    monkeypatch.setattr(hf_common.few_rows_linear, "_kernel", counting_kernel)
    plain, sparse = method_grid(["dense-static", "asymmetric-online"], [8])
    methods = _with_linear_kernel([plain, sparse], "both")
    assert [(m.name, m.few_rows_linear) for m in methods] == [
        ("dense-static", False), ("asymmetric-online", False),
        ("dense-static+few-rows-linear", True), ("asymmetric-online+few-rows-linear", True),
    ]  # fmt: skip
    records = run_decode_speed(model, torch.randint(3, 128, (1, 40)), methods, steps=3, rounds=2)
    linear_layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    # two kernel methods x (2 warm-up + 2 rounds x 3 steps) one-row steps, each through every layer
    assert rows_served == [1] * (2 * 8 * linear_layers)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert [r["method"] for r in records] == [m.name for m in methods]
    assert _with_linear_kernel([plain], "on")[0].few_rows_linear and _with_linear_kernel([plain], "off") == [
        plain
    ]


def test_passkey_command_resumes_and_refuses_to_replace_records(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "out"
    argv = ["passkey", "--model", str(model_dir), "--output-dir", str(out), "--lengths", "200", "--splits", "heldout",
            "--budgets", "16", "--methods", "dense", "asymmetric-online", "adamas"]  # fmt: skip
    assert adamas_main([*argv, "--trials", "2"]) == 0
    first = read_records(out / "passkey_varied_records.jsonl")
    assert [(r["trial"], r["method"]) for r in first[:3]] == [
        ("heldout/200/0", "dense"), ("heldout/200/0", "asymmetric-online"), ("heldout/200/0", "adamas"),
    ]  # fmt: skip
    assert len(first) == 6 and all(isinstance(r["correct"], bool) for r in first)
    assert adamas_main([*argv, "--trials", "3"]) == 2  # records exist, neither --resume nor --overwrite
    assert read_records(out / "passkey_varied_records.jsonl") == first
    assert adamas_main([*argv, "--trials", "3", "--resume"]) == 0
    records = read_records(out / "passkey_varied_records.jsonl")
    assert (
        records[:6] == first and {r["trial"] for r in records[6:]} == {"heldout/200/2"} and len(records) == 9
    )
    summary = json.loads((out / "passkey_varied.json").read_text())
    assert summary["command"].startswith("hf-adamas passkey") and len(summary["records"]) == 9
    assert (out / "passkey_varied_heldout.png").is_file()
    assert adamas_main([*argv, "--report-only"]) == 0  # rebuilds the summary, measures nothing
    assert read_records(out / "passkey_varied_records.jsonl") == records
    assert adamas_main([*argv, "--report-only", "--output-dir", str(tmp_path / "empty")]) == 2


def test_passkey_command_checks_arguments_before_loading(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    assert adamas_main(["passkey", "--model", missing, "--output-dir", str(tmp_path), "--depths", "2"]) == 2
    assert not any(tmp_path.iterdir())


def test_varied_passkey_task_builds_prompts_with_the_key(tmp_path: Path, tokenizer) -> None:
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"tokenizer": str(tmp_path / "tokenizer")})
    task = manager.load(["passkey_varied_2k"])["tasks"]["passkey_varied_2k"]
    docs = list(task.test_docs())
    assert len(docs) == 10 and all(doc["passkey"] in task.doc_to_text(doc) for doc in docs)
    assert all(2048 - 400 < doc["tokens"] <= 2048 for doc in docs)  # short by under a sentence
    assert task.process_results(docs[0], [f" {docs[0]['passkey']}."]) == {"acc": 1.0}
