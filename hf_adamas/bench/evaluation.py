"""Long-context evaluation of attention methods: passkey retrieval, perplexity, decode speed.

All three follow the protocol of Quest and Adamas: the context is prefilled densely (one forward
pass), then tokens are decoded one at a time, which is where the sparse path runs. The prefill is
done once per context and shared by every method, whose decoding is undone afterwards by cropping
the cache back, so methods are compared on identical caches.

A *method* is a name and an `AdamasConfig` (``None`` = dense sdpa attention).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache
from transformers.cache_utils import Cache

from hf_adamas.config import AdamasConfig
from hf_adamas.integration import apply_adamas
from hf_common.compat import cache_kwargs, crop_cache
from hf_common.few_rows_linear import few_rows_linear_layers

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class Method:
    """An attention method under evaluation: dense sdpa when ``config`` is None, over a `StaticCache`
    when ``static_cache`` (the decode-speed benchmark's second dense baseline); with
    ``few_rows_linear`` its decode steps run every ``nn.Linear`` on `hf_common.few_rows_linear`'s
    one-row kernel (the decode-speed benchmark's option for dense and sparse methods alike)."""

    name: str
    config: AdamasConfig | None = None
    static_cache: bool = False
    few_rows_linear: bool = False

    @property
    def budget(self) -> int | None:
        return None if self.config is None else self.config.token_budget


@contextmanager
def attention_method(model: PreTrainedModel, method: Method) -> Iterator[None]:
    """Run the block with ``method``'s attention (and linear layers), restoring sdpa afterwards."""
    if method.config is None:
        model.set_attn_implementation("sdpa")
    else:
        apply_adamas(model, method.config)
    try:
        linear = (
            few_rows_linear_layers(model, min_rows=1, max_rows=1) if method.few_rows_linear else nullcontext()
        )
        with linear:
            yield
    finally:
        model.set_attn_implementation("sdpa")


@torch.inference_mode()
def prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, static_length: int | None = None
) -> tuple[Cache, torch.Tensor]:
    """Dense forward over ``input_ids``; returns the cache and the last position's logits.

    The cache is a `DynamicCache`, or a `StaticCache` of ``static_length`` positions when given.
    """
    model.set_attn_implementation("sdpa")
    if static_length is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=static_length)
    output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    return cache, output.logits[:, -1]


@torch.inference_mode()
def decode_step(model: PreTrainedModel, cache: Cache, token: torch.Tensor) -> torch.Tensor:
    """One decode step (``token`` is ``[batch, 1]``); returns next-token logits ``[batch, vocab]``."""
    return model(input_ids=token, use_cache=True, **cache_kwargs(cache)).logits[:, -1]


# ---------------------------------------------------------------- passkey retrieval


def passkey_prompt(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, passkey: str
) -> tuple[torch.Tensor, int]:
    """Token ids of about ``length`` tokens of filler with the pass key at relative ``depth``.

    Returns ``(input_ids [1, L], question_length)``: the prompt ends with the question, whose
    tokens are decoded one by one through the sparse path.
    """
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    filler_ids = tokenizer(PASSKEY_FILLER, add_special_tokens=False).input_ids
    needle_ids = tokenizer(needle, add_special_tokens=False).input_ids
    question_ids = tokenizer(" " + PASSKEY_QUESTION, add_special_tokens=False).input_ids
    room = length - len(needle_ids) - len(question_ids)
    repeats = room // len(filler_ids)
    before = round(depth * repeats)
    ids = filler_ids * before + needle_ids + filler_ids * (repeats - before) + question_ids
    return torch.tensor([ids]), len(question_ids)


@torch.inference_mode()
def greedy_continue(model: PreTrainedModel, cache: Cache, logits: torch.Tensor, steps: int) -> list[int]:
    """Greedy-decode ``steps`` tokens from ``logits`` with the cache; returns the token ids."""
    tokens = []
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(int(token))
        logits = decode_step(model, cache, token)
    return tokens


