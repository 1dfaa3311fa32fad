"""``hf-scylla train`` then ``hf-scylla bench`` end to end on a tiny saved target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import chat_word_tokenizer
from scylla_models import make_target

from hf_scylla.cli import main


def test_train_then_bench(tmp_path: Path) -> None:
    model_dir, data, prompts = tmp_path / "target", tmp_path / "train.jsonl", tmp_path / "prompts"
    make_target(context_scale=0.3).save_pretrained(model_dir)
    chat_word_tokenizer().save_pretrained(model_dir)
    pairs = [{"question": f"w{i} w{i + 1}", "answer": f"w{i + 2} w{i + 3} w{i + 4}"} for i in range(5, 13)]
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    prompts.mkdir()
    (prompts / "tiny.jsonl").write_text(json.dumps({"question_id": 0, "turns": ["w7 w8 w9"]}) + "\n")

    draft_dir = tmp_path / "draft"
    common = ["--model", str(model_dir)]
    train = [
        "train",
        *common,
        "--data",
        str(data),
        "--samples",
        "8",
        "--max-length",
        "16",
        "--batch-size",
        "4",
    ]
    assert main([*train, "--output-dir", str(draft_dir)]) == 0
    assert (draft_dir / "model.safetensors").is_file()
    assert (draft_dir / "features-8x16.pt").is_file()  # cached target features, reused by a rerun
    tuned_dir = tmp_path / "tuned"
    assert main([*train, "--init-draft", str(draft_dir), "--output-dir", str(tuned_dir)]) == 0
    assert (tuned_dir / "model.safetensors").is_file()

    standalone_dir = tmp_path / "standalone"  # the baseline, on the draft's cached features
    standalone = [*train, "--standalone", "--features", str(draft_dir / "features-8x16.pt")]
    assert main([*standalone, "--output-dir", str(standalone_dir)]) == 0
    assert not list(standalone_dir.glob("features-*.pt"))
    assert (standalone_dir / "model.safetensors").is_file() and (standalone_dir / "tokenizer.json").is_file()

    results = tmp_path / "results"
    bench = ["bench", *common, "--draft", str(draft_dir), "--prompts-dir", str(prompts), "--limit", "1"]
    bench += ["--assistant", str(standalone_dir)]
    assert main([*bench, "--max-new-tokens", "8", "--output-dir", str(results)]) == 0
    rows = json.loads((results / "bench.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {
        "greedy",
        "prompt_lookup_10",
        "scylla:draft",
        "assisted:standalone",
    }
    assert all(row["lossless"] for row in rows)
    assert (results / "bench.md").is_file() and (results / "bench.png").is_file()


def test_pretrain_on_text_then_finetune_on_regenerated_answers(tmp_path: Path) -> None:
    model_dir, data, text = tmp_path / "target", tmp_path / "train.jsonl", tmp_path / "text.txt"
    make_target(context_scale=0.3).save_pretrained(model_dir)
    chat_word_tokenizer().save_pretrained(model_dir)
    data.write_text(
        "".join(json.dumps({"question": f"w{i} w{i + 1}", "answer": "w1"}) + "\n" for i in range(5, 9))
    )
    text.write_text(" ".join(f"w{i % 100 + 5}" for i in range(200)))
    common = ["train", "--model", str(model_dir), "--max-length", "16", "--batch-size", "4"]

    pretrained = tmp_path / "pretrained"
    pretrain = [*common, "--stage", "pretrain", "--text", str(text), "--tokens", "128"]
    assert main([*pretrain, "--output-dir", str(pretrained)]) == 0
    assert (pretrained / "features-text-128x16.pt").is_file() and (pretrained / "model.safetensors").is_file()

    tuned = tmp_path / "tuned"
    finetune = [*common, "--data", str(data), "--samples", "4", "--regenerate", "--regenerate-tokens", "6"]
    assert main([*finetune, "--init-draft", str(pretrained), "--output-dir", str(tuned)]) == 0
    answers = [json.loads(line) for line in (tuned / "regenerated.jsonl").read_text().splitlines()]
    assert [answer["prompt"] for answer in answers] == [f"w{i} w{i + 1}" for i in range(5, 9)]
    assert all(answer["response"] != "w1" for answer in answers)  # the target's answers, not the data's
    assert (tuned / "features-regen6-4x16.pt").is_file() and (tuned / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--stage", "pretrain", "--regenerate"], "applies to --stage finetune only"),
        (["--stage", "pretrain", "--text", "/nowhere/text"], "/nowhere/text not found"),
        (["--data", "/nowhere/train.jsonl"], "pass another with --data"),
        (
            ["--standalone", "--features", "/nowhere/features.pt"],
            "features file /nowhere/features.pt not found",
        ),
    ],
)
def test_train_rejects_bad_data_arguments(tmp_path: Path, arguments: list[str], message: str) -> None:
    model_dir = tmp_path / "target"
    make_target().save_pretrained(model_dir)
    chat_word_tokenizer().save_pretrained(model_dir)
    command = ["train", "--model", str(model_dir), "--output-dir", str(tmp_path / "out"), *arguments]
    with pytest.raises(SystemExit, match=message):
        main(command)
