"""``hf-vrgd lm``: the by-file split, the token cache key, resume, the overwrite rule and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_vrgd.bench.lm_experiment import (
    REPORT_STEM,
    RunSpec,
    corpus_key,
    run_plan,
    split_python_files,
    tokenize_files,
)
from hf_vrgd.cli import main

PYTHON_LINES = ["import os\n", "def f(x):\n    return x + 1\n", "class A:\n    pass\n", "print('hello')\n"]


def _corpus(root: Path, files: int = 20) -> tuple[Path, Path]:
    """A small text file and ``files`` Python files, enough tokens for the tiny run."""
    python_dir = root / "py"
    python_dir.mkdir()
    for index in range(files):
        lines = [PYTHON_LINES[(index + j) % len(PYTHON_LINES)] for j in range(12)]
        (python_dir / f"mod{index:02d}.py").write_text(f"# module {index}\n" + "".join(lines))
    text = root / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 60)
    return text, python_dir


def _tokenizer(root: Path, text: Path, python_dir: Path) -> Path:
    """A tiny byte-level BPE tokenizer trained on the corpus, saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    paths = [str(text), *(str(p) for p in sorted(python_dir.glob("*.py")))]
    backend.train(paths, trainer)
    folder = root / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(folder)
    return folder


def test_python_split_is_by_file_and_disjoint(tmp_path: Path) -> None:
    _, python_dir = _corpus(tmp_path, files=23)
    files = list(python_dir.glob("*.py"))
    splits = split_python_files(files)
    names = {split: {p.name for p in paths} for split, paths in splits.items()}
    assert names["train"].isdisjoint(names["test"]) and names["train"].isdisjoint(names["validation"])
    assert names["validation"].isdisjoint(names["test"])
    assert set().union(*names.values()) == {p.name for p in files}
    assert names["test"] == {"mod00.py", "mod10.py", "mod20.py"}
    assert names["validation"] == {"mod05.py", "mod15.py"}


def test_cache_key_changes_with_its_inputs(tmp_path: Path) -> None:
    text, python_dir = _corpus(tmp_path)
    paths = [text, *sorted(python_dir.glob("*.py"))]
    key = corpus_key("tokenizer-a", paths)
    assert corpus_key("tokenizer-a", list(reversed(paths))) == key  # the order of the list does not matter
    assert corpus_key("tokenizer-b", paths) != key
    assert corpus_key("tokenizer-a", paths[:-1]) != key
    paths[3].write_text(paths[3].read_text() + "x = 2\n")
    assert corpus_key("tokenizer-a", paths) != key