@dataclass(frozen=True)
class PasskeyTrial:
    """A retrieval prompt ``input_ids [1, L]`` ending with a question of ``question_length`` tokens.

    ``answer`` is the text the greedy continuation must start with (e.g. ``" 71432"``); ``info``
    (haystack, depth, ...) is copied into the trial's records.
    """

    input_ids: torch.Tensor
    question_length: int
    answer: str
    info: dict = field(default_factory=dict)


def repeated_filler_trial(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, passkey: str
) -> PasskeyTrial:
    """The original passkey test (`passkey_prompt`: one filler sentence repeated) as a `PasskeyTrial`."""
    input_ids, question_length = passkey_prompt(tokenizer, length, depth, passkey)
    return PasskeyTrial(input_ids, question_length, " " + passkey, {"haystack": "repeated", "depth": depth})


@torch.inference_mode()
def _greedy_answer_prefix(
    model: PreTrainedModel, cache: Cache, logits: torch.Tensor, answer_ids: list[int]
) -> list[int]:
    """Greedy tokens from ``logits`` up to the first that differs from ``answer_ids`` (included).

    The greedy continuation starts with the answer iff the result equals ``answer_ids``; stopping at
    the first wrong token gives the same verdict as generating the whole answer, for fewer steps.
    """
    produced: list[int] = []
    for target in answer_ids:
        token = logits.argmax(-1, keepdim=True)
        produced.append(int(token))
        if produced[-1] != target or len(produced) == len(answer_ids):
            break
        logits = decode_step(model, cache, token)
    return produced


METHOD_NAMES = (
    "dense",
    "dense-static",
    "adamas",
    "adamas-calibrated",
    "asymmetric",
    "asymmetric-calibrated",
    "asymmetric-online",
    "asymmetric-online-kvgroup",
    "asymmetric-online-rescore",
    "asymmetric-online-tail2",
    "asymmetric-online-tail4",
    "asymmetric-online-rescore-tail2",
    "streaming_llm",
    "quest",
    "oracle",
)
"""Method names of the benchmarks. ``adamas*``: the paper's L1 rule; ``asymmetric*``: the
``adamas_asymmetric`` selector. Suffixes: none = paper thresholds (centroids implied by them),
``-calibrated`` = `calibrate_codes` on a calibration text (offline), ``-online`` = each prompt's
own prefill keys; ``-kvgroup`` = one selection per KV group (``shared_per_kv_group``); ``-rescore`` =
``rescore_factor=RESCORE_FACTOR`` (the code estimate proposes that many keys per kept one, the exact
``q · k`` keeps the best); ``-tail2`` / ``-tail4`` = the tail estimate with 2- / 4-bit value codes
(``value_code_bits``), ``-rescore-tail2`` both (the rescored candidates' logits exact in the tail).
``dense-static``: dense sdpa over a `StaticCache` (only the decode-speed benchmark tells it apart).
``oracle``: exact ``q · k`` top-k, the accuracy bound of every top-k selector at a budget."""


RESCORE_FACTOR = 4
"""``rescore_factor`` of the ``-rescore`` methods."""


def method_grid(
    names: Sequence[str],
    budgets: Sequence[int],
    gqa_selection: str = "per_query_head",
    sink_tokens: int = 4,
    calibrated: dict | None = None,
    rescore_candidates: int | None = None,
) -> list[Method]:
    """The (method, budget) grid, dense first (it runs on the pristine cache).

    ``calibrated`` is `calibrate_codes`' output for the ``-calibrated`` methods; without it the paper's
    thresholds stand in, so the grid can be checked (a `ValueError` naming the method and budget)
    before the model loads. ``rescore_candidates`` sets `AdamasConfig.rescore_candidates` of every
    method (None keeps the config's default).
    """
    unknown = sorted(set(names) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHOD_NAMES)}")
    methods = [
        Method(name, static_cache=name == "dense-static") for name in names if name.startswith("dense")
    ]
    for name in names:
        if name.startswith("dense"):
            continue
        family = name.split("-")[0]
        settings = {
            "selector": "adamas_asymmetric" if family == "asymmetric" else family,
            "gqa_selection": "shared_per_kv_group" if name.endswith("-kvgroup") else gqa_selection,
            "calibration": "online" if "-online" in name else "fixed",
            "rescore_factor": RESCORE_FACTOR if "-rescore" in name else 1,
            "value_code_bits": int(name[-1]) if "-tail" in name else 0,
        }
        if rescore_candidates is not None:
            settings["rescore_candidates"] = rescore_candidates
        if name.endswith("-calibrated") and calibrated is not None:
            settings["thresholds"] = calibrated["thresholds"]
            if family == "asymmetric":
                settings["centroids"] = calibrated["centroids"]
        for budget in budgets:
            sinks = {"sink_tokens": min(sink_tokens, budget - 1)} if name == "streaming_llm" else {}
            try:
                methods.append(Method(name, AdamasConfig(token_budget=budget, **settings, **sinks)))
            except ValueError as error:
                raise ValueError(f"method {name} at budget {budget}: {error}") from error
    return methods


