"""Staging a draft as a Hub repository, publishing it to a loopback Hub and loading it back."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils
import transformers.utils.hub
from helpers import word_tokenizer
from hub_server import LoopbackHub
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file
from scylla_models import make_draft, make_target
from transformers import AutoTokenizer

from hf_scylla import (
    CUSTOM_GENERATE_DIR,
    ScyllaDraftConfig,
    ScyllaDraftModel,
    ScyllaStats,
    tokenizer_fingerprint,
)
from hf_scylla.cli import main as scylla_main
from hf_scylla.hub import (
    STAGE_MANIFEST,
    PublishError,
    StagedFolderError,
    check_staged_folder,
    publish,
    stage_draft,
)
from hf_scylla.modeling import SHARED_WITH_TARGET

TOKEN = "hf_loopback_token"
REPO_ID = "scylla-org/tiny-draft"
TARGET_ID = "scylla-org/tiny-target"
EVAL_RESULTS = {
    "tau": 3.25,
    "speedup": 1.75,
    "dataset_name": "MT-Bench",
    "dataset_type": "HuggingFaceH4/mt_bench_prompts",
    "setting": "greedy, CPU, 12 new tokens",
}
PROMPT = torch.tensor([[1, 5, 9, 12, 7]])


@pytest.fixture
def modules_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """transformers copies custom_generate recipes into its modules cache: keep that inside the test."""
    cache = tmp_path / "modules"
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(cache))
    # A recipe's relative import (custom_generate/draft_repo.py) resolves through the package
    # `transformers_modules`: forget the one imported from another cache folder, before and after.
    _forget_dynamic_modules()
    yield cache
    _forget_dynamic_modules()


def _forget_dynamic_modules() -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == "transformers_modules"]:
        del sys.modules[name]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, modules_cache: Path):
    """A loopback Hub that the real client talks to: endpoint, token, fresh cache, Xet disabled."""
    server = LoopbackHub(tokens=(TOKEN,)).start()
    home = tmp_path / "hf_home"
    # huggingface_hub read these at import (conftest imports transformers first), so patch both places.
    for name, value in {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # transformers keeps one HfApi per endpoint
    yield server
    server.stop()


@pytest.fixture
def target():
    return make_target(context_scale=0.1)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer([f"w{index}" for index in range(128)])


@pytest.fixture
def draft(target):
    return make_draft(target, oracle=True)


def stage(draft, tokenizer, folder: Path, **kwargs) -> Path:
    kwargs = {"repo_name": REPO_ID, "base_model": TARGET_ID, **kwargs}
    return stage_draft(draft, tokenizer, folder, **kwargs)


def draft_weights(model: ScyllaDraftModel) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if key not in SHARED_WITH_TARGET}


def assert_same_weights(loaded: ScyllaDraftModel, original: ScyllaDraftModel) -> None:
    expected = draft_weights(original)
    actual = draft_weights(loaded)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def greedy(target, **kwargs) -> torch.Tensor:
    return target.generate(PROMPT, max_new_tokens=12, do_sample=False, **kwargs)


def test_stage_writes_complete_repository(draft, tokenizer, tmp_path: Path) -> None:
    folder = stage(
        draft, tokenizer, tmp_path / "staged", eval_results=EVAL_RESULTS, datasets=["org/chat-data"]
    )
    names = {file.path for file in check_staged_folder(folder, REPO_ID)}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names
    assert {"custom_generate/generate.py", "custom_generate/requirements.txt"} <= names

    config = ScyllaDraftConfig.from_pretrained(folder)
    assert config.target_name_or_path == TARGET_ID
    assert config.target_tokenizer_hash == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(folder)) == config.target_tokenizer_hash
    saved = load_file(folder / "model.safetensors")
    assert not set(saved) & set(SHARED_WITH_TARGET), (
        "draft-only checkpoint must not hold the target's tensors"
    )
    assert "hf-adamas-scylla-vrgd" in (folder / "custom_generate/requirements.txt").read_text()
    assert f'DRAFT_REPO_ID = "{REPO_ID}"' in (folder / "custom_generate/draft_repo.py").read_text()


def test_staged_recipe_is_the_packaged_file(draft, tokenizer, tmp_path: Path) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged")
    packaged = Path(CUSTOM_GENERATE_DIR) / "custom_generate" / "generate.py"
    assert (folder / "custom_generate" / "generate.py").read_bytes() == packaged.read_bytes()


def test_stage_keeps_shared_tensors_when_config_asks(target, tokenizer, tmp_path: Path) -> None:
    draft = make_draft(target, save_embeddings=True)
    folder = stage(draft, tokenizer, tmp_path / "staged")
    assert set(SHARED_WITH_TARGET) <= set(load_file(folder / "model.safetensors"))


def test_model_card_metadata_holds_the_measured_results(draft, tokenizer, tmp_path: Path) -> None:
    folder = stage(
        draft, tokenizer, tmp_path / "staged", eval_results=EVAL_RESULTS, datasets=["org/chat-data"]
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == TARGET_ID
    assert card.data.library_name == "transformers"
    assert {"speculative-decoding", "scylla", "eagle"} <= set(card.data.tags)
    assert card.data.datasets == ["org/chat-data"]
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert metrics == {"mean_accepted_tokens": 3.25, "speedup": 1.75}
    assert {result.dataset_type for result in card.data.eval_results} == {"HuggingFaceH4/mt_bench_prompts"}
    assert f'custom_generate="{REPO_ID}"' in card.text
    assert "| 3.25 | 1.75 |" in card.text
    assert "Not evaluated yet" not in card.text
    assert "No further training details" in card.text


def test_model_card_holds_one_result_row_per_prompt_set(draft, tokenizer, tmp_path: Path) -> None:
    held_out = {
        "tau": 1.5,
        "speedup": 0.9,
        "dataset_name": "held-out prompts",
        "dataset_type": "local/heldout",
    }
    held_out["setting"] = "greedy, 2-core CPU"
    folder = stage(draft, tokenizer, tmp_path / "staged", eval_results=[EVAL_RESULTS, held_out])
    card = ModelCard.load(folder / "README.md")
    by_set = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert (
        by_set[("local/heldout", "speedup")] == 0.9
        and by_set[("HuggingFaceH4/mt_bench_prompts", "speedup")] == 1.75
    )
    assert "| held-out prompts (`local/heldout`) | 1.5 | 0.9 |" in card.text
    assert "Setting: greedy, CPU, 12 new tokens." in card.text and "Setting: greedy, 2-core CPU." in card.text


def test_model_card_carries_the_training_notes(draft, tokenizer, tmp_path: Path) -> None:
    notes = "EAGLE loss, 400 GSM8K conversations, 1 epoch, lr 3e-4."
    card = ModelCard.load(stage(draft, tokenizer, tmp_path / "staged", training_notes=notes) / "README.md")
    assert notes in card.text and "No further training details" not in card.text


def test_model_card_without_results_invents_no_numbers(draft, tokenizer, tmp_path: Path) -> None:
    card = ModelCard.load(stage(draft, tokenizer, tmp_path / "staged") / "README.md")
    assert "Not evaluated yet" in card.text
    assert card.data.eval_results is None
    assert "model-index" not in card.content
    assert "| Prompt set |" not in card.text


@pytest.mark.parametrize(
    ("eval_results", "message"),
    [
        ({**EVAL_RESULTS, "acceptance": 3.0}, "Unknown eval_results keys"),
        ({"tau": 3.0, "dataset_name": "MT-Bench"}, "missing \\['dataset_type'\\]"),
        ({"dataset_name": "MT-Bench", "dataset_type": "x/y"}, "no measured metric"),
        ({**EVAL_RESULTS, "tau": float("nan")}, "finite number"),
        ({**EVAL_RESULTS, "tau": 0.5}, ">= 1"),
    ],
)
def test_stage_rejects_bad_eval_results(draft, tokenizer, tmp_path: Path, eval_results, message) -> None:
    with pytest.raises(ValueError, match=message):
        stage(draft, tokenizer, tmp_path / "staged", eval_results=eval_results)
    assert not (tmp_path / "staged").exists()


def test_stage_never_replaces_a_folder_it_did_not_write(draft, tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "staged"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="was not written by hf-scylla stage"):
            stage(draft, tokenizer, folder, overwrite=overwrite)
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"


def test_restage_replaces_only_the_files_the_earlier_stage_wrote(
    target, draft, tokenizer, tmp_path: Path
) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged")
    manifest = json.loads((folder / STAGE_MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and "custom_generate/generate.py" in manifest["files"]
    with pytest.raises(FileExistsError, match="earlier staged draft; pass overwrite=True"):
        stage(draft, tokenizer, folder)
    (folder / "NOTES.md").write_text("the user's own file")
    retrained = make_draft(target, seed=7)
    stage(retrained, tokenizer, folder, overwrite=True)
    assert (folder / "NOTES.md").read_text() == "the user's own file"
    assert_same_weights(ScyllaDraftModel.from_pretrained(folder), retrained)
    assert not list(folder.glob(".staging-*")), "the scratch folder is removed"


def test_restage_refuses_to_replace_a_file_it_did_not_write(draft, tokenizer, tmp_path: Path) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged")
    manifest = json.loads((folder / STAGE_MANIFEST).read_text())
    manifest["files"].remove("README.md")  # as if the user had put their own README there
    (folder / STAGE_MANIFEST).write_text(json.dumps(manifest))
    (folder / "README.md").write_text("# my own notes\n")
    with pytest.raises(FileExistsError, match=r"holds \['README.md'\], which hf-scylla stage did not write"):
        stage(draft, tokenizer, folder, overwrite=True)
    assert (folder / "README.md").read_text() == "# my own notes\n"
    assert (folder / "model.safetensors").is_file()


def test_restage_refuses_a_manifest_pointing_outside_the_folder(draft, tokenizer, tmp_path: Path) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged")
    (tmp_path / "precious.txt").write_text("outside")
    (folder / STAGE_MANIFEST).write_text(json.dumps({"files": ["../precious.txt"]}))
    with pytest.raises(FileExistsError, match="outside"):
        stage(draft, tokenizer, folder, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "outside"


def test_cli_stage_into_the_current_folder_deletes_nothing(
    draft, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 item 1: ``--output-dir . --overwrite`` used to rmtree the working directory."""
    work = tmp_path / "work"
    draft.save_pretrained(work / "checkpoint")
    tokenizer.save_pretrained(work / "target")
    (work / "results.md").write_text("a user's results")
    monkeypatch.chdir(work)
    before = sorted(path.relative_to(work) for path in work.rglob("*"))
    arguments = [
        "stage",
        "checkpoint",
        "--target",
        "target",
        "--repo-name",
        REPO_ID,
        "--base-model",
        TARGET_ID,
    ]
    assert scylla_main([*arguments, "--output-dir", ".", "--overwrite"]) == 2
    assert "is or contains" in capsys.readouterr().err
    (work / "checkpoint").rename(tmp_path / "checkpoint")  # '.' no longer holds a source: still refused
    (work / "target").rename(tmp_path / "target")
    elsewhere = ["stage", str(tmp_path / "checkpoint"), "--target", str(tmp_path / "target")]
    assert scylla_main([*elsewhere, *arguments[4:], "--output-dir", ".", "--overwrite"]) == 2
    assert "was not written by hf-scylla stage" in capsys.readouterr().err
    assert [path.name for path in work.iterdir()] == ["results.md"]
    assert len(before) > 1


