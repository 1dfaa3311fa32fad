"""Thresholds from a model's own key statistics.

The paper's fixed edges (-10, 0, 10) were tuned on Llama-2 activations. On SmolLM2-135M the
orthonormal Hadamard values of post-RoPE keys stay within about +-5 (see
``../shared/reference/adamas.md``), so every code is 1 or 2 and the 2-bit code degenerates into a
sign bit. Calibration runs one dense forward pass over sample text, reads the post-RoPE keys from
the KV cache, and puts each layer's edges at the quartiles of its transformed key values
(the median for 1-bit codes), so the codes use all their levels.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from hf_adamas._validation import check_bits
from hf_adamas.reference import hadamard_matrix
from hf_common.compat import cache_kwargs


@torch.inference_mode()
def calibrate_thresholds(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    num_tokens: int = 1024,
    bits: int = 2,
) -> list[list[float]]:
    """Per-layer bucket edges at the quantiles of the Hadamard-transformed keys of ``text``.

    Args:
        model: a causal LM whose attention layers fill a `DynamicCache`.
        tokenizer: its tokenizer.
        text: calibration text; its first ``num_tokens`` tokens are used.
        num_tokens: how many tokens to run.
        bits: 2 (edges at the 25/50/75% quantiles) or 1 (the median).

    Returns:
        One increasing list of ``2**bits - 1`` edges per layer, ready for ``AdamasConfig(thresholds=...)``.
    """
    check_bits(bits)
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :num_tokens].to(model.device)
    if input_ids.shape[1] < 16:
        raise ValueError(f"Calibration text too short: {input_ids.shape[1]} tokens (need at least 16).")
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True)
    levels = 2**bits
    quantiles = torch.arange(1, levels, dtype=torch.float32) / levels
    thresholds = []
    for layer in cache.layers:
        keys = layer.keys.float()
        transformed = keys @ hadamard_matrix(keys.shape[-1], keys.device)
        values = transformed.flatten()
        values = values[:: max(1, values.numel() // 1_000_000)]  # torch.quantile caps its input size
        edges = torch.quantile(values.cpu(), quantiles)
        thresholds.append([round(float(edge), 4) for edge in edges])
    return thresholds