def method_key(name: str, budget: int | None) -> str:
    """``name@budget`` (``dense`` alone): what identifies a method's records within a trial."""
    return name if budget is None else f"{name}@{budget}"


def run_passkey(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: Sequence[Method],
    trials: Sequence[tuple[str, PasskeyTrial]],
    done: frozenset[tuple[str, str]] = frozenset(),
) -> Iterator[dict]:
    """Passkey retrieval of every ``(trial_id, trial)`` by every method; yields one record per pair.

    The context (all but the question) is prefilled densely once per trial; each method then decodes
    the question token by token through its attention and is scored by whether its greedy answer
    starts with ``trial.answer`` (decoding stops at the first wrong token); its decoding is undone by
    cropping the cache. Pairs ``(trial_id, method_key(name, budget))`` in ``done`` are skipped, a trial
    whose methods are all done is not even prefilled: pass the pairs of earlier records to resume.
    """
    todo = [
        (tid, trial, [m for m in methods if (tid, method_key(m.name, m.budget)) not in done])
        for tid, trial in trials
    ]
    progress = tqdm(total=sum(len(pending) for *_, pending in todo), desc="passkey", unit="trial")
    for trial_id, trial, pending in todo:
        if not pending:
            continue
        input_ids = trial.input_ids.to(model.device)
        context_length = input_ids.shape[1] - trial.question_length
        answer_ids = tokenizer.encode(trial.answer, add_special_tokens=False)
        cache, _ = prefill(model, input_ids[:, :context_length])
        for method in pending:
            with attention_method(model, method):
                for position in range(context_length, input_ids.shape[1]):
                    logits = decode_step(model, cache, input_ids[:, position : position + 1])
                produced = _greedy_answer_prefix(model, cache, logits, answer_ids)
            crop_cache(cache, context_length)
            yield {
                "trial": trial_id,
                "method": method.name,
                "budget": method.budget,
                "length": int(input_ids.shape[1]),
                **trial.info,
                "answer": trial.answer,
                "greedy": tokenizer.decode(produced),
                "correct": produced == answer_ids,
            }
            progress.update()
        del cache
    progress.close()


# ---------------------------------------------------------------- perplexity


def run_perplexity(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    methods: Sequence[Method],
    decode_tokens: int,
    done: frozenset[str] = frozenset(),
) -> Iterator[dict]:
    """Perplexity of the last ``decode_tokens`` tokens of ``input_ids`` ``[1, L]``, decoded one by one.

    The first ``L - decode_tokens`` tokens are prefilled densely; every later token is scored
    after a sparse decode step over everything before it (the paper's protocol). Yields one record
    per method as it finishes, skipping the methods whose `method_key` is in ``done`` (to resume).
    """
    pending = [m for m in methods if method_key(m.name, m.budget) not in done]
    if not pending:
        return
    input_ids = input_ids.to(model.device)
    context_length = input_ids.shape[1] - decode_tokens
    cache, first_logits = prefill(model, input_ids[:, :context_length])
    for method in tqdm(pending, desc="perplexity", unit="method"):
        logits, nll = first_logits, 0.0
        with attention_method(model, method):
            for position in range(context_length, input_ids.shape[1]):
                target = input_ids[:, position]
                nll -= float(torch.log_softmax(logits.float(), dim=-1)[0, target])
                if position + 1 < input_ids.shape[1]:
                    logits = decode_step(model, cache, input_ids[:, position : position + 1])
        crop_cache(cache, context_length)
        yield {
            "method": method.name,
            "budget": method.budget,
            "context": int(input_ids.shape[1]),
            "decoded_tokens": decode_tokens,
            "nll": nll / decode_tokens,
            "perplexity": math.exp(nll / decode_tokens),
        }


