"""Training a Scylla draft: the EAGLE loss on cached target features, driven by the transformers Trainer.

The loss (EAGLE-1, arXiv 2401.15077) at position t, for the pair ``(h_t, x_{t+1})``:

    L_t = w_f * SmoothL1(f_t, h_{t+1}) + w_p * CE(softmax(lm_head(h_{t+1})), lm_head(f_t))

``f_t`` is the draft's predicted feature; the token term distils the target's own next-token
distribution through the shared LM head (soft labels). With ``unroll_steps > 1`` the draft is run
again on its own (detached) predictions, as it is from the second drafted token on at inference,
and step k is weighted ``step_decay**k``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from hf_scylla.config import ScyllaDraftConfig, tokenizer_fingerprint
from hf_scylla.data import (
    default_text_sources,
    differing_keys,
    encode_prompt,
    read_conversations,
    regenerate_responses,
    sources_fingerprint,
    text_token_chunks,
)
from hf_scylla.modeling import ScyllaDraftModel
from hf_scylla.vocab import count_tokens, draft_target_ids

__all__ = [
    "EagleLoss",
    "FeatureDataset",
    "FeatureSource",
    "build_features",
    "cache_target_features",
    "cache_text_features",
    "collate_features",
    "eagle_loss",
    "feature_cache_for",
    "feature_cache_path",
    "make_draft",
    "pad_records",
    "train_draft",
    "trained_positions",
    "trained_token_counts",
    "trainer_defaults",
    "weights_fingerprint",
]


@dataclass
class EagleLoss:
    """The weighted total and, for logging, the first step's feature loss, token loss and top-1 agreement."""

    loss: torch.Tensor
    feature_loss: torch.Tensor
    token_loss: torch.Tensor
    accuracy: torch.Tensor


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def eagle_loss(
    draft: ScyllaDraftModel,
    input_ids: torch.LongTensor,
    hidden_states: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    fused_states: torch.Tensor | None = None,
    unroll_steps: int = 1,
    feature_weight: float = 1.0,
    token_weight: float = 0.1,
    step_decay: float = 0.8,
    noise_std: float = 0.0,
) -> EagleLoss:
    """EAGLE loss of ``draft`` on one batch of target features.

    Args:
        input_ids: ``(B, T)`` tokens.
        hidden_states: ``(B, T, target_hidden)`` the target's final normed hidden states of ``input_ids``.
        loss_mask: ``(B, T)`` 1 on the tokens to learn from (e.g. the response), 0 on prompt and padding.
        fused_states: ``(B, T, layers x target_hidden)`` the states of ``config.target_hidden_layers``,
            concatenated (layer-fusion drafts only): the first pass reads their ``fuse``.
        unroll_steps: passes over the draft's own predicted features (1: teacher forcing only).
        noise_std: std of uniform noise added to the input features (EAGLE uses 0.2 x U(-0.5, 0.5)).
        token_weight: weight of the distillation term; 0 skips the LM head (vocab-sized logits), which
            dominates the cost of a small draft, and reports ``token_loss``/``accuracy`` as NaN.
    """
    if draft.config.target_hidden_layer != -1:
        raise ValueError(
            f"eagle_loss distils through the LM head, so the draft must read the final hidden state "
            f"(target_hidden_layer=-1), got {draft.config.target_hidden_layer}"
        )
    if (draft.fuse is None) != (fused_states is None):
        raise ValueError(
            "a layer-fusion draft trains on fused_states (cache features with its target_hidden_layers), "
            "and only such a draft does"
        )
    hidden_states = hidden_states.to(draft.fc.weight.dtype)
    # Pair t = (h_t, x_{t+1}) counts when x_{t+1} is a masked-in token; it predicts h_{t+1} and x_{t+2}.
    mask = (loss_mask if loss_mask is not None else torch.ones_like(input_ids))[:, 1:].to(hidden_states.dtype)
    read = hidden_states if fused_states is None else draft.fuse(fused_states.to(draft.fuse.weight.dtype))
    tokens, features_in, next_features = input_ids[:, 1:], read[:, :-1], hidden_states[:, 1:]
    distil = token_weight > 0
    # A reduced head (FR-Spec, EAGLE-3) distils the target's distribution renormalized on its subset,
    # so the token term costs draft_vocab_size / vocab_size of a full one.
    subset = draft_target_ids(draft.d2t) if draft.config.draft_vocab_size else None
    if distil:
        with torch.no_grad():
            target_log_probs = draft.lm_head(next_features).float().log_softmax(dim=-1)
    total = hidden_states.new_zeros(())
    token_loss = accuracy = torch.tensor(float("nan"))
    for step in range(unroll_steps):
        if noise_std > 0:
            features_in = features_in + (torch.rand_like(features_in) - 0.5) * noise_std
        out = draft(tokens, features_in, logits_to_keep=0 if distil else 1)
        feature_loss = _masked_mean(
            F.smooth_l1_loss(out.features, next_features, reduction="none").mean(-1), mask
        )
        step_loss = feature_weight * feature_loss
        if distil:
            logits = out.logits if subset is None else out.logits.index_select(-1, subset)
            log_probs = logits.float().log_softmax(dim=-1)
            step_token_loss = _masked_mean(-(target_log_probs.exp() * log_probs).sum(-1), mask)
            step_loss = step_loss + token_weight * step_token_loss
        total = total + step_decay**step * step_loss
        if step == 0:
            first_feature_loss = feature_loss.detach()
            if distil:
                token_loss = step_token_loss.detach()
                agreement = (log_probs.argmax(-1) == target_log_probs.argmax(-1)).to(mask.dtype)
                accuracy = _masked_mean(agreement, mask).detach()
        features_in = torch.cat([read[:, :1], out.features[:, :-1].detach()], dim=1)
    return EagleLoss(loss=total, feature_loss=first_feature_loss, token_loss=token_loss, accuracy=accuracy)


