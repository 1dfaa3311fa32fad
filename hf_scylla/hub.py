"""Stage a trained Scylla draft as a Hub repository folder, check it, and publish it in one commit.

A staged folder is everything a Hub user needs: the draft's ``config.json`` and safetensors weights
(draft-only unless ``config.save_embeddings``), the target's tokenizer files (the draft is tied to
that vocabulary; ``config.target_tokenizer_hash`` pins its fingerprint), a ``custom_generate/``
folder so that ``target.generate(..., custom_generate="<org>/<repo>", trust_remote_code=True)`` runs
Scylla speculative decoding, and a model card whose numbers come only from measured ``eval_results``.
`publish` validates the folder before any network call, so a partial folder is never uploaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx2
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from hf_common import __version__
from hf_common.default_model import DEFAULT_MODEL_ID, default_model_path, load_model_and_tokenizer
from hf_scylla.config import ScyllaDraftConfig, tokenizer_fingerprint
from hf_scylla.modeling import ScyllaDraftModel, check_finite_weights

__all__ = [
    "STAGE_MANIFEST",
    "PublishError",
    "PublishResult",
    "StagedFile",
    "StagedFolderError",
    "check_repo_id",
    "check_revision_tag",
    "check_staged_folder",
    "eval_result_entries",
    "load_draft_config",
    "measured_sets",
    "publish",
    "read_eval_results",
    "stage_checkpoint",
    "stage_draft",
]

PACKAGE_REQUIREMENT = f"hf-adamas-scylla-vrgd>={__version__}"
"""What ``custom_generate/requirements.txt`` asks for: the package that provides ``hf_scylla``."""

EVAL_METRICS = {
    "tau": ("mean_accepted_tokens", "Mean accepted length τ (tokens per draft-verify cycle)"),
    "speedup": ("speedup", "Speedup over plain autoregressive decoding"),
}
"""``eval_results`` keys that become model-index metrics: key -> (metric type, display name)."""

EVAL_DESCRIPTION_KEYS = ("dataset_name", "dataset_type", "dataset_split", "setting")
"""``eval_results`` keys that describe the measurement; ``dataset_name`` and ``dataset_type`` are required."""

REQUIRED_FILES = (
    "config.json",
    "README.md",
    "custom_generate/generate.py",
    "custom_generate/draft_repo.py",
    "custom_generate/requirements.txt",
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
STAGE_MANIFEST = ".hf-scylla-stage.json"
"""Written by `stage_draft` into the folder it stages: the files it wrote, the only ones a re-stage replaces.
Never uploaded."""
_DRAFT_REPO_LINE = re.compile(r'^DRAFT_REPO_ID = "([^"]+)"$', re.MULTILINE)

RECIPE_DIR = Path(__file__).resolve().parent / "custom_generate"
"""The packaged ``custom_generate`` recipe: staging copies its ``generate.py`` unchanged and its
``draft_repo.py`` with the staged repository's id filled in."""


class StagedFolderError(ValueError):
    """A staged folder is missing files or holds a config, weights or card that does not load."""


class PublishError(RuntimeError):
    """Publishing was refused (no or rejected token, repository or tag exists) before anything was uploaded."""


