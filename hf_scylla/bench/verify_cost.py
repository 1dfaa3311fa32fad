"""Where a Scylla cycle spends its time: target verification cost, draft step cost, reduced-vocabulary loss.

`verification_cost` times one target forward of n new tokens on a cache of a few hundred tokens (the
cost of verifying a chain or tree of n - 1 draft tokens plus the last accepted token);
`draft_step_seconds` times one cached draft step; `teacher_forced_agreement` is the fraction of
positions where the draft, given the target's own features and tokens, predicts the target's greedy
next token. `speedup_ceiling` combines them: with every draft token accepted, a cycle of n tokens
costs ``t(n) + (n - 1) * t_draft`` against ``n * t(1)`` for plain decoding. `expected_chain_speedups`
adds the draft's measured acceptance (`acceptance_survival` of a long fixed chain) to predict the
speed-up of every chain length on this machine, which is how a draft's ``max_draft_tokens`` is chosen.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_common.compat import cache_kwargs, crop_cache
from hf_common.data import SHARED_DATA_DIR
from hf_common.default_model import load_model_and_tokenizer
from hf_common.few_rows_linear import few_rows_linear_layers
from hf_common.reporting import markdown_table, plot_series, write_report
from hf_scylla import generation
from hf_scylla.bench.sweep import encode_eval_prompts
from hf_scylla.data import read_conversations
from hf_scylla.modeling import ScyllaDraftModel
from hf_scylla.vocab import (
    count_tokens,
    frequent_draft_vocabulary,
    full_vocabulary_draft,
    reduce_draft_vocabulary,
)

__all__ = [
    "DRAFT_TRAINING_SOURCES",
    "acceptance_survival",
    "agreement_sequences",
    "clone_draft",
    "draft_step_seconds",
    "expected_chain_speedups",
    "measure_chain_acceptance",
    "reduced_draft",
    "speedup_ceiling",
    "teacher_forced_agreement",
    "training_token_counts",
    "verification_cost",
]

DRAFT_TRAINING_SOURCES = (
    SHARED_DATA_DIR / "text" / "tinyshakespeare.txt",
    SHARED_DATA_DIR / "gsm8k" / "train.jsonl",
)
"""What the staged D1 draft was trained on (general text, then GSM8K chats); the frequency count's corpus."""


def training_token_counts(
    tokenizer: PreTrainedTokenizerBase, sources: Sequence[Path] = DRAFT_TRAINING_SOURCES
):
    """Token counts over plain-text files and conversations (JSONL or a `datasets` folder, read by
    `hf_scylla.data.read_conversations`, as one-turn chats)."""
    token_lists = []
    for path in map(Path, sources):
        if path.is_file() and path.suffix != ".jsonl":
            token_lists.append(tokenizer(path.read_text())["input_ids"])
            continue
        for prompt, response in read_conversations(path):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            token_lists.append(
                tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            )
    return count_tokens(token_lists, len(tokenizer))


def agreement_sequences(
    prompts_dir: Path, tokenizer: PreTrainedTokenizerBase, limit: int | None = None, max_tokens: int = 1024
) -> dict[str, list[torch.Tensor]]:
    """Per ``*.jsonl`` prompt set: ``(1, S)`` ids of the chat-templated prompt + reference answer (the
    prompt alone where the record has none), for `teacher_forced_agreement`; the first ``limit``."""
    sets = {}
    for path in sorted(prompts_dir.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        sequences = []
        for record in records[:limit]:
            messages = [{"role": "user", "content": record["turns"][0]}]
            if record.get("reference"):
                messages.append({"role": "assistant", "content": record["reference"][0]})
            encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            sequences.append(torch.tensor([encoded[:max_tokens]]))
        sets[path.stem] = sequences
    return sets


def clone_draft(draft: ScyllaDraftModel, target: PreTrainedModel) -> ScyllaDraftModel:
    """An independent copy of an attached draft (its own weights), attached to ``target``."""
    copy = ScyllaDraftModel(type(draft.config).from_dict(draft.config.to_dict()))
    copy.load_state_dict(draft.state_dict())
    copy.attach_target(target)
    return copy.to(device=draft.device, dtype=draft.dtype).eval()


def reduced_draft(
    draft: ScyllaDraftModel,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    counts: torch.Tensor,
    size: int,
) -> ScyllaDraftModel:
    """A copy of ``draft`` whose head covers the ``size`` most frequent tokens (plus the special tokens)."""
    subset = frequent_draft_vocabulary(counts, size, tokenizer)
    return reduce_draft_vocabulary(clone_draft(draft, target), subset, tokenizer)


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def verification_cost(
    target: PreTrainedModel, context: torch.Tensor, new_tokens: Sequence[int], repeats: int = 5
) -> dict[int, float]:
    """Median seconds of one target forward of n new tokens after a cache holding ``context`` (1, S)."""
    cache = _prefilled_cache(target, context)
    past = cache.get_seq_length()
    costs = {}
    for count in new_tokens:
        tokens = context[:, -count:] if count <= context.shape[1] else context[:, :1].repeat(1, count)

        def forward(tokens=tokens):
            target(tokens, use_cache=True, **cache_kwargs(cache))
            crop_cache(cache, past)

        costs[count] = _median_seconds(forward, repeats)
    return costs


def _prefilled_cache(target: PreTrainedModel, context: torch.Tensor):
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=target.config)
    target(context, use_cache=True, **cache_kwargs(cache))
    return cache