class FeatureDataset(Dataset):
    """Cached ``{"input_ids", "hidden_states", "loss_mask"}`` records; `save` / `load` with torch."""

    def __init__(self, records: list[dict[str, torch.Tensor]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.records[index]

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.records, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureDataset:
        """Read a saved file; a truncated or otherwise unreadable one is a `ValueError` naming it."""
        try:
            return cls(torch.load(path, weights_only=True))
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
            raise ValueError(
                f"feature cache {path} is corrupt or truncated ({error}); delete it and rerun to rebuild it"
            ) from None

    @classmethod
    def cached(
        cls, path: str | os.PathLike, build: Callable[[], FeatureDataset], description: dict | None = None
    ) -> FeatureDataset:
        """Load ``path`` if it exists, else ``build()`` and save it there: target features are computed once.

        ``description`` (what the features were built from, see `feature_cache_path`) is saved next to
        them as ``<path>.json``; a file whose saved description differs is refused, never reused.
        """
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if path.is_file():
            if description is not None and sidecar.is_file():
                changed = differing_keys(description, json.loads(sidecar.read_text()))
                if changed:
                    raise ValueError(
                        f"{path} was built from other inputs (differing: {', '.join(changed)}; see {sidecar}): "
                        "it is not reused for this run"
                    )
            return cls.load(path)
        features = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        features.save(path)
        if description is not None:
            sidecar.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
        return features


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's tensors (names, shapes and ~4K evenly spaced values of each): another
    checkpoint or a fine-tuned copy of the same architecture gets another fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def feature_cache_path(folder: str | os.PathLike, stem: str, description: dict) -> Path:
    """``<folder>/<stem>-<hash>.pt``: the hash covers the whole ``description`` (target identity and
    weights, tokenizer and chat template, data and its content hash, lengths, counts, feature layer...),
    so a change in any input names a new cache file instead of reusing the old one."""
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    return Path(folder) / f"{stem}-{key}.pt"


@dataclass(frozen=True)
class FeatureSource:
    """What one run's target features are built from.

    ``stage="pretrain"``: ``tokens`` tokens of general text from ``text`` (default:
    `default_text_sources`) in windows of ``max_length``. ``"finetune"``: the first ``samples``
    conversations of ``data``, truncated to ``max_length``; with ``regenerate_tokens`` their responses
    are replaced by the target's own greedy answers of at most that many tokens. ``fused_layers``
    also keeps the states of those ``hidden_states`` indices (a layer-fusion draft's input).
    """

    stage: str
    max_length: int
    data: Path | None = None
    samples: int = 0
    text: Sequence[Path] | None = None
    tokens: int = 0
    regenerate_tokens: int | None = None
    fused_layers: tuple[int, ...] | None = None


def feature_cache_for(
    folder: str | os.PathLike,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target_name: str,
    source: FeatureSource,
) -> tuple[Path, dict]:
    """Where the target features of ``source`` are cached in ``folder``, and the description that
    names them (see `feature_cache_path`). Raises ``FileNotFoundError`` for a missing source."""
    description = {
        "stage": source.stage,
        "target": target_name,
        "target_weights": weights_fingerprint(target),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": tokenizer.chat_template,
        "max_length": source.max_length,
        "feature_layer": -1,  # hidden_states[-1], the final normed state
        "feature_dtype": "bfloat16",
    }
    if source.stage == "pretrain":
        sources = source.text or default_text_sources()
        description |= {"text": [str(Path(p).resolve()) for p in sources], "tokens": source.tokens}
        description["text_sha256"] = sources_fingerprint(sources)
        stem = f"features-text-{source.tokens}x{source.max_length}"
    else:
        description |= {"data": str(Path(source.data).resolve()), "samples": source.samples}
        description["data_sha256"] = sources_fingerprint([source.data])
        description["regenerate_tokens"] = source.regenerate_tokens
        regenerated = f"regen{source.regenerate_tokens}-" if source.regenerate_tokens is not None else ""
        stem = f"features-{regenerated}{source.samples}x{source.max_length}"
    if source.fused_layers is not None:  # absent otherwise: caches made before fusion keep their names
        description["fused_layers"] = list(source.fused_layers)
        stem += "-fused"
    return feature_cache_path(folder, stem, description), description


def build_features(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    source: FeatureSource,
    regenerate_dir: Path | None = None,
) -> FeatureDataset:
    """The target features of ``source``; regenerated responses are cached per target weights in
    ``regenerate_dir``."""
    if source.stage == "pretrain":
        text = source.text or default_text_sources()
        return cache_text_features(
            target,
            text_token_chunks(tokenizer, text, source.max_length, source.tokens),
            fused_layers=source.fused_layers,
        )
    conversations = read_conversations(source.data, source.samples)
    if source.regenerate_tokens is not None:
        regenerate_dir.mkdir(parents=True, exist_ok=True)
        cache = regenerate_dir / f"regenerated-{weights_fingerprint(target)}.jsonl"  # per target
        prompts = [prompt for prompt, _ in conversations]
        conversations = regenerate_responses(target, tokenizer, prompts, source.regenerate_tokens, cache)
    return cache_target_features(
        target, tokenizer, conversations, max_length=source.max_length, fused_layers=source.fused_layers
    )


def make_draft(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    depth: int = 1,
    checkpoint: str | os.PathLike | None = None,
) -> ScyllaDraftModel:
    """A draft attached to ``target`` on its device: loaded from ``checkpoint``, else new (seed 0, ``depth`` layers)."""
    if checkpoint is not None:
        draft = ScyllaDraftModel.from_pretrained(checkpoint, target=target, target_tokenizer=tokenizer)
    else:
        torch.manual_seed(0)
        draft = ScyllaDraftModel(ScyllaDraftConfig.from_target_config(target.config, depth, tokenizer))
        draft.attach_target(target, tokenizer)
    return draft.to(target.device)


def trained_token_counts(features: FeatureDataset, vocab_size: int) -> torch.Tensor:
    """How often each id is a learned token of ``features`` (the corpus a reduced draft head is ranked on)."""
    return count_tokens(
        (record["input_ids"][record["loss_mask"].bool()].tolist() for record in features.records), vocab_size
    )


def trained_positions(features: FeatureDataset) -> int:
    """How many (pair, target) positions the EAGLE loss learns from (masked-in tokens after the first)."""
    return sum(int(record["loss_mask"][1:].sum()) for record in features.records)


def _feature_record(
    target: PreTrainedModel,
    ids: torch.LongTensor,
    loss_mask: torch.Tensor,
    dtype: torch.dtype,
    fused_layers: Sequence[int] | None,
) -> dict[str, torch.Tensor]:
    layers = list(dict.fromkeys([-1, *(fused_layers or ())]))
    states = target(ids[None].to(target.device), output_hidden_states=layers, logits_to_keep=1).hidden_states
    record = {"input_ids": ids, "hidden_states": states[-1][0].to("cpu", dtype), "loss_mask": loss_mask}
    if fused_layers is not None:
        record["fused_states"] = torch.cat([states[layer][0] for layer in fused_layers], dim=-1).to(
            "cpu", dtype
        )
    return record


@torch.no_grad()
def cache_target_features(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[tuple[str, str]],
    max_length: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    fused_layers: Sequence[int] | None = None,
) -> FeatureDataset:
    """Run the target once over each ``(prompt, response)`` chat and keep its final hidden states (and,
    with ``fused_layers``, those layers' states concatenated as ``fused_states``).

    Only response tokens enter the loss (the prompt is context), as in EAGLE's SFT data.
    """
    records = []
    for prompt, response in tqdm(list(conversations), desc="caching target features", unit="sample"):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        ids = torch.tensor(full["input_ids"][:max_length])
        loss_mask = torch.zeros_like(ids)
        loss_mask[encode_prompt(tokenizer, prompt).shape[1] :] = 1
        records.append(_feature_record(target, ids, loss_mask, dtype, fused_layers))
    return FeatureDataset(records)


@torch.no_grad()
def cache_text_features(
    target: PreTrainedModel,
    chunks: Iterable[torch.LongTensor],
    dtype: torch.dtype = torch.bfloat16,
    fused_layers: Sequence[int] | None = None,
) -> FeatureDataset:
    """The pretraining stage's features: the target's hidden states over general-text windows
    (see `hf_scylla.data.text_token_chunks`); every token is learned."""
    records = [
        _feature_record(target, ids, torch.ones_like(ids), dtype, fused_layers)
        for ids in tqdm(list(chunks), desc="caching target features", unit="window")
    ]
    return FeatureDataset(records)


def pad_records(records: list[dict[str, torch.Tensor]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Right-pad the ``names`` tensors of a batch of records along their first (time) dimension with zeros."""
    length = max(len(record[names[0]]) for record in records)

    def pad(name: str) -> torch.Tensor:
        rows = []
        for record in records:
            value = record[name]
            padding = (0, 0) * (value.dim() - 1) + (0, length - value.shape[0])
            rows.append(F.pad(value, padding))
        return torch.stack(rows)

    return {name: pad(name) for name in names}


def collate_features(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch of cached records (padding is masked out of the loss)."""
    names = ("input_ids", "hidden_states", "loss_mask")
    return pad_records(records, names + (("fused_states",) if "fused_states" in records[0] else ()))


def trainer_defaults(output_dir: str | os.PathLike) -> dict:
    """`TrainingArguments` shared by the draft trainers: small-model AdamW settings, periodic checkpoints."""
    return {
        "output_dir": str(output_dir),
        "adam_beta2": 0.95,
        "max_grad_norm": 0.5,
        "warmup_steps": 10,
        "lr_scheduler_type": "cosine",
        "logging_steps": 10,
        "save_steps": 100,
        "save_total_limit": 2,
        "remove_unused_columns": False,
        "report_to": [],
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }


class _EagleTrainer(Trainer):
    """Trainer whose loss is `eagle_loss`; logs its parts next to the total."""

    def __init__(self, *args, loss_settings: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_settings = loss_settings

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = eagle_loss(model, **inputs, **self.loss_settings)
        if self.state.global_step % max(self.args.logging_steps, 1) == 0 and model.training:
            self.log(
                {
                    "feature_loss": float(result.feature_loss),
                    "token_loss": float(result.token_loss),
                    "top1_agreement": float(result.accuracy),
                }
            )
        return (result.loss, result) if return_outputs else result.loss


def train_draft(
    draft: ScyllaDraftModel,
    features: FeatureDataset,
    output_dir: str | os.PathLike,
    num_train_epochs: float = 1.0,
    per_device_train_batch_size: int = 8,
    learning_rate: float = 3e-4,
    unroll_steps: int = 2,
    noise_std: float = 0.2,
    token_weight: float = 0.1,
    resume: bool | str = False,
    **training_arguments,
):
    """Train ``draft`` (attached to its target) on cached features; checkpoints go to ``output_dir``.

    The shared embedding and LM head stay frozen and are not saved. ``resume=True`` continues from the
    last checkpoint in ``output_dir`` (optimizer, scheduler and step included), or from a given path.
    ``training_arguments`` override `TrainingArguments` (``max_steps``, ``save_steps``...).
    Returns the Trainer's ``TrainOutput``; the final draft is saved to ``output_dir``.
    """
    if not draft.is_attached:
        raise ValueError("attach the draft to its target before training (draft.attach_target(target))")
    if not trained_positions(features):
        raise ValueError(
            "no position is trained: every loss mask is 0 (the conversations were cut before their "
            "responses began; use a longer max_length)"
        )
    for parameter in (*draft.embed_tokens.parameters(), *draft.lm_head.parameters()):
        parameter.requires_grad_(False)
    arguments = trainer_defaults(output_dir) | {
        "num_train_epochs": num_train_epochs,
        "per_device_train_batch_size": per_device_train_batch_size,
        "learning_rate": learning_rate,
    }
    arguments.update(training_arguments)
    trainer = _EagleTrainer(
        model=draft,
        args=TrainingArguments(**arguments),
        train_dataset=features,
        data_collator=collate_features,
        loss_settings={"unroll_steps": unroll_steps, "noise_std": noise_std, "token_weight": token_weight},
    )
    draft.train()
    result = trainer.train(resume_from_checkpoint=resume or None)
    draft.eval()
    draft.save_pretrained(output_dir)
    return result
