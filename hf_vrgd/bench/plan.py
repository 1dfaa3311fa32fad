"""What both large-batch experiments (`byte_experiment`, `lm_experiment`) plan: runs and their config keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch


def config_fingerprint(config: object) -> str:
    """A short hash of a dataclass config: finished run records are reused only under the same one."""
    return hashlib.sha1(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class RunSpec:
    """One training run: optimizer, global batch (sequences), learning rate, its multiplier of the base LR, seed."""

    optimizer: str
    batch: int
    lr: float
    lr_multiplier: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}_b{self.batch}_lr{self.lr:.3g}_s{self.seed}"


def tiny_llama(config: Any, vocab_size: int, seed: int) -> torch.nn.Module:
    """A small Llama with tied embeddings, shaped by ``config`` (hidden_size, num_layers, num_heads, seq_len)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=3 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.seq_len,
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(llama)