@dataclass(frozen=True)
class StagedFile:
    """One file of a staged folder as it would be uploaded."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PublishResult:
    """What `publish` did: the files sent (or that would be, with ``dry_run``) and where they landed."""

    repo_id: str
    files: list[StagedFile]
    dry_run: bool
    repo_url: str | None = None
    commit_oid: str | None = None
    commit_url: str | None = None
    tag: str | None = None


def check_repo_id(repo_id: str) -> None:
    """The Hub's rules for ``<org>/<name>``: letters, digits, ``-_.``; no ``--``/``..``; no ``-``/``.`` at the ends."""
    parts = repo_id.split("/")
    valid = len(parts) == 2 and all(
        re.fullmatch(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?", part) for part in parts
    )
    if not valid or "--" in repo_id or ".." in repo_id:
        raise ValueError(
            f"Expected a Hub repository id '<org>/<name>' (letters, digits, '-', '_', '.'; no '--' or '..'; "
            f"not starting or ending with '-' or '.'), got {repo_id!r}"
        )


def check_revision_tag(tag: str) -> None:
    """Refuse a tag git cannot name (spaces, ``..``, ``~^:?*[\\``, a leading ``-``...) before any upload."""
    invalid = (
        not tag
        or re.search(r"[\s~^:?*\[\\]|\.\.|@\{|//", tag)
        or tag.startswith(("-", "/", "."))
        or tag.endswith(("/", ".", ".lock"))
        or tag == "@"
    )
    if invalid:
        raise ValueError(
            f"Tag {tag!r} is not a valid git tag name (no spaces, '..', '~^:?*[\\', '@{{' or '//'; not "
            "starting with '-', '/' or '.'; not ending with '/', '.' or '.lock'), e.g. 'v1'"
        )


def _check_eval_results(eval_results: dict) -> None:
    """Refuse unknown keys and non-numbers so a typo never silently drops (or invents) a result."""
    unknown = sorted(set(eval_results) - set(EVAL_METRICS) - set(EVAL_DESCRIPTION_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown eval_results keys {unknown}; expected metrics {sorted(EVAL_METRICS)} and "
            f"descriptions {list(EVAL_DESCRIPTION_KEYS)}"
        )
    missing = [key for key in ("dataset_name", "dataset_type") if not eval_results.get(key)]
    if missing:
        raise ValueError(f"eval_results must name the dataset it was measured on; missing {missing}")
    metrics = {key: eval_results[key] for key in EVAL_METRICS if key in eval_results}
    if not metrics:
        raise ValueError(
            f"eval_results holds no measured metric; give at least one of {sorted(EVAL_METRICS)}"
        )
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"eval_results[{key!r}] must be a finite number, got {value!r}")
    if metrics.get("tau", 1.0) < 1.0:
        raise ValueError(f"tau counts tokens accepted per cycle (>= 1), got {metrics['tau']}")
    if metrics.get("speedup", 1.0) <= 0.0:
        raise ValueError(f"speedup must be positive, got {metrics['speedup']}")


def measured_sets(eval_results: dict | list[dict]) -> list[dict]:
    """``eval_results`` as a list, one checked entry per prompt set it was measured on."""
    entries = [eval_results] if isinstance(eval_results, dict) else list(eval_results)
    if not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(
            "eval_results must be a JSON object or a non-empty list of them (one per prompt set)"
        )
    for entry in entries:
        _check_eval_results(entry)
    return entries


def eval_result_entries(eval_results: dict | list[dict]) -> list[EvalResult]:
    """Model-index entries of measured ``tau`` / ``speedup`` (``eval_results`` as in `stage_draft`), checked."""
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Speculative decoding",
            dataset_type=entry["dataset_type"],
            dataset_name=entry["dataset_name"],
            dataset_split=entry.get("dataset_split"),
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=float(entry[key]),
        )
        for entry in measured_sets(eval_results)
        for key, (metric_type, metric_name) in EVAL_METRICS.items()
        if key in entry
    ]


def _card_data(
    config: ScyllaDraftConfig, repo_name: str, eval_results: dict | list[dict] | None, datasets: list[str]
) -> ModelCardData:
    model_index = eval_result_entries(eval_results) if eval_results else None
    return ModelCardData(
        license="apache-2.0",
        base_model=config.target_name_or_path,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["speculative-decoding", "scylla", "eagle", "draft-model", "custom_generate"],
        datasets=datasets or None,
        model_name=repo_name,
        eval_results=model_index,
    )


RESULTS_PLACEHOLDER = "Not evaluated yet: no acceptance length or speedup has been measured for this draft."
"""The card's "## Results" line until results exist; ``hf-scylla eval --card`` replaces it."""