def test_cli_stage_into_the_checkpoints_parent_keeps_the_checkpoint(
    draft, tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 item 2: ``stage p/ckpt --output-dir p --overwrite`` used to delete the checkpoint."""
    parent = tmp_path / "p"
    draft.save_pretrained(parent / "ckpt")
    (parent / "sibling.txt").write_text("another run")
    tokenizer.save_pretrained(tmp_path / "target")
    arguments = ["stage", str(parent / "ckpt"), "--target", str(tmp_path / "target"), "--repo-name", REPO_ID]
    arguments += ["--base-model", TARGET_ID, "--overwrite"]
    for output_dir in (parent, parent / "ckpt"):
        assert scylla_main([*arguments, "--output-dir", str(output_dir)]) == 2
        assert f"is or contains {parent / 'ckpt'}" in capsys.readouterr().err
    assert (parent / "sibling.txt").read_text() == "another run"
    assert_same_weights(ScyllaDraftModel.from_pretrained(parent / "ckpt"), draft)


def test_stage_refuses_another_targets_tokenizer(draft, tokenizer, tmp_path: Path) -> None:
    other = word_tokenizer([f"x{index}" for index in range(128)])
    draft.config.target_tokenizer_hash = tokenizer_fingerprint(tokenizer)
    with pytest.raises(ValueError, match="tokenizer fingerprint"):
        stage(draft, other, tmp_path / "staged")


def test_custom_generate_folder_is_lossless(target, draft, tokenizer, tmp_path: Path, modules_cache) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged")
    stats = ScyllaStats()
    output = greedy(
        target,
        custom_generate=str(folder),
        trust_remote_code=True,
        draft_repo=str(folder),
        scylla_stats=stats,
    )
    assert torch.equal(output, greedy(target))
    assert stats.cycles > 0 and stats.tau > 1.0, "the staged recipe must actually draft"
    assert (modules_cache / "transformers_modules").is_dir()


def test_publish_round_trip_with_tags(hub: LoopbackHub, target, draft, tokenizer, tmp_path: Path) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged", eval_results=EVAL_RESULTS)
    (folder / "NOTES.md").write_text("only in the first release")
    result = publish(folder, REPO_ID, revision_tag="v1")
    assert not result.dry_run and result.tag == "v1"
    assert hub.commit_count(REPO_ID) == 2  # the repository's initial commit + one upload commit
    assert hub.repos[REPO_ID].tags == {"v1": result.commit_oid}
    assert "model.safetensors" in hub.repos[REPO_ID].head.lfs_paths

    loaded = ScyllaDraftModel.from_pretrained(REPO_ID, target=target, target_tokenizer=tokenizer)
    assert_same_weights(loaded, draft)
    snapshot = Path(snapshot_download(REPO_ID, revision="v1"))
    for file in result.files:
        assert hashlib.sha256((snapshot / file.path).read_bytes()).hexdigest() == file.sha256, file.path

    # A second release with other weights: the v1 tag still resolves to the first one.
    retrained = make_draft(target, seed=7)
    stage(retrained, tokenizer, folder, overwrite=True)
    (folder / "NOTES.md").unlink()  # restaging keeps the user's own files; this one leaves the release
    second = publish(folder, REPO_ID, revision_tag="v2", overwrite=True)
    assert hub.commit_count(REPO_ID) == 3 and second.commit_oid != result.commit_oid
    head_files = set(hub.repos[REPO_ID].head.files)
    assert head_files == {file.path for file in second.files} | {".gitattributes"}, "stale files are deleted"
    assert "NOTES.md" in hub.repos[REPO_ID].resolve("v1").files
    assert_same_weights(ScyllaDraftModel.from_pretrained(REPO_ID, revision="v1"), draft)
    assert_same_weights(ScyllaDraftModel.from_pretrained(REPO_ID, revision="v2"), retrained)
    assert_same_weights(ScyllaDraftModel.from_pretrained(REPO_ID), retrained)


def test_custom_generate_from_the_hub_is_lossless(
    hub: LoopbackHub, target, draft, tokenizer, tmp_path
) -> None:
    publish(stage(draft, tokenizer, tmp_path / "staged"), REPO_ID, revision_tag="v1")
    stats = ScyllaStats()
    output = greedy(
        target, custom_generate=REPO_ID, trust_remote_code=True, revision="v1", scylla_stats=stats
    )
    assert torch.equal(output, greedy(target))
    assert stats.cycles > 0 and stats.tau > 1.0
    assert ("GET", f"/{REPO_ID}/resolve/v1/custom_generate/generate.py") in hub.requests
    assert ("GET", f"/api/models/{REPO_ID}/revision/v1") in hub.requests, "the draft must load from the tag"


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_publish_honours_the_endpoint_given_at_call_time(
    hub: LoopbackHub, draft, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # what huggingface_hub read at import
    monkeypatch.setenv("HF_ENDPOINT", hub.url if how == "environment" else "http://127.0.0.1:9")
    folder = stage(draft, tokenizer, tmp_path / "staged")
    result = publish(folder, REPO_ID, endpoint=hub.url if how == "argument" else None, revision_tag="v1")
    assert hub.commit_count(REPO_ID) == 2 and hub.repos[REPO_ID].tags == {"v1": result.commit_oid}
    assert result.repo_url.startswith(hub.url)


def test_private_repo_needs_a_token_to_read(hub: LoopbackHub, draft, tokenizer, tmp_path: Path) -> None:
    publish(stage(draft, tokenizer, tmp_path / "staged"), REPO_ID, private=True)
    assert hub.repos[REPO_ID].private
    assert HfApi(token=TOKEN).model_info(REPO_ID).private
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token="hf_wrong").model_info(REPO_ID)
    assert error.value.response.status_code == 401


def test_publish_without_token_fails_before_any_request(
    hub: LoopbackHub, draft, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    folder = stage(draft, tokenizer, tmp_path / "staged")
    with pytest.raises(PublishError, match="No Hub token"):
        publish(folder, REPO_ID)
    assert hub.requests == []


def test_publish_with_a_rejected_token_uploads_nothing(
    hub: LoopbackHub, draft, tokenizer, tmp_path: Path
) -> None:
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token="hf_wrong").create_repo(REPO_ID)
    assert error.value.response.status_code == 401
    with pytest.raises(PublishError, match="refused the token \\(401\\)"):
        publish(stage(draft, tokenizer, tmp_path / "staged"), REPO_ID, token="hf_wrong")
    assert REPO_ID not in hub.repos


def test_publish_to_existing_repo_needs_overwrite(hub: LoopbackHub, draft, tokenizer, tmp_path: Path) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged")
    first = publish(folder, REPO_ID, revision_tag="v1")
    requests_before = len(hub.requests)
    with pytest.raises(PublishError, match="already exists; pass overwrite=True"):
        publish(folder, REPO_ID, revision_tag="v2")
    assert hub.commit_count(REPO_ID) == 2
    sent = {path.rsplit("/", 2)[-2] for _, path in hub.requests[requests_before:]}
    assert not sent & {"preupload", "commit", "tag"}, "nothing may be uploaded to an existing repository"
    with pytest.raises(PublishError, match="Tag 'v1' already exists"):
        publish(folder, REPO_ID, revision_tag="v1", overwrite=True)
    assert hub.commit_count(REPO_ID) == 2 and hub.repos[REPO_ID].tags == {"v1": first.commit_oid}


def break_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "scylla_draft", "hidden_size": ')


def remove_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def drop_a_draft_tensor(folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_file(folder / "model.safetensors")
    tensors.pop("fc.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def strip_card_metadata(folder: Path) -> None:
    (folder / "README.md").write_text("# A draft\n")


def break_model_index(folder: Path) -> None:
    card = (folder / "README.md").read_text()
    broken_index = "model-index:\n- name: x\n  results:\n  - task: {type: text-generation}\n    metrics: []\n"
    (folder / "README.md").write_text(card.replace("license:", broken_index + "license:", 1))


def remove_recipe(folder: Path) -> None:
    (folder / "custom_generate" / "generate.py").unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (break_config, "config.json is not a Scylla draft config"),
        (remove_weights, "missing \\['model.safetensors or model.safetensors.index.json'\\]"),
        (truncate_weights, "do not load as a complete draft"),
        (drop_a_draft_tensor, "partial"),
        (strip_card_metadata, "lacks model-card metadata"),
        (break_model_index, "README.md metadata does not parse"),
        (remove_recipe, "custom_generate/generate.py"),
    ],
)
def test_broken_folder_is_refused_before_any_request(
    hub: LoopbackHub, draft, tokenizer, tmp_path: Path, damage, message
) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged")
    damage(folder)
    with pytest.raises(StagedFolderError, match=message):
        publish(folder, REPO_ID)
    assert hub.requests == []


def test_folder_staged_for_another_repo_is_refused(
    hub: LoopbackHub, draft, tokenizer, tmp_path: Path
) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged")
    with pytest.raises(StagedFolderError, match="re-stage with repo_name='scylla-org/other'"):
        publish(folder, "scylla-org/other")
    assert hub.requests == []


def test_dry_run_lists_files_and_sends_nothing(
    hub: LoopbackHub, draft, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    folder = stage(draft, tokenizer, tmp_path / "staged")
    result = publish(folder, REPO_ID, dry_run=True)
    assert result.dry_run and result.commit_oid is None
    on_disk = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()}
    assert on_disk.pop(STAGE_MANIFEST), "the manifest stays local: it is never uploaded"
    assert {file.path for file in result.files} == set(on_disk)
    for file in result.files:
        content = on_disk[file.path].read_bytes()
        assert (file.size, file.sha256) == (len(content), hashlib.sha256(content).hexdigest())
    assert hub.requests == []


def test_cli_stage_then_publish(
    hub: LoopbackHub, target, draft, tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, target_dir, staged = tmp_path / "checkpoint", tmp_path / "target", tmp_path / "staged"
    draft.save_pretrained(checkpoint)
    tokenizer.save_pretrained(target_dir)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(EVAL_RESULTS))
    stage_args = ["stage", str(checkpoint), "--target", str(target_dir), "--output-dir", str(staged)]
    stage_args += ["--repo-name", REPO_ID, "--base-model", TARGET_ID, "--eval-results", str(results)]
    assert scylla_main(stage_args) == 0
    assert scylla_main(stage_args) == 2
    assert "earlier staged draft; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    card = ModelCard.load(staged / "README.md")
    assert card.data.base_model == TARGET_ID
    assert {result.metric_value for result in card.data.eval_results} == {3.25, 1.75}

    assert scylla_main(["publish", str(staged), "--repo-id", REPO_ID, "--dry-run"]) == 0
    assert "nothing was sent" in capsys.readouterr().out and hub.requests == []
    assert scylla_main(["publish", str(staged), "--repo-id", REPO_ID, "--tag", "v1"]) == 0
    assert "tagged v1" in capsys.readouterr().out
    assert scylla_main(["publish", str(staged), "--repo-id", REPO_ID]) == 2
    assert "already exists" in capsys.readouterr().err
    assert hub.commit_count(REPO_ID) == 2
    assert_same_weights(ScyllaDraftModel.from_pretrained(REPO_ID, revision="v1"), draft)


def test_cli_stage_stores_the_benchmarked_draft_settings(
    draft, tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, target_dir = tmp_path / "checkpoint", tmp_path / "target"
    draft.save_pretrained(checkpoint)
    tokenizer.save_pretrained(target_dir)
    stage_args = ["stage", str(checkpoint), "--target", str(target_dir), "--repo-name", REPO_ID]
    stage_args += ["--base-model", TARGET_ID, "--lookup-tokens", "4"]
    stage_args += ["--max-draft-tokens", "3", "--confidence-threshold", "0.25"]
    assert scylla_main([*stage_args, "--output-dir", str(tmp_path / "staged")]) == 0
    config = ScyllaDraftConfig.from_pretrained(tmp_path / "staged")
    assert (config.max_draft_tokens, config.confidence_threshold, config.lookup_tokens) == (3, 0.25, 4)
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "proposes the up to 4 tokens that followed them instead (prompt lookup)" in card
    bad = [*stage_args[:-1], "1.5", "--output-dir", str(tmp_path / "bad")]
    assert scylla_main(bad) == 2
    assert "confidence_threshold must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    bad_lookup = [*stage_args[:-1], "0.25", "--lookup-tokens", "-1", "--output-dir", str(tmp_path / "bad")]
    assert scylla_main(bad_lookup) == 2
    assert "lookup_tokens must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def poison_weights(folder: Path) -> None:
    """A valid safetensors file whose fc weight holds a NaN (a diverged training run)."""
    from safetensors.torch import save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["fc.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_draft_with_nan_weights_is_refused_on_load_stage_and_dry_run(
    target, draft, tokenizer, tmp_path: Path
) -> None:
    """Issue 16 item 10: such a draft used to load, stage and pass ``publish --dry-run``."""
    checkpoint = tmp_path / "checkpoint"
    draft.save_pretrained(checkpoint)
    poison_weights(checkpoint)
    with pytest.raises(ValueError, match=r"NaN or inf weights in 1 tensors, e.g. \['fc.weight'\]"):
        ScyllaDraftModel.from_pretrained(checkpoint, target=target)
    with torch.no_grad():
        draft.layers[0].mlp.up_proj.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.weight"):
        stage(draft, tokenizer, tmp_path / "staged")
    assert not (tmp_path / "staged").exists()
    folder = stage(make_draft(target), tokenizer, tmp_path / "staged")
    poison_weights(folder)
    with pytest.raises(StagedFolderError, match="NaN or inf weights"):
        publish(folder, REPO_ID, dry_run=True)


def test_cli_publish_to_an_unreachable_endpoint_says_so(
    draft, tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = stage(draft, tokenizer, tmp_path / "staged")
    arguments = ["publish", str(folder), "--repo-id", REPO_ID, "--endpoint", "http://127.0.0.1:9"]
    assert scylla_main(arguments) == 2
    error = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:9" in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--repo-id", "no-namespace"], "Expected a Hub repository id"),
        (["--repo-id", "org/-bad-"], "Expected a Hub repository id"),
        (["--repo-id", "org/a--b"], "Expected a Hub repository id"),
        (["--repo-id", REPO_ID, "--tag", "v 1"], "not a valid git tag name"),
        (["--repo-id", REPO_ID, "--tag", "v1..2"], "not a valid git tag name"),
        (["--repo-id", REPO_ID, "--tag=-v1"], "not a valid git tag name"),
    ],
)
def test_cli_publish_dry_run_refuses_a_bad_repo_id_or_tag(
    draft, tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments, message
) -> None:
    folder = stage(draft, tokenizer, tmp_path / "staged")
    assert scylla_main(["publish", str(folder), *arguments, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ('{"tau": 3.0,', "is not a JSON file"),
        ("[3.0]", "a JSON object or a non-empty list of them"),
        ('{"tau": 3.0}', "missing \\['dataset_name', 'dataset_type'\\]"),
    ],
)
def test_cli_stage_refuses_malformed_eval_results(
    draft, tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str], content, message
) -> None:
    checkpoint, target_dir, results = tmp_path / "checkpoint", tmp_path / "target", tmp_path / "eval.json"
    draft.save_pretrained(checkpoint)
    tokenizer.save_pretrained(target_dir)
    if content is not None:
        results.write_text(content)
    arguments = ["stage", str(checkpoint), "--target", str(target_dir), "--repo-name", REPO_ID]
    arguments += ["--output-dir", str(tmp_path / "staged"), "--eval-results", str(results)]
    assert scylla_main(arguments) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "staged").exists()


def test_card_results_script_keeps_one_chain_row_per_set(draft, tokenizer, tmp_path: Path) -> None:
    from conftest import load_script

    script = load_script("scylla_card_results")
    rows = [
        {"set": "gsm8k", "method": "greedy", "prompts": 4, "tau": None, "speedup": 1.0},
        {"set": "gsm8k", "method": "scylla:d", "prompts": 4, "tau": 1.5912, "speedup": 1.1921},
        {"set": "gsm8k", "method": "scylla:d+tree4x2x8", "prompts": 4, "tau": 1.83, "speedup": 0.77},
        {"set": "gsm8k", "method": "scylla:d-no-lookup", "prompts": 4, "tau": 1.41, "speedup": 1.05},
        {"set": "mine", "method": "scylla:d", "prompts": 2, "tau": 1.2, "speedup": 0.9},
    ]
    entries = script.card_results({"rows": rows}, "greedy, CPU")
    assert [(e["dataset_type"], e["tau"], e["speedup"]) for e in entries] == [
        ("openai/gsm8k", 1.591, 1.192),
        ("local/mine", 1.2, 0.9),
    ]
    assert entries[1]["dataset_name"] == "mine (first 2)"
    card = ModelCard.load(stage(draft, tokenizer, tmp_path / "staged", eval_results=entries) / "README.md")
    assert len(card.data.eval_results) == 4  # tau and speed-up of each set
