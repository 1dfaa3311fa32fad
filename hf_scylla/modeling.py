"""`ScyllaDraftModel`: an EAGLE-style feature-level draft head of depth D (Scylla, arXiv 2505.07858).

At position t the draft reads the target's hidden state ``h_t`` and the embedding of the next token
``x_{t+1}``, fuses them with ``fc: 2h -> h``, runs D Llama decoder layers with its own KV cache, and
predicts the target's next hidden state ``h_{t+1}``; the target's own LM head turns that feature into
draft logits for ``x_{t+2}``. Embedding and LM head are the target's tensors (`attach_target`), so a
checkpoint holds only ``fc`` and the decoder layers unless ``config.save_embeddings`` is set.

With ``config.target_hidden_layers`` (EAGLE-3 layer fusion) the feature the draft reads at a verified
position is ``fuse([h^(l1)_t; h^(l2)_t; ...])`` over several target layers (`target_features`); drafted
positions read the draft's own predicted features as before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.utils import ModelOutput

from hf_common.compat import cache_kwargs
from hf_scylla.config import ScyllaDraftConfig, tokenizer_fingerprint
from hf_scylla.vocab import check_vocabulary_mapping, draft_target_ids, full_vocabulary_logits

__all__ = [
    "ScyllaDraftModel",
    "ScyllaDraftOutput",
    "add_layer_fusion",
    "check_draft_matches_target",
    "check_finite_weights",
]

SHARED_WITH_TARGET = ("embed_tokens.weight", "lm_head.weight")
"""State-dict keys that belong to the target and are saved only with ``config.save_embeddings``: the
embedding and the LM head, or, for a reduced-vocabulary head, the target's head rows it is made of
(rebuilt from ``d2t`` by `ScyllaDraftModel.attach_target`)."""


@dataclass
class ScyllaDraftOutput(ModelOutput):
    """Predicted next target features ``(B, S, target_hidden)``, their logits and the draft cache."""

    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: DynamicCache | None = None


def check_draft_matches_target(
    config: ScyllaDraftConfig,
    target_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise a `ValueError` naming both values when the draft was built for another target."""
    text_config = target_config.get_text_config()
    if text_config.hidden_size != config.target_hidden_size:
        raise ValueError(
            f"Draft was trained for a target with hidden size {config.target_hidden_size}, but this target "
            f"has hidden size {text_config.hidden_size}"
        )
    if text_config.vocab_size != config.target_vocab_size:
        raise ValueError(
            f"Draft was trained for a target with vocab size {config.target_vocab_size}, but this target "
            f"has vocab size {text_config.vocab_size}"
        )
    num_states = text_config.num_hidden_layers + 1
    for layer in (config.target_hidden_layer, *(config.target_hidden_layers or ())):
        if not -num_states <= layer < num_states:
            raise ValueError(
                f"Draft reads hidden layer {layer}, but this target has only "
                f"{num_states} hidden states (embeddings + {text_config.num_hidden_layers} layers)"
            )
    if config.target_hidden_layers and len(
        {layer % num_states for layer in config.target_hidden_layers}
    ) != len(config.target_hidden_layers):
        raise ValueError(
            f"Draft fuses hidden layers {config.target_hidden_layers}, which name the same state twice for a "
            f"target of {text_config.num_hidden_layers} layers"
        )
    if tokenizer is not None and config.target_tokenizer_hash is not None:
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != config.target_tokenizer_hash:
            raise ValueError(
                f"Draft was trained with tokenizer fingerprint {config.target_tokenizer_hash}, but the given "
                f"tokenizer has fingerprint {fingerprint} (different vocabulary)"
            )


