"""Evidence that Scylla speculative sampling (temperature 1) keeps the target's output distribution.

A tiny random Llama target over a vocabulary of 4 tokens and a Scylla draft that often disagrees with
it: the exact law of the first 3 new tokens (64 cells) is enumerated, then thousands of sequences are
drawn by plain sampling (the control), by `hf_scylla.generate(do_sample=True)` with chains, with a
reduced draft vocabulary (3 of the 4 tokens; the draft cannot propose the fourth), with EAGLE-2 draft
trees (multi-candidate rejection sampling over siblings) and with both, with prompt-lookup proposals
next to the chains (kept while the target's own samples agree with them), and by the cache-free
reference loop. Each sample set gets Pearson's chi-square p-value against the target's law, and the
speculative samples also against the law of a broken sampler that keeps every draft token (the test
must reject that one). Writes ``sampling.json``, ``sampling.md`` and ``sampling.png``.

    python scripts/scylla_sampling_check.py --samples 4000 --output-dir results/scylla/sampling --overwrite
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_common.outputs import RUNS_DIR, OutputPathError, add_output_arguments, claim_outputs
from hf_common.reporting import command_line, plt, save_figure, write_report
from hf_scylla import (
    ScyllaDraftConfig,
    ScyllaDraftModel,
    ScyllaStats,
    TreeConfig,
    generate,
    reference_speculative_decode,
)
from hf_scylla.bench.verify_cost import clone_draft
from hf_scylla.distribution import chi_square_p_value, draft_chain_logits, exact_sequence_law, sequence_cell
from hf_scylla.vocab import reduce_draft_vocabulary

VOCAB = 4
NEW_TOKENS = 3
PROMPT = torch.tensor([[3, 1, 2, 0]])
DRAFT_SUBSET = torch.tensor([0, 1, 3])
TREE = TreeConfig(depth=2, top_k=2, total_tokens=4)
LOOKUP_TOKENS = 2
SCYLLA_SAMPLERS = {  # name -> (reduced draft vocabulary, hf_scylla.generate options)
    "scylla": (False, {}),
    "scylla_reduced_vocab": (True, {}),
    "scylla_tree": (False, {"tree": TREE}),
    "scylla_tree_reduced_vocab": (True, {"tree": TREE}),
    "scylla_prompt_lookup": (False, {"lookup_tokens": LOOKUP_TOKENS}),
}


def build_pair(seed: int) -> tuple[torch.nn.Module, ScyllaDraftModel]:
    """A peaky tiny target and a random draft with sharp guesses, so both accepts and rejects happen."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    target = AutoModelForCausalLM.from_config(config).eval()
    draft = ScyllaDraftModel(ScyllaDraftConfig.from_target_config(config, 1, max_draft_tokens=2)).eval()
    draft.attach_target(target)
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)
        draft.fc.weight.mul_(10.0)
    return target, draft


