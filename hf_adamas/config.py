"""`AdamasConfig`: every knob of Adamas sparse attention, validated, and stored on the model's config.

The settings live in ``model.config.adamas_config`` as a plain dict, so ``save_pretrained`` writes
them into ``config.json`` and ``from_pretrained`` restores them; the attention function reads them
from ``module.config`` on every call (an in-place edit of the dict takes effect at the next forward).
As in transformers, the attention implementation itself is not saved: reload with
``attn_implementation="adamas"`` (or call `apply_adamas`), else the model runs dense sdpa attention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PretrainedConfig

from hf_adamas._validation import check_bits, check_centroid_values, check_head_dim, check_threshold_values

CONFIG_ATTRIBUTE = "adamas_config"
"""Name of the attribute of a transformers config that holds the Adamas settings."""

PAPER_THRESHOLDS = {2: (-10.0, 0.0, 10.0), 1: (0.0,)}
"""Fixed bucket edges of the official code (tuned on Llama-2 activations), per code width."""

Selector = Literal["adamas", "adamas_asymmetric", "streaming_llm", "quest", "oracle"]
GqaSelection = Literal["per_query_head", "shared_per_kv_group"]
Calibration = Literal["fixed", "online"]
VALUE_CODE_WIDTHS = (0, 2, 4)
"""Allowed ``AdamasConfig.value_code_bits``: no tail estimate, or value codes of 2 or 4 bits."""


@dataclass
class AdamasConfig:
    """Configuration of Adamas sparse attention ([arXiv 2510.18413](https://arxiv.org/abs/2510.18413)).

    During decoding (one query token), each layer past the first ``dense_layers`` keeps, per head,
    the ``token_budget`` keys ranked best by their 2-bit Hadamard codes, and runs exact attention
    over just those. By default the ranking is the query's Hadamard values against each key code's
    bucket centroids, with thresholds and centroids from each prompt's own prefill keys
    (``selector="adamas_asymmetric"``, ``calibration="online"``), which beat the paper's rule on the
    harder passkey test and on perplexity (``results/adamas/hard/``); the paper's rule is
    ``selector="adamas", calibration="fixed"`` (Manhattan distance between query and key codes,
    thresholds ``[-10, 0, 10]``). Prefill, the dense layers, and steps whose cache is not longer
    than the budget use ordinary (sdpa) attention.

    Args:
        token_budget (`int`, *optional*, defaults to `256`):
            Keys attended per head and decode step, the current token included.
        dense_layers (`int`, *optional*, defaults to `2`):
            The first layers, which always attend densely (as in the paper's code).
        bits (`int`, *optional*, defaults to `2`):
            Code width per dimension: 2 (paper) or 1 (sign only).
        thresholds (`list[float]` or `list[list[float]]`, *optional*, defaults to the paper's `[-10, 0, 10]`):
            Increasing bucket edges on the orthonormal Hadamard values, ``2**bits - 1`` of them; either
            one list for all layers or one list per layer (what `calibrate_codes` produces); used with
            ``calibration="fixed"``.
        gqa_selection (`str`, *optional*, defaults to `"per_query_head"`):
            With grouped-query attention, ``"per_query_head"`` lets each query head choose its own
            keys (the paper's evaluation path); ``"shared_per_kv_group"`` sums the distances of the
            query heads of a KV group and selects once per group (cheaper, reads each key once).
        sink_tokens (`int`, *optional*, defaults to `0`):
            Leading tokens always kept (the paper forces none).
        recent_tokens (`int`, *optional*, defaults to `0`):
            Most recent tokens always kept, besides the current one (the paper forces none).
        selector (`str`, *optional*, defaults to `"adamas_asymmetric"`):
            Which rule picks the keys: ``"adamas"`` (the paper's L1 distance between query and key
            codes); ``"adamas_asymmetric"`` (the query's full-precision Hadamard values dotted with
            each key code's bucket centroids, largest first; same key codes and memory, see
            `hf_adamas.selection`); or the baselines ``"streaming_llm"``
            (``sink_tokens`` sinks plus the most recent tokens) and ``"quest"`` (pages of
            ``quest_page_size`` tokens scored by per-channel key min/max), run through the same code;
            ``"oracle"`` ranks by the exact ``q · k`` over the full keys: the best any top-k selection can
            do at a budget (an accuracy bound for evaluations; it reads every key, so it saves no time).
        rescore_factor (`int`, *optional*, defaults to `1`):
            For ``"adamas"`` and ``"adamas_asymmetric"``: with ``F > 1`` the code estimate proposes
            ``F * token_budget`` keys and their exact ``q · k`` keeps the ``token_budget`` best (a second
            stage that reads the candidates' full keys, ``F`` times the rows attention reads). 1 = off.
        rescore_candidates (`int`, *optional*, defaults to `128`):
            A floor on that second stage's candidates: the code estimate proposes
            ``max(rescore_factor * token_budget, rescore_candidates)`` keys (`candidate_pool`), so small
            budgets get rescored from a fixed-size pool while budgets at or above it are not rescored
            (at most ``rescore_candidates`` extra key rows read per head). Only the code-estimate
            selectors (``"adamas"``, ``"adamas_asymmetric"``) use it; the others ignore it. 0 = no floor.
            128 was chosen on the tuning split of the harder passkey test, where it brings the default
            selector to the exact top-k's retrieval at budgets 16-64 (``results/adamas/hard/round6/``).
        quest_page_size (`int`, *optional*, defaults to `16`):
            Page size of the Quest baseline.
        calibration (`str`, *optional*):
            Where the code book (thresholds, and centroids for ``"adamas_asymmetric"``) comes from:
            ``"fixed"`` uses ``thresholds`` and ``centroids`` as given (the paper's, or those of
            ``hf-adamas calibrate``); ``"online"`` computes them per layer from each prompt's own
            prefill keys (quartile thresholds, bucket means) when its code cache is filled, ignoring
            ``thresholds``/``centroids``. Defaults to ``"fixed"`` when ``thresholds`` or ``centroids``
            are given (also for configs saved before this option existed), else ``"online"``.
        centroids (`list[list[list[float]]]`, *optional*):
            For ``"adamas_asymmetric"`` with ``calibration="fixed"``: per layer, per KV head, the
            ``2**bits`` bucket means of the Hadamard key values (what `calibrate_codes` produces).
            None derives them from the thresholds (see `hf_adamas.codebook.threshold_centroids`).
        value_code_bits (`int`, *optional*, defaults to `0`):
            The tail estimate, for ``"adamas_asymmetric"``: with 2 or 4, the unselected keys are not
            dropped but attended with their estimated scores (the key-code estimate) and values
            estimated from ``value_code_bits``-bit Hadamard codes of the values, stored next to the key
            codes (``D * value_code_bits / 8`` more bytes per token and KV head, code book from the
            prompt's values), so the softmax covers the whole cache. The rescored candidates (see
            `candidate_pool`) keep their exact logits, and each head's estimates are lowered by their
            excess mass on a strided sample of about 64 keys read exactly (the level shift of
            `hf_adamas.ops.reference.tail_decode_attention`). Costs one pass over all codes per step;
            see ``results/adamas/tail/``. 0 drops them, as the paper does.
    """

    token_budget: int = field(default=256, metadata={"help": "Keys attended per head and decode step."})
    dense_layers: int = field(default=2, metadata={"help": "Leading layers that always attend densely."})
    bits: int = field(default=2, metadata={"help": "Code bits per dimension: 1 or 2."})
    thresholds: list[float] | list[list[float]] | None = field(
        default=None, metadata={"help": "Bucket edges (global or per layer); None means the paper's."}
    )
    gqa_selection: GqaSelection = field(
        default="per_query_head", metadata={"help": "per_query_head or shared_per_kv_group."}
    )
    sink_tokens: int = field(default=0, metadata={"help": "Leading tokens always kept."})
    recent_tokens: int = field(default=0, metadata={"help": "Recent tokens always kept."})
    selector: Selector = field(
        default="adamas_asymmetric",
        metadata={"help": "adamas_asymmetric, adamas, streaming_llm, quest or oracle (exact top-k)."},
    )
    rescore_factor: int = field(
        default=1, metadata={"help": "Candidates per kept key rescored exactly (1 = the estimate alone)."}
    )
    rescore_candidates: int = field(
        default=128, metadata={"help": "Fewest candidates the exact second stage rescores (0 = no floor)."}
    )
    quest_page_size: int = field(default=16, metadata={"help": "Page size of the Quest baseline."})
    calibration: Calibration | None = field(
        default=None,
        metadata={"help": "fixed (thresholds/centroids given) or online (from each prefill)."},
    )
    centroids: list[list[list[float]]] | None = field(
        default=None, metadata={"help": "Per layer, per KV head bucket means; None derives them."}
    )
    value_code_bits: int = field(
        default=0,
        metadata={"help": "Value-code bits of the tail estimate of unselected keys (0 = dropped; 2 or 4)."},
    )

    def __post_init__(self) -> None:
        _check_int("token_budget", self.token_budget, minimum=1)
        _check_int("dense_layers", self.dense_layers, minimum=0)
        _check_int("sink_tokens", self.sink_tokens, minimum=0)
        _check_int("recent_tokens", self.recent_tokens, minimum=0)
        _check_int("quest_page_size", self.quest_page_size, minimum=1)
        _check_int("rescore_factor", self.rescore_factor, minimum=1)
        _check_int("rescore_candidates", self.rescore_candidates, minimum=0)
        if self.rescore_factor > 1 and self.selector not in ("adamas", "adamas_asymmetric"):
            raise ValueError(
                f"rescore_factor={self.rescore_factor} rescores a code estimate; selector={self.selector!r} has "
                "none (use 'adamas' or 'adamas_asymmetric', or rescore_factor=1)."
            )
        check_bits(self.bits)
        _check_choice("gqa_selection", self.gqa_selection, GqaSelection)
        _check_choice("selector", self.selector, Selector)
        _check_int("value_code_bits", self.value_code_bits, minimum=0)
        if self.value_code_bits not in VALUE_CODE_WIDTHS:
            raise ValueError(
                f"AdamasConfig.value_code_bits must be one of {list(VALUE_CODE_WIDTHS)} (0 = no tail "
                f"estimate), got {self.value_code_bits!r}."
            )
        if self.value_code_bits and self.selector != "adamas_asymmetric":
            raise ValueError(
                f"value_code_bits={self.value_code_bits} estimates the unselected keys' scores from the key "
                f"codes, which only selector='adamas_asymmetric' scores; selector={self.selector!r} "
                "has no such estimate (use value_code_bits=0)."
            )
        if self.calibration is None:
            given = self.thresholds is not None or self.centroids is not None
            self.calibration = "fixed" if given else "online"
        _check_choice("calibration", self.calibration, Calibration)
        if self.centroids is not None:
            self.centroids = check_centroid_values(self.centroids, self.bits)
        if self.thresholds is None:
            self.thresholds = list(PAPER_THRESHOLDS[self.bits])
        per_layer = self.thresholds and isinstance(self.thresholds[0], list | tuple)
        rows = self.thresholds if per_layer else [self.thresholds]
        self.thresholds = [check_threshold_values(row, self.bits) for row in rows]
        if not per_layer:
            self.thresholds = self.thresholds[0]
        forced = self.sink_tokens + self.recent_tokens + 1
        if forced > self.token_budget:  # every selector keeps these
            raise ValueError(
                f"sink_tokens + recent_tokens + 1 (the current token) = {forced} exceeds "
                f"token_budget={self.token_budget}; raise the budget or keep fewer forced tokens."
            )
        if self.selector == "quest" and self.sink_tokens + self.quest_page_size > self.token_budget:
            raise ValueError(
                f"selector='quest' always keeps the current page: sink_tokens + quest_page_size = "
                f"{self.sink_tokens + self.quest_page_size} exceeds token_budget={self.token_budget}; "
                "raise the budget or use a smaller quest_page_size."
            )

    @property
    def candidate_pool(self) -> int:
        """Keys the code estimate proposes per row; rescoring is on when this exceeds the budget."""
        return max(self.token_budget * self.rescore_factor, self.rescore_candidates)

    def thresholds_for_layer(self, layer_idx: int) -> list[float]:
        """The bucket edges that layer ``layer_idx`` uses (`check_model_config` checks the layer count)."""
        if self.thresholds and isinstance(self.thresholds[0], list):
            return self.thresholds[layer_idx]
        return self.thresholds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdamasConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown AdamasConfig fields: {sorted(unknown)}.")
        return cls(**values)

    @classmethod
    def from_model_config(cls, config: PretrainedConfig) -> AdamasConfig:
        """The settings stored on a model's config, or the defaults if it has none."""
        stored = getattr(config, CONFIG_ATTRIBUTE, None)
        if stored is None:
            return cls()
        return stored if isinstance(stored, cls) else cls.from_dict(stored)

    def save_to_model_config(self, config: PretrainedConfig) -> None:
        """Store these settings on ``config`` so ``save_pretrained`` writes them to ``config.json``."""
        setattr(config, CONFIG_ATTRIBUTE, self.to_dict())


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"AdamasConfig.{name} must be an integer >= {minimum}, got {value!r}.")


def _check_choice(name: str, value: Any, choices: Any) -> None:
    allowed = choices.__args__
    if value not in allowed:
        raise ValueError(f"AdamasConfig.{name} must be one of {list(allowed)}, got {value!r}.")


def check_model_config(config: PretrainedConfig, adamas_config: AdamasConfig, model_name: str) -> None:
    """Raise a `ValueError` naming the model when Adamas cannot run on it."""
    text_config = config.get_text_config(decoder=True)
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    check_head_dim(head_dim, model_name)
    if getattr(text_config, "attn_logit_softcapping", None):
        raise ValueError(
            f"{model_name} uses attention-logit soft-capping, which Adamas does not support; "
            "use attn_implementation='eager' for it."
        )
    layers = text_config.num_hidden_layers
    if adamas_config.dense_layers >= layers:
        raise ValueError(
            f"AdamasConfig.dense_layers={adamas_config.dense_layers} makes every layer of {model_name} "
            f"({layers} layers) dense, so nothing would run sparse; use dense_layers < {layers} "
            "(or attn_implementation='sdpa' for dense attention)."
        )
    if isinstance(adamas_config.thresholds[0], list) and len(adamas_config.thresholds) != layers:
        raise ValueError(
            f"AdamasConfig has per-layer thresholds for {len(adamas_config.thresholds)} layers, "
            f"but {model_name} has {layers}; recalibrate for this model."
        )
    centroids = adamas_config.centroids
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    if centroids is not None and (len(centroids) != layers or any(len(c) != kv_heads for c in centroids)):
        raise ValueError(
            f"AdamasConfig.centroids has {len(centroids)} layers of {[len(c) for c in centroids][:1]} KV "
            f"heads, but {model_name} has {layers} layers of {kv_heads}; recalibrate for this model."
        )
