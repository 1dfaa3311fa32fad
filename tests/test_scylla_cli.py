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
    (features,) = draft_dir.glob("features-8x16-*.pt")  # cached target features, reused by a rerun
    tuned_dir = tmp_path / "tuned"  # fine-tuned, then its head reduced to the 32 most trained tokens
    tune = [*train, "--init-draft", str(draft_dir), "--draft-vocab-size", "32"]
    assert main([*tune, "--output-dir", str(tuned_dir)]) == 0
    assert json.loads((tuned_dir / "config.json").read_text())["draft_vocab_size"] == 32
    fused_dir = tmp_path / "fused"  # EAGLE-3 layer fusion added to the tuned draft, on fused features
    fuse = [*train, "--init-draft", str(tuned_dir), "--fuse-layers", "0", "1", "-1"]
    assert main([*fuse, "--output-dir", str(fused_dir)]) == 0
    assert json.loads((fused_dir / "config.json").read_text())["target_hidden_layers"] == [0, 1, -1]
    assert len(list(fused_dir.glob("features-8x16-fused-*.pt"))) == 1
    assert main([*fuse[:-3], "5", "-1", "--output-dir", str(tmp_path / "bad")]) == 2  # no hidden state 5

    standalone_dir = tmp_path / "standalone"  # the baseline, on the draft's cached features
    standalone = [*train, "--standalone", "--features", str(features)]
    assert main([*standalone, "--output-dir", str(standalone_dir)]) == 0
    assert not list(standalone_dir.glob("features-*.pt"))
    assert (standalone_dir / "model.safetensors").is_file() and (standalone_dir / "tokenizer.json").is_file()

    results = tmp_path / "results"
    bench = ["bench", *common, "--draft", str(fused_dir), "--prompts-dir", str(prompts), "--limit", "1"]
    bench += ["--assistant", str(standalone_dir)]
    assert main([*bench, "--max-new-tokens", "8", "--output-dir", str(results)]) == 0
    rows = json.loads((results / "bench.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {
        "greedy",
        "prompt_lookup_10",
        "scylla:fused",
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
    assert len(list(pretrained.glob("features-text-128x16-*.pt"))) == 1
    assert (pretrained / "model.safetensors").is_file()

    tuned = tmp_path / "tuned"
    finetune = [*common, "--data", str(data), "--samples", "4", "--regenerate", "--regenerate-tokens", "6"]
    assert main([*finetune, "--init-draft", str(pretrained), "--output-dir", str(tuned)]) == 0
    (regenerated,) = tuned.glob("regenerated-*.jsonl")  # one cache per target
    answers = [json.loads(line) for line in regenerated.read_text().splitlines()]
    assert [answer["prompt"] for answer in answers] == [f"w{i} w{i + 1}" for i in range(5, 9)]
    assert all(answer["response"] != "w1" for answer in answers)  # the target's answers, not the data's
    assert len(list(tuned.glob("features-regen6-4x16-*.pt"))) == 1 and (tuned / "model.safetensors").is_file()


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
        (["--init-draft", "/nowhere/draft"], "is not a saved model folder"),
        (["--max-length", "1"], "--max-length must be >= 2"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--learning-rate", "nan"], "--learning-rate must be a positive number"),
        (["--epochs", "0"], "--epochs must be a positive number"),
        (["--draft-vocab-size", "0"], "--draft-vocab-size must be >= 1"),
        (["--standalone", "--fuse-layers"], "--fuse-layers applies to Scylla drafts"),
    ],
)
def test_train_rejects_bad_arguments_before_loading_the_model(
    tmp_path: Path, arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 item 16: the target is never loaded (its folder does not even exist)."""
    command = [
        "train",
        "--model",
        str(tmp_path / "no-target"),
        "--output-dir",
        str(tmp_path / "out"),
        *arguments,
    ]
    assert main(command) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def tiny_target_and_data(tmp_path: Path, records: int = 4) -> tuple[Path, Path]:
    model_dir, data = tmp_path / "target", tmp_path / "train.jsonl"
    make_target(context_scale=0.3).save_pretrained(model_dir)
    chat_word_tokenizer().save_pretrained(model_dir)
    pairs = [{"question": f"w{i} w{i + 1}", "answer": f"w{i + 2} w{i + 3}"} for i in range(5, 5 + records)]
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return model_dir, data


def test_changed_data_or_target_never_reuses_cached_features(tmp_path: Path) -> None:
    """Issue 16 item 5: features were named by sample count and length only, so another --data (or
    target) trained on the first run's features without a word."""
    model_dir, data = tiny_target_and_data(tmp_path)
    out = tmp_path / "out"
    train = ["train", "--model", str(model_dir), "--data", str(data), "--samples", "4", "--max-length", "16"]
    train += ["--batch-size", "4", "--output-dir", str(out), "--overwrite"]
    assert main(train) == 0
    first = set(out.glob("features-*.pt"))
    assert main(train) == 0 and set(out.glob("features-*.pt")) == first, "same inputs: the cache is reused"
    data.write_text(data.read_text().replace("w7", "w70"))  # same file name, same count, other content
    assert main(train) == 0
    second = set(out.glob("features-*.pt"))
    assert len(second) == 2
    make_target(context_scale=0.3, seed=5).save_pretrained(model_dir)  # another target, same folder
    assert main(train) == 0
    assert len(set(out.glob("features-*.pt"))) == 3
    assert main([*train, "--max-length", "17"]) == 0
    assert len(set(out.glob("features-*.pt"))) == 4
    (cached,) = first
    description = json.loads(cached.with_suffix(".json").read_text())
    assert {
        "target_weights",
        "data_sha256",
        "samples",
        "max_length",
        "chat_template",
        "feature_layer",
    } <= set(description)


def test_features_file_built_from_other_inputs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, data = tiny_target_and_data(tmp_path)
    train = ["train", "--model", str(model_dir), "--data", str(data), "--samples", "4", "--batch-size", "4"]
    assert main([*train, "--max-length", "16", "--output-dir", str(tmp_path / "a")]) == 0
    (features,) = (tmp_path / "a").glob("features-*.pt")
    reuse = [*train, "--max-length", "12", "--features", str(features), "--output-dir", str(tmp_path / "b")]
    assert main(reuse) == 2
    assert "was built from other inputs (differing: max_length" in capsys.readouterr().err


def test_a_truncated_feature_cache_is_a_clear_error_and_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, data = tiny_target_and_data(tmp_path)
    train = ["train", "--model", str(model_dir), "--data", str(data), "--samples", "4", "--batch-size", "4"]
    train += ["--max-length", "16", "--output-dir", str(tmp_path / "a")]
    assert main(train) == 0
    (features,) = (tmp_path / "a").glob("features-*.pt")
    features.write_bytes(features.read_bytes()[:200])  # a kill while it was written, a bad disk...
    assert main([*train, "--overwrite"]) == 2
    assert f"feature cache {features} is corrupt or truncated" in capsys.readouterr().err
    assert features.stat().st_size == 200  # left for the user to look at


def test_max_length_inside_the_prompt_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16 item 6: every loss mask was 0 and the run reported "mean loss 0.0000; draft saved"."""
    model_dir, data = tiny_target_and_data(tmp_path)
    long_question = {"question": " ".join(f"w{i}" for i in range(10, 30)), "answer": "w5 w6"}
    data.write_text(json.dumps(long_question) + "\n")
    out = tmp_path / "out"
    train = ["train", "--model", str(model_dir), "--data", str(data), "--samples", "4", "--max-length", "8"]
    assert main([*train, "--output-dir", str(out)]) == 2
    assert "no position is trained: --max-length 8 cuts every conversation" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()


def test_train_refuses_to_replace_a_draft_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, data = tiny_target_and_data(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier draft")
    train = ["train", "--model", str(model_dir), "--data", str(data), "--samples", "4", "--max-length", "16"]
    assert main([*train, "--output-dir", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"an earlier draft"


def test_commands_default_to_runs_not_results() -> None:
    """Issue 16 item 3: a plain run never replaces the committed results/ files."""
    from hf_common.cli import build_parser
    from hf_scylla.cli import COMMANDS, DESCRIPTION

    parser = build_parser("hf-scylla", DESCRIPTION, COMMANDS)
    for command in ("train", "bench", "sweep", "batch-sweep"):
        args = parser.parse_args([command])
        assert args.output_dir.parts[0] == "runs", (command, args.output_dir)