def draw(sampler: str, target, draft, count: int, seed: int) -> tuple[torch.Tensor, ScyllaStats, float]:
    """``count`` cells from one sampler; its acceptance statistics and seconds."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    cells, stats, start = [], ScyllaStats(), time.perf_counter()
    for _ in tqdm(range(count), desc=sampler, unit="sample"):
        if sampler == "plain":
            sequence = target.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0)
        elif sampler in SCYLLA_SAMPLERS:
            options = SCYLLA_SAMPLERS[sampler][1]
            result = generate(
                target, draft, PROMPT, max_new_tokens=NEW_TOKENS + 1, do_sample=True, top_k=0, **options
            )
            sequence = result.output
            stats.merge(result.stats)
        else:
            sequence, cycles = reference_speculative_decode(
                target, draft, PROMPT, max_new_tokens=NEW_TOKENS + 1, do_sample=True, rng=rng
            )
            for drafted, accepted in cycles:
                stats.record(drafted, accepted)
        cells.append(sequence_cell(sequence, PROMPT.shape[1], NEW_TOKENS, VOCAB))
    return torch.tensor(cells), stats, time.perf_counter() - start


def plot(path: Path, law: torch.Tensor, broken: torch.Tensor, samples: dict[str, torch.Tensor]) -> Path:
    order = law.argsort(descending=True)[:16]
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    width = 0.8 / (len(samples) + 2)
    x = torch.arange(len(order)).double().numpy()
    ax.bar(x, law[order].tolist(), width, label="target law (exact)", color="black")
    ax.bar(x + width, broken[order].tolist(), width, label="keep-every-draft law (exact)", color="C3")
    for index, (name, cells) in enumerate(samples.items(), start=2):
        frequencies = torch.bincount(cells, minlength=len(law)).double() / len(cells)
        ax.bar(x + index * width, frequencies[order].tolist(), width, label=f"{name} samples")
    labels = ["".join(str(int(cell) // VOCAB**p % VOCAB) for p in (2, 1, 0)) for cell in order]
    ax.set_xticks(x + width * (len(samples) + 1) / 2, labels, rotation=60, fontsize=8)
    ax.set(
        title=f"First {NEW_TOKENS} sampled tokens, temperature 1 (16 most likely of {len(law)} cells)",
        xlabel="token sequence",
        ylabel="probability",
    )
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4000, help="Sequences drawn per sampler.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tiny models and of the sampling.")
    add_output_arguments(parser, RUNS_DIR / "scylla" / "sampling")
    args = parser.parse_args(argv)
    if args.samples < 100:
        parser.error(f"--samples must be at least 100 for a chi-square test, got {args.samples}")
    try:
        claim_outputs(
            [args.output_dir / f"sampling.{suffix}" for suffix in ("json", "md", "png")], args.overwrite
        )
    except OutputPathError as error:
        parser.error(str(error))
    target, draft = build_pair(args.seed)
    law = exact_sequence_law(lambda inputs: target(inputs).logits[:, -1], PROMPT, NEW_TOKENS, VOCAB)
    reduced = reduce_draft_vocabulary(clone_draft(draft, target), DRAFT_SUBSET)
    broken_laws = {
        False: exact_sequence_law(
            draft_chain_logits(target, draft, PROMPT.shape[1]), PROMPT, NEW_TOKENS, VOCAB
        ),
        True: exact_sequence_law(
            draft_chain_logits(target, reduced, PROMPT.shape[1]), PROMPT, NEW_TOKENS, VOCAB
        ),
    }
    broken = broken_laws[False]
    rows, samples = [], {}
    for sampler in ("plain", *SCYLLA_SAMPLERS, "reference"):
        is_reduced = SCYLLA_SAMPLERS.get(sampler, (False, {}))[0]
        sampler_draft = reduced if is_reduced else draft
        cells, stats, seconds = draw(sampler, target, sampler_draft, args.samples, args.seed + 1)
        samples[sampler] = cells
        frequencies = torch.bincount(cells, minlength=len(law)).double() / len(cells)
        rows.append(
            {
                "sampler": sampler,
                "samples": len(cells),
                "p_value_target_law": chi_square_p_value(cells, law),
                "p_value_keep_every_draft_law": chi_square_p_value(cells, broken_laws[is_reduced]),
                "total_variation_to_target_law": 0.5 * float((frequencies - law.double()).abs().sum()),
                "draft_acceptance": sum(stats.accepted) / sum(stats.drafted) if stats.drafted else None,
                "tau": stats.tau if stats.cycles else None,
                "lookup_cycles": sum(stats.lookup),
                "seconds": seconds,
            }
        )
    command = command_line(
        "python", ["scripts/scylla_sampling_check.py", *(sys.argv[1:] if argv is None else argv)]
    )
    summary = {
        "setting": f"tiny random Llama target (vocab {VOCAB}, 2 layers, peaky LM head), D=1 draft, chains "
        f"of 2 or trees {TREE} or prompt-lookup proposals of {LOOKUP_TOKENS} (when the last 2-3 tokens repeat), reduced draft vocabulary {DRAFT_SUBSET.tolist()}, prompt {PROMPT.tolist()[0]}, law of the first {NEW_TOKENS} new tokens ({len(law)} cells)",
        "total_variation_target_vs_keep_every_draft": 0.5 * float((law - broken).abs().sum()),
        "rows": rows,
    }
    table = [
        "| sampler | samples | p (target law) | p (keep-every-draft law) | TV to target law | acceptance | tau "
        "| lookup cycles |"
    ]
    table.append("|---|---|---|---|---|---|---|---|")
    for row in rows:
        acceptance = "" if row["draft_acceptance"] is None else f"{row['draft_acceptance']:.3f}"
        tau = "" if row["tau"] is None else f"{row['tau']:.3f}"
        table.append(
            f"| {row['sampler']} | {row['samples']} | {row['p_value_target_law']:.3g} | "
            f"{row['p_value_keep_every_draft_law']:.3g} | {row['total_variation_to_target_law']:.4f} | "
            f"{acceptance} | {tau} | {row['lookup_cycles']} |"
        )
    body = f"Setting: {summary['setting']}.\n\n" + "\n".join(table) + "\n"
    write_report(
        args.output_dir,
        "sampling",
        command,
        summary,
        "Speculative sampling keeps the target's distribution",
        body,
    )
    plot(args.output_dir / "sampling.png", law, broken, samples)
    print("\n".join(table))
    print(f"Saved {args.output_dir}/sampling.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