def _results_section(eval_results: dict | list[dict] | None) -> str:
    """One table row per measured prompt set, then the settings they were measured in."""
    if not eval_results:
        return f"{RESULTS_PLACEHOLDER}\n"
    entries = measured_sets(eval_results)
    header = "| Prompt set | " + " | ".join(name for _, name in EVAL_METRICS.values()) + " |"
    rows = [header, "|---|" + "---|" * len(EVAL_METRICS)]
    for entry in entries:
        dataset = f"{entry['dataset_name']} (`{entry['dataset_type']}`"
        dataset += f", {entry['dataset_split']} split)" if entry.get("dataset_split") else ")"
        values = [f"{float(entry[key]):.3g}" if key in entry else "-" for key in EVAL_METRICS]
        rows.append(f"| {dataset} | " + " | ".join(values) + " |")
    settings = list(dict.fromkeys(entry["setting"] for entry in entries if entry.get("setting")))
    setting = "".join(f"\nSetting: {text}.\n" for text in settings)
    return "\n".join(rows) + "\n" + setting


def _card_body(
    config: ScyllaDraftConfig,
    repo_name: str,
    eval_results: dict | list[dict] | None,
    datasets: list[str],
    training_notes: str | None,
) -> str:
    target = config.target_name_or_path
    fusion = (
        f"; it reads a learned fusion of layers {config.target_hidden_layers} (EAGLE-3)"
        if config.target_hidden_layers
        else ""
    )
    trained_on = ", ".join(f"`{name}`" for name in datasets) if datasets else "data not recorded in this card"
    shared = (
        "it also stores the target's embedding and LM head"
        if config.save_embeddings
        else "it stores only `fc` and the decoder layers and borrows the embedding and LM head from the target"
    )
    return f"""
# {repo_name}

A Scylla draft head ([arXiv 2505.07858](https://arxiv.org/abs/2505.07858)) for speculative decoding
of [{target}](https://huggingface.co/{target}). Like EAGLE, it reads the target's hidden state and
the next token's embedding, runs {config.num_hidden_layers} Llama decoder layer(s) and predicts the
target's next hidden state, which the target's own LM head turns into draft tokens; {shared}.
Verification is done by the target, so outputs equal the target's own greedy or sampled decoding.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

target = AutoModelForCausalLM.from_pretrained("{target}")
tokenizer = AutoTokenizer.from_pretrained("{target}")
inputs = tokenizer("The capital of France is", return_tensors="pt")
output = target.generate(
    **inputs, custom_generate="{repo_name}", trust_remote_code=True, max_new_tokens=64
)
print(tokenizer.decode(output[0]))
```

`custom_generate/generate.py` needs the `hf_scylla` package (`pip install "{PACKAGE_REQUIREMENT}"`);
pass `revision=` to `generate` to pin both the recipe and the draft weights to one revision. With
`hf_scylla` directly:

```python
from hf_scylla import ScyllaDraftModel, generate

draft = ScyllaDraftModel.from_pretrained("{repo_name}", target=target, target_tokenizer=tokenizer)
result = generate(target, draft, inputs["input_ids"], max_new_tokens=64)
print(result.stats)
```

## Training

Trained to predict the target's hidden states (layer index {config.target_hidden_layer}{fusion}) on
{trained_on}. The draft drafts up to {config.max_draft_tokens} tokens per cycle
(confidence threshold {config.confidence_threshold}){_lookup_sentence(config)}. The target's tokenizer is included; its
fingerprint `{config.target_tokenizer_hash}` is checked when a tokenizer is passed to `from_pretrained`.

{training_notes or "No further training details (objective, steps, hyperparameters) were recorded."}

## Results

{_results_section(eval_results)}
## Limitations

- Works only with the target it was trained for (same hidden size, vocabulary and tokenizer).
- transformers' assisted decoding verifies one chain at a time: batch size 1, no tree attention.
- Speedups depend on hardware, dtype and prompt domain; acceptance drops on text unlike the
  training data.
"""