# ---------------------------------------------------------------- decode speed


@contextmanager
def timed_sparse_ops() -> Iterator[dict[str, float]]:
    """Seconds spent in key selection (estimate + top-k, plus the optional exact rescoring), in the
    sparse attention over the selected keys (with the tail estimate: the whole ``tail_decode_attention``,
    unselected positions included), and in the fused CPU step that does both of the default rule in one
    call (with the new key's codes; `hf_adamas.ops.cpu.asymmetric_decode_step_cpu`), summed over every
    call in the block (CPU: synchronous)."""
    from hf_adamas import attention, ops

    totals = {"selection": 0.0, "attention": 0.0, "fused_step": 0.0}
    timed = [
        (ops, "select_by_code_distance", "selection"),
        (ops, "select_by_centroid_scores", "selection"),
        (ops, "rescore_selection", "selection"),
        (ops, "sparse_decode_attention", "attention"),
        (ops, "tail_decode_attention", "attention"),
        (attention, "asymmetric_decode_step_cpu", "fused_step"),
    ]

    def timer(function, part: str):
        def run(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            totals[part] += time.perf_counter() - start
            return result

        return run

    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in timed]
    for owner, name, part in timed:
        setattr(owner, name, timer(getattr(owner, name), part))
    try:
        yield totals
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def run_decode_speed(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    methods: Sequence[Method],
    steps: int,
    warmup: int = 2,
    rounds: int = 1,
) -> list[dict]:
    """Decode tokens/s after a dense prefill of ``input_ids``, per method (model forward only).

    Each method gets its own fresh prefill (the Adamas path swaps cache layers for preallocated
    ones, which would otherwise also speed up the methods that run after it), and all caches are
    kept. Then ``rounds`` rounds each time ``steps`` greedy steps of every method in turn, so that
    a slow spell of a shared machine hits all methods alike; a record holds the median over rounds
    (``round_ms_per_token`` lists them all). Sparse methods' records split each token's time into
    ``selection_ms``, ``attention_ms``, ``fused_step_ms`` and ``rest_ms`` (`timed_sparse_ops`, medians
    over rounds).
    """
    input_ids = input_ids.to(model.device)
    states = []
    for method in tqdm(methods, desc="prefill per method", unit="method"):
        static_length = input_ids.shape[1] + warmup + rounds * steps + 1 if method.static_cache else None
        cache, first_logits = prefill(model, input_ids, static_length)
        with attention_method(model, method):
            greedy_continue(model, cache, first_logits, warmup)
        states.append((cache, first_logits))
    timings: list[list[dict[str, float]]] = [[] for _ in methods]
    for _ in tqdm(range(rounds), desc="decode rounds", unit="round"):
        for method, (cache, first_logits), spent_per_round in zip(methods, states, timings, strict=True):
            with attention_method(model, method), timed_sparse_ops() as spent:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                greedy_continue(model, cache, first_logits, steps)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                spent_per_round.append({"total": time.perf_counter() - start, **spent})
    del states
    records = []
    for method, spent_per_round in zip(methods, timings, strict=True):
        per_token = {
            part: 1000 * statistics.median(round_[part] for round_ in spent_per_round) / steps
            for part in spent_per_round[0]
        }
        record = {
            "method": method.name,
            "budget": method.budget,
            "context": int(input_ids.shape[1]),
            "steps": steps,
            "rounds": rounds,
            "seconds": per_token["total"] * steps / 1000,
            "tokens_per_second": 1000 / per_token["total"],
            "ms_per_token": per_token["total"],
            "round_ms_per_token": [1000 * round_["total"] / steps for round_ in spent_per_round],
        }
        if method.config is not None:
            parts = {f"{part}_ms": per_token[part] for part in ("selection", "attention", "fused_step")}
            record |= parts | {"rest_ms": record["ms_per_token"] - sum(parts.values())}
        records.append(record)
    return records
