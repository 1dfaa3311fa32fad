"""lm-eval glue of hf_common: the registry, the tasks without method code, results into model cards."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import hf_adamas.tasks
import hf_scylla.hub
from hf_adamas.cli import main as adamas_main
from hf_common.harness import (
    LM_EVAL_MODELS,
    TASKS_DIR,
    harness_eval_results,
    register_lm_eval_model,
    register_lm_eval_tasks,
    registered_task_dirs,
    write_card_results,
)
from hf_common.tasks.local_tasks import gsm8k_dataset, tinyshakespeare_dataset
from hf_scylla.lm_eval import speculative_eval_results

# ---------------------------------------------------------------- the registry


def test_importing_the_packages_registers_the_model_types() -> None:
    assert get_model("hf-adamas").__name__ == "AdamasLM"
    assert get_model("hf-scylla").__name__ == "ScyllaLM"
    assert get_model("hf") is HFLM  # lm-eval's built-in types are still there
    assert LM_EVAL_MODELS["hf-scylla"].card_folder_arg == "draft"
    assert hf_adamas.tasks.TASKS_DIR in registered_task_dirs()
    assert registered_task_dirs()[0] == TASKS_DIR


def test_registration_does_not_import_the_model_classes() -> None:
    code = (
        "import sys, hf_adamas, hf_scylla\n"
        "from lm_eval.api.registry import model_registry\n"
        "assert 'hf-adamas' in model_registry and 'hf-scylla' in model_registry\n"
        "print(sorted(m for m in ('lm_eval.models.huggingface', 'hf_adamas.lm_eval', 'hf_scylla.lm_eval') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_registration_refuses_bad_names_and_a_second_target(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lowercase"):
        register_lm_eval_model("HF-Mine", "pkg.module:Class")
    with pytest.raises(ValueError, match="'module:Class'"):
        register_lm_eval_model("hf-mine", "pkg.module.Class")
    with pytest.raises(ValueError, match=r"already registered as hf_scylla\.lm_eval:ScyllaLM"):
        register_lm_eval_model("hf-scylla", "other.module:ScyllaLM")
    with pytest.raises(ValueError, match="no such task folder"):
        register_lm_eval_tasks(tmp_path / "missing")
    assert "hf-mine" not in LM_EVAL_MODELS


# ---------------------------------------------------------------- tasks


def test_local_task_yamls_are_registered() -> None:
    manager = TaskManager(include_path=[str(folder) for folder in registered_task_dirs()])
    assert {"gsm8k_local", "tinyshakespeare_ppl", "passkey_2k", "passkey_local"} <= set(manager.all_tasks)
    # the ground floor alone has the tasks that need no method code
    assert {path.stem for path in TASKS_DIR.glob("*.yaml")} == {"gsm8k_local", "tinyshakespeare_ppl"}


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


# ---------------------------------------------------------------- model cards


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
    # the registered card_notes hook of hf-scylla writes its line under the table
    assert "Speculative decoding during these tasks: tau 1.6, tokens_per_second 3." in card.text
    (entry,) = harness_eval_results(results)
    assert (entry.metric_name, entry.dataset_args) == ("exact_match (flexible-extract)", {"samples": 5})


def test_card_placeholder_of_a_registered_package_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(
        f"---\nlibrary_name: transformers\n---\n\n# d\n\n## Results\n\n"
        f"{hf_scylla.hub.RESULTS_PLACEHOLDER}\n\nKept line.\n\n## Usage\n\nuse it\n"
    )
    card = ModelCard.load(write_card_results(tmp_path, lm_eval_results(0.5)))
    assert hf_scylla.hub.RESULTS_PLACEHOLDER not in card.text
    assert "Kept line." in card.text and "## Usage\n\nuse it" in card.text
    assert card.text.index("lm-eval results: begin") < card.text.index("Kept line.")