def check_finite_weights(draft: ScyllaDraftModel) -> None:
    """Raise a `ValueError` naming the tensors with NaN or inf values (the target's shared ones excluded
    unless the draft stores them): such a draft drafts garbage, so it is refused on load and on staging."""
    shared = () if draft.config.save_embeddings else SHARED_WITH_TARGET
    broken = [
        name
        for name, tensor in draft.state_dict().items()
        if name not in shared and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if broken:
        source = f" from {draft.name_or_path}" if draft.name_or_path else ""
        raise ValueError(
            f"The Scylla draft{source} has NaN or inf weights in {len(broken)} tensors, e.g. {broken[:3]} "
            "(a diverged training run?): retrain it or use an earlier checkpoint"
        )


class ScyllaDraftModel(PreTrainedModel):
    """Scylla draft head: ``fc`` + D Llama decoder layers, sharing the target's embedding and LM head.

    Build one with ``ScyllaDraftModel(ScyllaDraftConfig.from_target_config(target.config, D))`` and
    call `attach_target`; load one with ``ScyllaDraftModel.from_pretrained(path, target=target)``.
    """

    config_class = ScyllaDraftConfig
    config: ScyllaDraftConfig
    base_model_prefix = "scylla_draft"
    supports_gradient_checkpointing = True
    _no_split_modules = ("LlamaDecoderLayer",)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: ScyllaDraftConfig):
        super().__init__(config)
        target_hidden = config.target_hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, target_hidden)
        fused = len(config.target_hidden_layers or ())
        self.fuse = nn.Linear(fused * target_hidden, target_hidden, bias=False) if fused else None
        self.fc = nn.Linear(2 * target_hidden, config.hidden_size, bias=False)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, index) for index in range(config.num_hidden_layers)
        )
        # A draft narrower than its target maps its output back to the target's feature space.
        self.out_proj = (
            nn.Linear(config.hidden_size, target_hidden, bias=False)
            if config.hidden_size != target_hidden
            else None
        )
        self.lm_head = nn.Linear(target_hidden, config.draft_vocab_size or config.vocab_size, bias=False)
        if config.draft_vocab_size is not None:  # EAGLE-3 layout: target id = i + d2t[i]; t2d marks kept ids
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(config.target_vocab_size, dtype=torch.bool))
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.is_attached = False
        self.post_init()
        if not config.save_embeddings:  # absent by design: no "newly initialized" warning on load
            self._keys_to_ignore_on_load_missing = {
                rf"^{key}$".replace(".", r"\.") for key in SHARED_WITH_TARGET
            }

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def attach_target(
        self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        """Share the target's embedding and LM head (the same tensors, not copies) after checking they fit;
        a reduced head gets the target's rows of its subset (``d2t``), which is all it is."""
        check_draft_matches_target(self.config, target.config, tokenizer)
        self.embed_tokens = target.get_input_embeddings()
        head = target.get_output_embeddings()
        if self.config.draft_vocab_size is None:
            self.lm_head = head
        else:
            subset = draft_target_ids(self.d2t)
            with torch.no_grad():
                self.lm_head.weight.copy_(head.weight[subset.to(head.weight.device)])
        self.is_attached = True

    def feature_layers(self, target_config: PretrainedConfig) -> list[int]:
        """The non-negative ``hidden_states`` indices this draft reads from the target (its
        ``output_hidden_states=`` list): the fused layers, or ``target_hidden_layer``."""
        num_states = target_config.get_text_config().num_hidden_layers + 1
        layers = self.config.target_hidden_layers or [self.config.target_hidden_layer]
        return [layer % num_states for layer in layers]

    def target_features(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ``(B, S, target_hidden)`` feature the draft reads, from a target output's ``hidden_states``
        tuple: the state of ``target_hidden_layer``, or the ``fuse`` of the fused layers' states."""
        if self.fuse is None:
            return hidden_states[self.config.target_hidden_layer]
        states = [hidden_states[layer] for layer in self.config.target_hidden_layers]
        return self.fuse(torch.cat(states, dim=-1).to(self.fuse.weight.dtype))

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for the draft's own decoder layers."""
        return DynamicCache(config=self.config)

    def forward(
        self,
        input_ids: torch.LongTensor,
        target_hidden_states: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> ScyllaDraftOutput:
        """Predict the next features and logits for pairs ``(h_t, x_{t+1})``.

        Args:
            input_ids: ``(B, S)`` tokens ``x_{t+1}``, one position ahead of the features.
            target_hidden_states: ``(B, S, target_hidden)`` features ``h_t`` (the target's, or the draft's
                own predictions while drafting).
            position_ids: ``(B, S)`` positions t; default continues from the cache length.
            cache: the draft's KV cache, extended in place.
            logits_to_keep: compute logits only for the last this many positions (0: all).
                Logits always span the target's vocabulary; a reduced head leaves ``-inf`` outside its subset.
            attention_mask: ``(B, past + S)`` 1 for real pairs, 0 for padding (left-padded batches).
        """
        embeds = self.embed_tokens(input_ids)
        hidden = self.fc(torch.cat([embeds, target_hidden_states.to(embeds.dtype)], dim=-1))
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_kwargs(cache),
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
                **cache_kwargs(cache),
            )
        features = self.out_proj(hidden) if self.out_proj is not None else hidden
        logits = self.lm_head(features[:, -logits_to_keep:] if logits_to_keep else features)
        if self.config.draft_vocab_size is not None:
            logits = full_vocabulary_logits(logits, self.d2t, self.config.target_vocab_size)
        return ScyllaDraftOutput(features=features, logits=logits, cache=cache)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the draft; the target's embedding and LM head only if ``config.save_embeddings``."""
        state_dict = kwargs.pop("state_dict", None) or self.state_dict()
        if not self.config.save_embeddings:
            shared = SHARED_WITH_TARGET
            state_dict = {key: value for key, value in state_dict.items() if key not in shared}
        elif (
            self.config.draft_vocab_size is None
            and state_dict["lm_head.weight"].data_ptr() == state_dict["embed_tokens.weight"].data_ptr()
        ):
            # The target ties them; the draft's config does not, so the checkpoint holds two copies.
            state_dict = {**state_dict, "lm_head.weight": state_dict["lm_head.weight"].clone()}
        super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        target: PreTrainedModel | None = None,
        target_tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ) -> ScyllaDraftModel:
        """Load a draft and, with ``target``, attach it (checking hidden size, vocab and tokenizer).

        A checkpoint that is unreadable, lacks any draft weight or holds NaN/inf weights raises a `ValueError`; a
        checkpoint without embedding/LM head needs ``target`` (or a later `attach_target`).
        """
        if os.path.isdir(pretrained_model_name_or_path) and not os.path.isfile(
            os.path.join(pretrained_model_name_or_path, "config.json")
        ):
            raise ValueError(
                f"Could not read the Scylla draft checkpoint at {pretrained_model_name_or_path}: no config.json"
            )
        try:
            if target is not None:  # check before reading any weights
                config = kwargs.get("config") or ScyllaDraftConfig.from_pretrained(
                    pretrained_model_name_or_path
                )
                check_draft_matches_target(config, target.config, target_tokenizer)
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except (OSError, RuntimeError, SafetensorError) as error:
            raise ValueError(
                f"Could not read the Scylla draft checkpoint at {pretrained_model_name_or_path}: {error}"
            ) from error
        shared = SHARED_WITH_TARGET
        missing_draft_weights = sorted(set(info["missing_keys"]) - set(shared))
        if missing_draft_weights:
            raise ValueError(
                f"The Scylla draft checkpoint at {pretrained_model_name_or_path} is partial: it lacks "
                f"{len(missing_draft_weights)} draft weights, e.g. {missing_draft_weights[:3]}"
            )
        check_finite_weights(model)
        if model.config.draft_vocab_size is not None:
            check_vocabulary_mapping(model.d2t, model.t2d, model.config.target_vocab_size)
        if target is not None:
            model.attach_target(target, target_tokenizer)
        else:
            model.is_attached = model.config.save_embeddings and not set(info["missing_keys"]) & set(shared)
        return model


@torch.no_grad()
def add_layer_fusion(draft: ScyllaDraftModel, layers: Sequence[int]) -> ScyllaDraftModel:
    """A copy of ``draft`` (which reads one target state) that fuses the states ``layers`` (EAGLE-3), starting
    exactly where ``draft`` is: ``fuse`` passes the state the draft read through and ignores the others.

    ``layers`` must include the draft's ``target_hidden_layer``, in the same spelling (e.g. ``-1``).
    """
    if draft.fuse is not None:
        raise ValueError(f"the draft already fuses layers {draft.config.target_hidden_layers}")
    layers = list(layers)
    if draft.config.target_hidden_layer not in layers:
        raise ValueError(
            f"layers {layers} must include the layer the draft reads ({draft.config.target_hidden_layer}), "
            "so that the fused draft starts from it"
        )
    config = type(draft.config).from_dict(draft.config.to_dict() | {"target_hidden_layers": layers})
    fused = ScyllaDraftModel(config)
    missing, unexpected = fused.load_state_dict(draft.state_dict(), strict=False)
    if unexpected or set(missing) != {"fuse.weight"}:
        raise ValueError(f"cannot copy the draft's weights: missing {missing}, unexpected {unexpected}")
    width = config.target_hidden_size
    block = layers.index(draft.config.target_hidden_layer)
    fused.fuse.weight.zero_()
    fused.fuse.weight[:, block * width : (block + 1) * width] = torch.eye(width)
    fused.embed_tokens, fused.is_attached = draft.embed_tokens, draft.is_attached  # the target's tensors
    if draft.config.draft_vocab_size is None:
        fused.lm_head = draft.lm_head
    return fused.to(device=draft.device, dtype=draft.dtype)


AutoConfig.register(ScyllaDraftConfig.model_type, ScyllaDraftConfig, exist_ok=True)
AutoModel.register(ScyllaDraftConfig, ScyllaDraftModel, exist_ok=True)