def stage_draft(
    draft: ScyllaDraftModel,
    target_tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    *,
    repo_name: str,
    eval_results: dict | list[dict] | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    base_model: str | None = None,
    training_notes: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete Hub repository folder for ``draft`` into ``output_dir`` and return its path.

    ``repo_name`` (``<org>/<name>``) is written into ``custom_generate/draft_repo.py``, so the recipe loads the
    draft from that repository. ``eval_results`` holds measured ``tau`` and/or ``speedup`` with
    ``dataset_name``/``dataset_type`` (optional ``dataset_split``, ``setting``), or a list of such
    entries, one per prompt set (one card row each); without it the card
    says "not evaluated yet". ``base_model`` (the target's Hub id) defaults to
    ``config.target_name_or_path``; it and the tokenizer fingerprint are recorded in ``draft.config``,
    so the saved config pins the target. ``training_notes`` (objective, steps, hyperparameters) goes
    into the card's Training section as given.

    Nothing but staged files is ever replaced, and nothing is deleted wholesale: the files are written
    into a scratch folder first, then moved in, and a manifest (`STAGE_MANIFEST`) records them. A
    non-empty ``output_dir`` is accepted only when an earlier stage wrote it (it has the manifest) and
    ``overwrite`` is set, and then only the files that manifest lists are replaced. A folder that is or
    holds the checkpoint or tokenizer being staged is always refused (`FileExistsError`).
    """
    check_repo_id(repo_name)
    base_model = base_model or draft.config.target_name_or_path
    if not base_model:
        raise ValueError("The draft's config names no target model: pass base_model='<org>/<target>'")
    if eval_results:
        measured_sets(eval_results)
    config = draft.config
    fingerprint = tokenizer_fingerprint(target_tokenizer)
    if config.target_tokenizer_hash not in (None, fingerprint):
        raise ValueError(
            f"The draft was trained with tokenizer fingerprint {config.target_tokenizer_hash}, but the given "
            f"tokenizer has fingerprint {fingerprint}: stage it with its target's tokenizer"
        )
    if config.save_embeddings and not draft.is_attached:
        raise ValueError(
            "config.save_embeddings is set but the draft has no target attached: call attach_target"
        )
    check_finite_weights(draft)
    output_dir = Path(output_dir)
    replaceable = _replaceable_files(output_dir, overwrite, _sources_of(draft, target_tokenizer))
    config.target_name_or_path = base_model
    config.target_tokenizer_hash = fingerprint
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))  # ours: removed below
    try:
        _write_staged_files(
            draft, target_tokenizer, scratch, repo_name, eval_results, list(datasets), training_notes
        )
        written = sorted(
            path.relative_to(scratch).as_posix() for path in scratch.rglob("*") if path.is_file()
        )
        foreign = [name for name in written if (output_dir / name).exists() and name not in replaceable]
        if foreign:
            raise FileExistsError(
                f"{output_dir} holds {foreign}, which hf-scylla stage did not write there; move them away "
                "or choose another output folder"
            )
        for name in replaceable:  # only what an earlier stage wrote; anything else in the folder stays
            (output_dir / name).unlink(missing_ok=True)
        for name in written:
            destination = output_dir / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / name, destination)
        manifest = {"written_by": "hf-scylla stage", "repo_name": repo_name, "files": written}
        (output_dir / STAGE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name in replaceable:  # folders an earlier stage created and that are now empty (e.g. old shards')
        parent = (output_dir / name).parent
        if parent != output_dir and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return output_dir


def read_eval_results(path: str | os.PathLike) -> dict | list[dict]:
    """A JSON file of measured results for the card, checked as `stage_draft` will use it.

    Raises ``FileNotFoundError`` or a ``ValueError`` saying what is wrong, before anything is loaded.
    """
    path = Path(path)
    try:
        eval_results = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"file {path} not found") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a JSON file: {error}") from None
    try:
        measured_sets(eval_results)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return eval_results


def _lookup_sentence(config: ScyllaDraftConfig) -> str:
    """The card's words for the config's prompt-lookup setting (empty when it is off)."""
    if not config.lookup_tokens:
        return ""
    ngrams = sorted({config.lookup_min_ngram, config.lookup_max_ngram}, reverse=True)
    return (
        f"; when the last {' or '.join(map(str, ngrams))} tokens occurred earlier in the "
        f"sequence, a cycle proposes the up to {config.lookup_tokens} tokens that followed them instead "
        "(prompt lookup)"
    )


def load_draft_config(
    checkpoint: str | os.PathLike,
    max_draft_tokens: int | None = None,
    confidence_threshold: float | None = None,
    lookup_tokens: int | None = None,
) -> ScyllaDraftConfig:
    """``checkpoint``'s draft config with the given (non-``None``) overrides, validated as a new config is."""
    config_dict, _ = ScyllaDraftConfig.get_config_dict(checkpoint)
    overrides = {
        "max_draft_tokens": max_draft_tokens,
        "confidence_threshold": confidence_threshold,
        "lookup_tokens": lookup_tokens,
    }
    return ScyllaDraftConfig.from_dict(config_dict | {k: v for k, v in overrides.items() if v is not None})


def stage_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    repo_name: str,
    target: str | None = None,
    base_model: str | None = None,
    eval_results: dict | list[dict] | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    training_notes: str | None = None,
    max_draft_tokens: int | None = None,
    confidence_threshold: float | None = None,
    lookup_tokens: int | None = None,
    overwrite: bool = False,
) -> Path:
    """`stage_draft` for a saved draft folder, with its target's tokenizer (``target``: Hub id or folder,
    default the config's target; the default model's comes from the embedded copy, so this works offline).

    ``max_draft_tokens`` / ``confidence_threshold`` / ``lookup_tokens`` are stored in the staged config
    (e.g. the benchmarked ones). The target itself is loaded only when the config keeps the shared tensors.
    """
    check_repo_id(repo_name)
    config = load_draft_config(checkpoint, max_draft_tokens, confidence_threshold, lookup_tokens)
    target_name = target or config.target_name_or_path
    if not target_name:
        raise ValueError("the draft config names no target; pass --target")
    embedded = target_name == DEFAULT_MODEL_ID and not Path(target_name).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path() if embedded else target_name)
    draft = ScyllaDraftModel.from_pretrained(checkpoint, config=config)
    if draft.config.save_embeddings and not draft.is_attached:
        draft.attach_target(load_model_and_tokenizer(target_name)[0], tokenizer)
    return stage_draft(
        draft,
        tokenizer,
        output_dir,
        repo_name=repo_name,
        eval_results=eval_results,
        datasets=datasets,
        training_notes=training_notes,
        base_model=base_model or draft.config.target_name_or_path or target_name,
        overwrite=overwrite,
    )