def test_token_cache_is_written_once_and_read_back(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    text, python_dir = _corpus(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer(tmp_path, text, python_dir))
    paths = [text, *sorted(python_dir.glob("*.py"))]
    tokens, key = tokenize_files(tokenizer, paths, tmp_path / "cache")
    assert (tmp_path / "cache" / f"lm-tokens-{key}.pt").is_file()
    assert tokens[str(text)].tolist() == tokenizer(text.read_text())["input_ids"]

    def refuse(*args, **kwargs):
        raise AssertionError("a cached corpus must not be tokenized again")

    tokenizer.__class__ = type("Refusing", (type(tokenizer),), {"__call__": refuse})
    cached, cached_key = tokenize_files(tokenizer, paths, tmp_path / "cache")
    assert cached_key == key and cached[str(text)].tolist() == tokens[str(text)].tolist()


def test_resumed_plan_skips_finished_runs_and_seeds_follow_the_validation_choice(tmp_path: Path) -> None:
    trained: list[RunSpec] = []

    def fake_train(spec: RunSpec) -> dict:
        trained.append(spec)
        # Validation loss is lowest at the 2x learning rate; the loss is otherwise meaningless.
        loss = abs(spec.lr_multiplier - 2.0) + spec.batch / 1000
        return {
            "optimizer": spec.optimizer,
            "batch": spec.batch,
            "lr": spec.lr,
            "lr_multiplier": spec.lr_multiplier,
            "seed": spec.seed,
            "validation_loss": loss,
            "eval_loss": loss,
            "gap": 0.0,
            "train_seconds": 0.0,
        }

    plan = dict(optimizers=["adamw", "vr-adamw"], batches=[4, 16], base_lrs={"adamw": 1e-3})
    plan.update(multipliers=[1.0, 2.0], seeds=[0, 1], run_dir=tmp_path)
    first = run_plan(**plan, train=fake_train)
    assert len(first) == len(trained) == 2 * 2 * (2 + 1)
    assert [spec.batch for spec in trained[:4]] == [16] * 4  # the largest batch runs first
    seeded = [spec for spec in trained if spec.seed == 1]
    assert {spec.lr_multiplier for spec in seeded} == {2.0}
    assert {spec.lr for spec in seeded if spec.batch == 16} == {1e-3 * 2 * 2.0}  # sqrt(16 / 4) * 2

    finished = sorted(tmp_path.glob("*.json"))
    (finished[0]).unlink()  # as if the job had been killed during this run
    trained.clear()
    second = run_plan(**plan, train=fake_train)
    assert [f"{spec.name}.json" for spec in trained] == [finished[0].name]
    assert sorted(r["lr"] for r in second) == sorted(r["lr"] for r in first)


def _tiny_arguments(tmp_path: Path) -> list[str]:
    text, python_dir = _corpus(tmp_path)
    tokenizer = _tokenizer(tmp_path, text, python_dir)
    return [
        "lm",
        "--optimizers", "adamw", "vr-adamw",
        "--batches", "4", "8", "--micro-batch", "2",
        "--lr-multipliers", "1", "2",
        "--seeds", "0", "1",
        "--epochs", "0.5",
        "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2",
        "--seq-len", "8", "--train-tokens", "128", "--eval-tokens", "64", "--evals-per-run", "2",
        "--text", str(text), "--python-dir", str(python_dir), "--tokenizer", str(tokenizer),
        "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip


def test_tiny_run_writes_report_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    arguments = _tiny_arguments(tmp_path)
    assert main(arguments) == 0
    out = tmp_path / "out"
    for name in (f"{REPORT_STEM}.json", f"{REPORT_STEM}.md", f"{REPORT_STEM}.png", f"{REPORT_STEM}_gap.png"):
        assert (out / name).stat().st_size > 0
    payload = json.loads((out / f"{REPORT_STEM}.json").read_text())
    assert payload["command"].startswith("hf-vrgd lm") and payload["machine"]
    records = payload["records"]
    assert len(records) == 2 * 2 * (2 + 1)
    assert {r["steps"] for r in records if r["batch"] == 4} == {2}  # 16 blocks / 4 x 0.5 epoch
    vr = [r for r in records if r["optimizer"] == "vr-adamw"]
    assert all(0.0 < r["gsnr"]["mean_multiplier"] <= 1.0 for r in vr)
    assert {row["comparison"] for row in payload["vr_minus_base"]} == {"vr-adamw - adamw"}
    assert payload["data"]["model_vocabulary"] <= payload["data"]["tokenizer_vocabulary"] + 1

    report = (out / f"{REPORT_STEM}.md").read_text()
    assert main(arguments) == 2  # finished results are never replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (out / f"{REPORT_STEM}.md").read_text() == report

    records_before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    assert main([*arguments, "--overwrite"]) == 0  # the report is rewritten, the finished runs are reused
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == records_before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--micro-batch", "2", "--batches", "3", "8"], "multiple of --micro-batch"),
        (["--micro-batch", "2", "--batches", "2", "8"], "2 gradient groups"),
        (["--seeds", "0", "0"], "distinct"),
        (["--epochs", "0"], "must be positive"),
    ],
)
def test_bad_arguments_fail_before_any_work(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["lm", "--output-dir", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpu_script_plan_and_a_tiny_run_through_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import load_script

    script = load_script("vrgd_gpu_experiment")
    gpu = script.plan_summary(script.experiment_arguments("gpu"))
    assert gpu["runs"] == 3 * 4 * (3 + 2)
    assert gpu["groups"] == {64: 4, 256: 16, 1024: 64}
    assert gpu["steps_per_run"] == {64: 4 * 64, 256: 4 * 16, 1024: 4 * 4}  # 4096 sequences, 4 epochs
    assert gpu["micro_batch_passes"] == gpu["runs"] * 4 * 4096 // 16
    assert script.main(["--dry-run"]) == 0
    assert "micro_batch_passes" in capsys.readouterr().out

    text, python_dir = _corpus(tmp_path)
    extra = ["--optimizers", "adamw", "vr-adamw", "--lr-multipliers", "1", "--seeds", "0", "1"]
    extra += ["--text", str(text), "--python-dir", str(python_dir)]
    extra += [
        "--tokenizer",
        str(_tokenizer(tmp_path, text, python_dir)),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    extra += ["--output-dir", str(tmp_path / "out")]
    tiny = script.plan_summary(script.experiment_arguments("tiny", extra))
    assert tiny == {
        "runs": 2 * 2 * (1 + 1),  # batches x optimizers x (grid + the other seed)
        "steps_per_run": {4: 8, 16: 2},
        "groups": {4: 2, 16: 8},
        "micro_batch_passes": 4 * 8 * 2 + 4 * 2 * 8,
    }
    assert script.main(["--scale", "tiny", *extra]) == 0
    payload = json.loads((tmp_path / "out" / f"{REPORT_STEM}.json").read_text())
    assert sorted((r["batch"], r["steps"]) for r in payload["records"]) == [(4, 8)] * 4 + [(16, 2)] * 4
