"""`ScyllaDraftConfig`: the shape of a Scylla draft head and the target model it was trained for.

A Scylla draft (arXiv 2505.07858) is an EAGLE-style feature-level head: D Llama decoder layers on top
of ``fc([embed(x_{t+1}); h_t])``, read out through the *target's* LM head. The config is a
`LlamaConfig` (so transformers' Llama decoder layers and rotary embedding read it directly) plus the
fields that pin the draft to one target: hidden size, vocabulary, tokenizer fingerprint and the
hidden layer it reads.
"""

from __future__ import annotations

import hashlib
import json

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase

__all__ = ["ScyllaDraftConfig", "check_lookup", "layer_fusion_indices", "tokenizer_fingerprint"]

_COPIED_FROM_TARGET = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the token-to-id map: two tokenizers with the same fingerprint encode alike."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]


def layer_fusion_indices(num_hidden_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high target states as ``hidden_states`` indices: after layer 3 (or a third
    of a shallower target), after the middle layer, and the final normed state (EAGLE-3 takes the
    third-to-last layer there; the final one lets a fused draft start from a single-layer draft, see
    `hf_scylla.modeling.add_layer_fusion`)."""
    if num_hidden_layers < 3:
        raise ValueError(f"layer fusion needs a target of 3 or more layers, got {num_hidden_layers}")
    return [min(3, num_hidden_layers // 3), num_hidden_layers // 2 + 1, -1]


def check_lookup(tokens: int, min_ngram: int, max_ngram: int) -> None:
    """Clear errors for a prompt-lookup setting: ``tokens >= 0`` and ``1 <= min_ngram <= max_ngram``."""
    if tokens < 0:
        raise ValueError(f"lookup_tokens must be >= 0 (0 disables prompt lookup), got {tokens}")
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(
            f"prompt lookup needs 1 <= lookup_min_ngram <= lookup_max_ngram, got {min_ngram} and {max_ngram}"
        )


@strict
class ScyllaDraftConfig(LlamaConfig):
    r"""Configuration of a Scylla draft head ([arXiv 2505.07858](https://arxiv.org/abs/2505.07858)).

    The Llama fields (``hidden_size``, ``num_attention_heads``, ``intermediate_size``...) describe the
    draft's own decoder layers and default to the target's (`from_target_config`);
    ``num_hidden_layers`` is the draft depth D (the paper scales it from 1 to 10).

    Args:
        target_name_or_path (`str`, *optional*):
            Hub ID or path of the target model the draft was trained for (informative).
        target_hidden_size (`int`):
            Width of the target's hidden states that the draft reads and regresses.
        target_vocab_size (`int`):
            Vocabulary size of the target's embedding and LM head, which the draft shares.
        target_tokenizer_hash (`str`, *optional*):
            `tokenizer_fingerprint` of the target's tokenizer; checked when a tokenizer is given.
        target_hidden_layer (`int`, *optional*, defaults to `-1`):
            Index into the target's ``hidden_states`` tuple that the draft predicts and, without
            ``target_hidden_layers``, reads; ``-1`` is the final normed state, the LM head's input (EAGLE-1/2).
        target_hidden_layers (`list[int]`, *optional*):
            EAGLE-3 layer fusion: indices into ``hidden_states`` whose states are concatenated and mapped
            by ``fuse`` (``len x target_hidden -> target_hidden``) into the feature the draft reads
            (`layer_fusion_indices` gives a low, a middle and the final layer); ``None`` reads
            ``target_hidden_layer`` alone. While drafting, the draft reads its own predicted features.
        save_embeddings (`bool`, *optional*, defaults to `False`):
            Whether ``save_pretrained`` writes the shared embedding and LM head into the checkpoint
            (self-contained, larger) or leaves them to be re-attached from the target.
        max_draft_tokens (`int`, *optional*, defaults to `6`):
            Most tokens drafted per draft-verify cycle.
        confidence_threshold (`float`, *optional*, defaults to `0.0`):
            Adaptive draft length: stop drafting after a token whose draft probability is below this;
            ``0.0`` always drafts ``max_draft_tokens``.
        lookup_tokens (`int`, *optional*, defaults to `0`):
            Prompt-lookup drafting next to the draft (chains only): when the sequence's last
            ``lookup_max_ngram`` .. ``lookup_min_ngram`` tokens occurred before, a cycle proposes the up to
            ``lookup_tokens`` tokens that followed their latest occurrence instead of the draft's chain
            (`hf_scylla.candidate_generator.ngram_continuation`); ``0`` drafts with the draft alone.
        lookup_min_ngram (`int`, *optional*, defaults to `2`):
            Shortest repeated suffix that triggers a lookup proposal.
        lookup_max_ngram (`int`, *optional*, defaults to `3`):
            Longest suffix tried first.
        draft_vocab_size (`int`, *optional*):
            Reduced draft vocabulary (EAGLE-3's ``d2t``/``t2d``, FR-Spec): the draft's own LM head covers
            only this many target tokens (`hf_scylla.vocab.reduce_draft_vocabulary`); ``None`` reads out
            through the target's full LM head.
    """

    model_type = "scylla_draft"

    num_hidden_layers: int = 1
    target_name_or_path: str | None = None
    target_hidden_size: int = 0
    target_vocab_size: int = 0
    target_tokenizer_hash: str | None = None
    target_hidden_layer: int = -1
    target_hidden_layers: list[int] | None = None
    save_embeddings: bool = False
    max_draft_tokens: int = 6
    confidence_threshold: float = 0.0
    lookup_tokens: int = 0
    lookup_min_ngram: int = 2
    lookup_max_ngram: int = 3
    draft_vocab_size: int | None = None

    def __post_init__(self, **kwargs):
        if self.target_hidden_size <= 0:
            self.target_hidden_size = self.hidden_size
        if self.target_vocab_size <= 0:
            self.target_vocab_size = self.vocab_size
        self._check_draft_fields()
        super().__post_init__(**kwargs)

    def _check_draft_fields(self) -> None:
        """Plain `ValueError`s for the draft-specific fields (strict validators would wrap them)."""
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers (draft depth D) must be >= 1, got {self.num_hidden_layers}")
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ValueError(
                f"confidence_threshold must be in [0, 1) (0 disables adaptive length), got "
                f"{self.confidence_threshold}"
            )
        check_lookup(self.lookup_tokens, self.lookup_min_ngram, self.lookup_max_ngram)
        if self.vocab_size != self.target_vocab_size:
            raise ValueError(
                f"vocab_size ({self.vocab_size}) must equal target_vocab_size ({self.target_vocab_size}): "
                "the draft reads out through the target's own LM head"
            )
        if self.target_hidden_layers is not None and (
            not self.target_hidden_layers
            or len(set(self.target_hidden_layers)) != len(self.target_hidden_layers)
        ):
            raise ValueError(
                f"target_hidden_layers must list distinct hidden-state indices, got {self.target_hidden_layers}"
            )
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.target_vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [1, target_vocab_size={self.target_vocab_size}], got "
                f"{self.draft_vocab_size}"
            )

    @classmethod
    def from_target_config(
        cls,
        target_config: PretrainedConfig,
        num_hidden_layers: int = 1,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **overrides,
    ) -> ScyllaDraftConfig:
        """A draft config for ``target_config``: decoder-layer sizes copied from the target, depth D.

        ``overrides`` sets any field (e.g. a narrower ``hidden_size`` or ``max_draft_tokens``).
        """
        text_config = target_config.get_text_config()
        kwargs = {
            name: getattr(text_config, name) for name in _COPIED_FROM_TARGET if hasattr(text_config, name)
        }
        kwargs.update(
            num_hidden_layers=num_hidden_layers,
            vocab_size=text_config.vocab_size,
            target_name_or_path=getattr(target_config, "_name_or_path", None) or None,
            target_hidden_size=text_config.hidden_size,
            target_vocab_size=text_config.vocab_size,
            target_tokenizer_hash=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
            tie_word_embeddings=False,
        )
        kwargs.update(overrides)
        if "hidden_size" in overrides and "head_dim" not in overrides:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs.get("num_attention_heads", 1)
        return cls(**kwargs)