def _sources_of(draft: ScyllaDraftModel, tokenizer: PreTrainedTokenizerBase) -> list[Path]:
    """Local folders the draft and tokenizer were loaded from: a staging folder may never cover them."""
    names = (getattr(draft, "name_or_path", ""), getattr(tokenizer, "name_or_path", ""))
    return [Path(name).resolve() for name in names if name and Path(name).is_dir()]


def _replaceable_files(output_dir: Path, overwrite: bool, sources: list[Path]) -> list[str]:
    """The files of ``output_dir`` a new stage may replace: those an earlier stage listed in its manifest.

    Refuses a folder that is or contains a ``source``, a non-empty folder without the manifest (the
    current folder, a home folder, a repository: no stage wrote them), and an earlier stage's folder
    without ``overwrite``.
    """
    resolved = output_dir.resolve()
    for source in sources:
        if source == resolved or resolved in source.parents:
            raise FileExistsError(
                f"{output_dir} is or contains {source}, which is being staged: choose another output folder"
            )
    if not output_dir.exists():
        return []
    if not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file, not a folder")
    if not any(output_dir.iterdir()):
        return []
    manifest_path = output_dir / STAGE_MANIFEST
    if not manifest_path.is_file():
        raise FileExistsError(
            f"{output_dir} is not empty and was not written by hf-scylla stage (no {STAGE_MANIFEST}); "
            "nothing in it is replaced, even with overwrite: choose a new or empty folder"
        )
    if not overwrite:
        raise FileExistsError(
            f"{output_dir} holds an earlier staged draft; pass overwrite=True (--overwrite) to replace "
            "the files that stage wrote (only those)"
        )
    try:
        names = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise FileExistsError(f"{manifest_path} does not parse ({error}); nothing was replaced") from error
    for name in names:
        if (
            not isinstance(name, str)
            or PurePosixPath(name).is_absolute()
            or ".." in PurePosixPath(name).parts
        ):
            raise FileExistsError(
                f"{manifest_path} lists {name!r}, a path outside {output_dir}; nothing was replaced"
            )
    return names