@torch.no_grad()
def draft_step_seconds(
    draft: ScyllaDraftModel, target: PreTrainedModel, context: torch.Tensor, repeats: int = 20
) -> float:
    """Median seconds of one cached draft step (one new pair, logits for it) after syncing on ``context``."""
    features = draft.target_features(target(context, output_hidden_states=True).hidden_states)
    cache = draft.new_cache()
    draft(context[:, 1:], features[:, :-1], cache=cache, logits_to_keep=1)
    synced = cache.get_seq_length()

    def step():
        draft(context[:, -1:], features[:, -1:], cache=cache, logits_to_keep=1)
        crop_cache(cache, synced)

    return _median_seconds(step, repeats)


@torch.no_grad()
def teacher_forced_agreement(
    target: PreTrainedModel, drafts: dict[str, ScyllaDraftModel], sequences: Sequence[torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per draft: top-1 agreement with the target's greedy next token, given the target's features.

    Pair t = (h_t, x_{t+1}) predicts x_{t+2}; the target's prediction of it is the argmax at t + 1.
    """
    hits = dict.fromkeys(drafts, 0)
    positions = 0
    for ids in sequences:
        out = target(ids, output_hidden_states=True)
        target_next = out.logits[0, 1:].argmax(-1)
        for name, draft in drafts.items():
            features = draft.target_features(out.hidden_states)
            predicted = draft(ids[:, 1:], features[:, :-1]).logits[0].argmax(-1)
            hits[name] += int((predicted == target_next).sum())
        positions += ids.shape[1] - 1
    return {name: {"agreement": hits[name] / positions, "positions": positions} for name in drafts}


def speedup_ceiling(costs: dict[int, float], draft_step: float) -> dict[int, float]:
    """Speed-up over plain decoding if all n - 1 draft tokens of an n-token verification were accepted."""
    return {n: n * costs[1] / (seconds + (n - 1) * draft_step) for n, seconds in costs.items()}


def acceptance_survival(accepted: Sequence[int], length: int) -> list[float]:
    """``P(at least i draft tokens accepted)`` for i = 1..length, over cycles of fixed ``length``-token chains.

    In greedy decoding a chain of k <= length tokens keeps ``min(L, k)`` of them where the long chain
    kept L, so this survival function gives the acceptance of every shorter chain too.
    """
    if not accepted:
        raise ValueError("no draft-verify cycle to measure acceptance on")
    return [sum(kept >= i for kept in accepted) / len(accepted) for i in range(1, length + 1)]


def expected_chain_speedups(
    costs: dict[int, float], draft_step: float, survival: Sequence[float]
) -> dict[int, float]:
    """Predicted speed-up over plain decoding of a fixed chain of k draft tokens, for each k whose
    verification size k + 1 the cost curve holds: ``(1 + P(>=1) + ... + P(>=k)) t(1) / (t(k+1) + k t_draft)``."""
    return {
        k: (1 + sum(survival[:k])) * costs[1] / (costs[k + 1] + k * draft_step)
        for k in range(1, len(survival) + 1)
        if k + 1 in costs
    }


@torch.no_grad()
def measure_chain_acceptance(
    target: PreTrainedModel,
    draft: ScyllaDraftModel,
    prompts: Sequence[torch.Tensor],
    length: int,
    max_new_tokens: int = 128,
) -> list[int]:
    """Draft tokens kept per cycle when greedy-decoding the ``(1, S)`` prompt ids with fixed chains of
    ``length`` tokens (no confidence threshold, no prompt lookup)."""
    accepted = []
    for ids in prompts:
        result = generation.generate(
            target,
            draft,
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            max_draft_tokens=length,
            confidence_threshold=0.0,
            lookup_tokens=0,  # every cycle a draft chain of `length` tokens
        )
        accepted += result.stats.accepted
    return accepted


def _chain_choice(
    target, draft, tokenizer, prompts_file: Path, limit, length: int, costs, draft_step: float
) -> tuple[list[dict], dict]:
    """Rows of predicted speed-up per chain length on ``prompts_file`` and the best one."""
    prompts = encode_eval_prompts(tokenizer, prompts_file, limit, target.device)
    accepted = measure_chain_acceptance(target, draft, prompts, length)
    survival = acceptance_survival(accepted, length)
    speedups = expected_chain_speedups(costs, draft_step, survival)
    rows = [
        {
            "draft_tokens": k,
            "p_at_least_k_accepted": survival[k - 1],
            "expected_tokens_per_cycle": 1 + sum(survival[:k]),
            "cycle_ms": 1e3 * (costs[k + 1] + k * draft_step),
            "expected_speedup": speedup,
        }
        for k, speedup in speedups.items()
    ]
    best = max(rows, key=lambda row: row["expected_speedup"])
    return rows, {"prompts": str(prompts_file), "prompt_count": len(prompts), "cycles": len(accepted)} | best


def verify_cost_report(
    model_name: str,
    draft_folder: Path,
    prompts_dir: Path,
    stem: Path,
    command: str,
    *,
    new_tokens: Sequence[int],
    vocab_sizes: Sequence[int],
    context_tokens: int,
    repeats: int,
    limit: int | None,
    vocab_corpus: Sequence[Path] = DRAFT_TRAINING_SOURCES,
    acceptance_prompts: Path | None = None,
    max_chain: int = 6,
) -> str:
    """Measure the verification-cost curve, draft step times per head (heads over the most frequent
    tokens of ``vocab_corpus``) and teacher-forced agreement; writes ``stem`` .json/.md/.png and
    returns the Markdown body.

    With ``acceptance_prompts`` (a ``question.jsonl`` file the draft was not tuned on; its first
    ``limit`` prompts) it also decodes them with fixed chains of ``max_chain`` tokens and predicts the
    speed-up of every chain length up to that from the measured curve (`expected_chain_speedups`).
    """
    load_before = os.getloadavg()
    target, tokenizer = load_model_and_tokenizer(model_name)
    draft = ScyllaDraftModel.from_pretrained(draft_folder, target=target, target_tokenizer=tokenizer).eval()
    own_head = {}
    if draft.config.draft_vocab_size is not None:  # measure its own head next to the full one
        own_head = {f"own{draft.config.draft_vocab_size}": draft}
        draft = full_vocabulary_draft(draft, target)
    counts = training_token_counts(tokenizer, vocab_corpus)
    drafts = {"full": draft, **own_head} | {
        f"vocab{size}": reduced_draft(draft, target, tokenizer, counts, size) for size in vocab_sizes
    }
    sets = agreement_sequences(prompts_dir, tokenizer, limit)
    if not sets:
        raise ValueError(f"no *.jsonl prompt sets in {prompts_dir}")
    context = torch.cat(sets.get("sum") or next(iter(sets.values())), dim=1)
    context = context[:, :context_tokens]
    if acceptance_prompts is not None:  # every verification size a chain up to max_chain needs
        new_tokens = sorted({*new_tokens, *range(1, max_chain + 2)})
    linear_costs = verification_cost(target, context, new_tokens, repeats)
    with few_rows_linear_layers(target):  # what Scylla decoding verifies on (one-row steps: F.linear)
        costs = verification_cost(target, context, new_tokens, repeats)
    steps = {
        name: draft_step_seconds(variant, target, context, 4 * repeats) for name, variant in drafts.items()
    }
    decoding_head = next(iter(own_head), "full")  # the head the draft decodes with
    chain_rows, chain_best = [], None
    if acceptance_prompts is not None:
        chain_rows, chain_best = _chain_choice(
            target,
            drafts[decoding_head],
            tokenizer,
            acceptance_prompts,
            limit,
            max_chain,
            costs,
            steps[decoding_head],
        )
    agreement = {
        name: teacher_forced_agreement(target, drafts, sequences) for name, sequences in sets.items()
    }
    ceilings = {name: speedup_ceiling(costs, seconds) for name, seconds in steps.items()}
    load_after = os.getloadavg()
    curve = [
        {
            "new_tokens": n,
            "target_forward_ms_F.linear": 1e3 * linear_costs[n],
            "target_forward_ms": 1e3 * costs[n],
            "relative_to_1": costs[n] / costs[1],
        }
        | {f"ceiling_{name}": ceilings[name][n] for name in drafts}
        for n in sorted(costs)
    ]
    vocab_rows = [
        {
            "draft_head": name,
            "head_tokens": variant.lm_head.weight.shape[0],
            "draft_step_ms": 1e3 * steps[name],
            "draft_step_vs_target_step": steps[name] / costs[1],
        }
        | {f"agreement_{set_name}": agreement[set_name][name]["agreement"] for set_name in sets}
        for name, variant in drafts.items()
    ]
    payload = {
        "context_tokens": context.shape[1],
        "load_average_before": load_before,
        "load_average_after": load_after,
        "frequency_source": [str(path) for path in DRAFT_TRAINING_SOURCES],
        "agreement_positions": {
            name: next(iter(values.values()))["positions"] for name, values in agreement.items()
        },
        "verification_curve": curve,
        "draft_heads": vocab_rows,
    }
    if chain_best is not None:
        payload |= {"chain_lengths": chain_rows, "best_chain": chain_best}
    body = (
        f"Target forward of n new tokens after a {context.shape[1]}-token cache (median of {repeats}), on "
        "`F.linear` and, as Scylla decoding runs it, on `hf_common.few_rows_linear` from 2 rows on "
        "(`target_forward_ms`, which the ceilings and chain choice use); "
        f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}. `ceiling_*`: speed-up if every "
        "draft token of an n-token verification were accepted, n t(1) / (t(n) + (n-1) t_draft).\n\n"
        + markdown_table(curve, list(curve[0]))
        + "\nDraft heads: step time and teacher-forced top-1 agreement with the target on the held-out prompt "
        "sets (prompt + reference answer where the set has one; token frequencies counted on the draft's "
        "training data only).\n\n" + markdown_table(vocab_rows, list(vocab_rows[0]))
    )
    if chain_best is not None:
        body += (
            f"\nChain length from this machine's curve and the draft's acceptance: {chain_best['cycles']} cycles "
            f"of fixed {max_chain}-token chains ({decoding_head} head, greedy, 128 new tokens) on the "
            f"{chain_best['prompt_count']} prompts of `{acceptance_prompts}`; expected speed-up "
            "(1 + P(>=1) + ... + P(>=k)) t(1) / (t(k+1) + k t_draft).\n\n"
            + markdown_table(chain_rows, list(chain_rows[0]))
            + f"\nBest: {chain_best['draft_tokens']} draft tokens (`--max-draft-tokens "
            f"{chain_best['draft_tokens']} --confidence-threshold 0`), expected "
            f"{chain_best['expected_speedup']:.2f}x.\n"
        )
    write_report(
        stem.parent,
        "verify_cost",
        command,
        payload,
        f"Verification cost and draft heads, {model_name}",
        body,
    )
    series = {
        f"ceiling, {name} head": (sorted(costs), [ceilings[name][n] for n in sorted(costs)])
        for name in drafts
    }
    series["target forward / t(1)"] = (sorted(costs), [costs[n] / costs[1] for n in sorted(costs)])
    series["target forward / t(1), F.linear"] = (
        sorted(costs),
        [linear_costs[n] / linear_costs[1] for n in sorted(costs)],
    )
    if chain_rows:
        series["expected speed-up, measured acceptance"] = (
            [row["draft_tokens"] + 1 for row in chain_rows],
            [row["expected_speedup"] for row in chain_rows],
        )
    plot_series(
        stem.with_suffix(".png"),
        series,
        f"{model_name.split('/')[-1]}: verification cost and speed-up ceiling",
        "tokens per target forward",
        "ratio",
        baselines={"plain decoding": 1.0},
        log_x=True,
    )
    return body
