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

MIN_CALIBRATION_TOKENS = 16
"""Fewest text tokens `calibrate_thresholds` accepts."""


QUANTILE_INPUT_LIMIT = 1_000_000
"""Most values handed to ``torch.quantile`` per layer (it refuses much larger inputs)."""


def subsample_rows(transformed: torch.Tensor, limit: int = QUANTILE_INPUT_LIMIT) -> torch.Tensor:
    """Whole rows ``[N, D]`` of ``transformed [..., D]``, at most ``limit`` values, every coordinate alike.

    Keeping whole key vectors (a stride over rows, not over the flattened tensor, whose stride could
    share a factor with D and keep only some Hadamard coordinates) makes every coordinate contribute
    the same number of values to the quantiles.
    """
    rows = transformed.reshape(-1, transformed.shape[-1])
    return rows[:: max(1, -(-rows.numel() // limit))]


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
    if num_tokens < MIN_CALIBRATION_TOKENS or input_ids.shape[1] < MIN_CALIBRATION_TOKENS:
        raise ValueError(
            f"Calibration needs at least {MIN_CALIBRATION_TOKENS} tokens: num_tokens={num_tokens}, and the "
            f"text has {input_ids.shape[1]} of them."
        )
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True)
    levels = 2**bits
    quantiles = torch.arange(1, levels, dtype=torch.float32) / levels
    thresholds = []
    for layer in cache.layers:
        keys = layer.keys.float()
        transformed = keys @ hadamard_matrix(keys.shape[-1], keys.device)
        edges = torch.quantile(subsample_rows(transformed).flatten().cpu(), quantiles)
        thresholds.append([round(float(edge), 4) for edge in edges])
    return thresholds