def _write_staged_files(
    draft: ScyllaDraftModel,
    target_tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    repo_name: str,
    eval_results: dict | list[dict] | None,
    datasets: list[str],
    training_notes: str | None,
) -> None:
    """Everything a staged repository holds (but the manifest), written into the empty ``folder``."""
    draft.save_pretrained(folder)
    target_tokenizer.save_pretrained(folder)
    recipe_dir = folder / "custom_generate"
    recipe_dir.mkdir()
    shutil.copyfile(RECIPE_DIR / "generate.py", recipe_dir / "generate.py")
    draft_repo_py = (RECIPE_DIR / "draft_repo.py").read_text(encoding="utf-8")
    draft_repo_py = draft_repo_py.replace("DRAFT_REPO_ID = None", f'DRAFT_REPO_ID = "{repo_name}"')
    (recipe_dir / "draft_repo.py").write_text(draft_repo_py, encoding="utf-8")
    (recipe_dir / "requirements.txt").write_text(PACKAGE_REQUIREMENT + "\n", encoding="utf-8")
    card_data = _card_data(draft.config, repo_name, eval_results, datasets)
    body = _card_body(draft.config, repo_name, eval_results, datasets, training_notes)
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").save(folder / "README.md")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_staged_folder(folder: str | os.PathLike, repo_id: str | None = None) -> list[StagedFile]:
    """Validate a staged folder without any network call and list its files (path, size, sha256).

    Checks that the config loads as a `ScyllaDraftConfig`, the weights load as a complete draft, the
    README has license and base-model metadata and ``custom_generate/`` is present; with ``repo_id``,
    that ``custom_generate/draft_repo.py`` names that repository. Raises `StagedFolderError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StagedFolderError(f"{folder} is not a directory; stage a draft there first (hf-scylla stage)")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise StagedFolderError(f"{folder} is not a complete staged draft: missing {missing}")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type != ScyllaDraftConfig.model_type:
            raise ValueError(f"model_type is {model_type!r}, not {ScyllaDraftConfig.model_type!r}")
        ScyllaDraftConfig.from_pretrained(folder)
    except (ValueError, TypeError, OSError) as error:
        raise StagedFolderError(f"{folder}/config.json is not a Scylla draft config: {error}") from error
    verbosity = transformers_logging.get_verbosity()
    # A draft-only checkpoint lacks the shared tensors by design; transformers' load report would call
    # them "newly initialized", which is noise here (a missing *draft* weight still raises).
    transformers_logging.set_verbosity_error()
    try:
        ScyllaDraftModel.from_pretrained(folder)
    except ValueError as error:
        raise StagedFolderError(
            f"The weights in {folder} do not load as a complete draft: {error}"
        ) from error
    finally:
        transformers_logging.set_verbosity(verbosity)
    try:
        card_data = ModelCard.load(folder / "README.md").data
    except ValueError as error:
        raise StagedFolderError(f"{folder}/README.md metadata does not parse: {error}") from error
    if not card_data.license or not card_data.base_model:
        raise StagedFolderError(f"{folder}/README.md lacks model-card metadata (license, base_model)")
    if repo_id is not None:
        draft_repo_py = (folder / "custom_generate" / "draft_repo.py").read_text(encoding="utf-8")
        staged_for = _DRAFT_REPO_LINE.search(draft_repo_py)
        if staged_for is None or staged_for.group(1) != repo_id:
            found = staged_for.group(1) if staged_for else None
            raise StagedFolderError(
                f"custom_generate/draft_repo.py names {found!r}, not {repo_id!r}: "
                f"re-stage with repo_name={repo_id!r}"
            )
    return [
        StagedFile(path.relative_to(folder).as_posix(), path.stat().st_size, _sha256(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != STAGE_MANIFEST
    ]


def publish(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    revision_tag: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
) -> PublishResult:
    """Upload a staged folder to ``repo_id`` in one commit, optionally tagging that commit.

    The folder is validated first (`check_staged_folder`); ``dry_run`` stops there and makes no network
    call. ``token`` and ``endpoint`` default to ``HF_TOKEN`` and ``HF_ENDPOINT``. An existing repository
    is refused unless ``overwrite`` (then files absent from the folder are deleted in the same commit);
    an existing ``revision_tag`` is always refused. Both refusals happen before any upload.
    """
    check_repo_id(repo_id)
    if revision_tag is not None:
        check_revision_tag(revision_tag)
    files = check_staged_folder(folder, repo_id)
    if dry_run:
        return PublishResult(repo_id=repo_id, files=files, dry_run=True, tag=revision_tag)
    token = token or get_token()
    if not token:
        raise PublishError("No Hub token: pass token=..., set HF_TOKEN, or run `hf auth login`")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=token)
    try:
        repo_url, commit = _upload(api, folder, repo_id, files, revision_tag, private, overwrite)
    except httpx2.TransportError as error:  # no route, refused connection, DNS failure, timeout
        raise PublishError(
            f"cannot reach {api.endpoint} ({type(error).__name__}: {error}); check --endpoint / HF_ENDPOINT "
            "and the network. Nothing was uploaded unless the Hub reports a commit."
        ) from error
    return PublishResult(
        repo_id=repo_id,
        files=files,
        dry_run=False,
        repo_url=str(repo_url),
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        tag=revision_tag,
    )


def _upload(
    api: HfApi,
    folder: str | os.PathLike,
    repo_id: str,
    files: list[StagedFile],
    revision_tag: str | None,
    private: bool,
    overwrite: bool,
):
    """Create the repository (or, with ``overwrite``, reuse it), upload in one commit, tag it."""
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=False)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise PublishError(
                f"The Hub at {api.endpoint} refused the token ({status}): it needs write access to {repo_id}"
            ) from error
        if status != 409:
            raise
        if not overwrite:
            raise PublishError(
                f"The repository {repo_id} already exists; pass overwrite=True (--overwrite) to replace its files"
            ) from error
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        existing_tags = {ref.name for ref in api.list_repo_refs(repo_id).tags}
    else:
        existing_tags = set()
    if revision_tag in existing_tags:
        raise PublishError(f"Tag {revision_tag!r} already exists in {repo_id}; a tag names one release")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=f"Upload Scylla draft ({len(files)} files)",
        delete_patterns="*" if overwrite else None,
        ignore_patterns=[STAGE_MANIFEST],
    )
    if revision_tag is not None:
        api.create_tag(repo_id, tag=revision_tag, revision=commit.oid)
    return repo_url, commit
