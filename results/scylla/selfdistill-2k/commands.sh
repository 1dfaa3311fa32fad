#!/bin/bash
# Issue 12: a draft trained on twice the self-distilled data. Run from the repository root with the venv active.
set -e
# 1. Data: 1,792 Magpie user turns (seeds 0-55 per batch of 32; the earlier run's 1,024 were seeds 0-31) and
#    256 GSM8K train questions, answered by the target (batched greedy, 128 tokens at most).
OMP_NUM_THREADS=2 hf-scylla make-data --user-turns 1792 --batch-size 32 --seed-prompts ../shared/data/gsm8k/train.jsonl \
    --seed-samples 256 --output-dir runs/scylla/self-distill-1792
# 2. One epoch from the shipped draft over every conversation but the last 48 (sampled turns of the last
#    batches: the validation split, never trained on), with the shipped draft's settings (3 unrolled passes,
#    token weight 0.5; its 8,192-token head comes with --init-draft).
OMP_NUM_THREADS=2 hf-scylla train --data runs/scylla/self-distill-1792/dataset --samples 1843 --max-length 256 \
    --init-draft model_cards/SmolLM2-135M-Instruct-scylla-D1 --epochs 1 --learning-rate 3e-4 --token-weight 0.5 \
    --unroll-steps 3 --batch-size 8 --output-dir runs/scylla/D1-selfdistill-2k
# 3. The reported sets (first 5 prompts of each; code and heldout never tuned on), the shipped decoding setting
#    (2-token chains + 4-token prompt lookup, on hf_common.few_rows_linear), as results/scylla/few_rows_linear/bench.
mkdir -p runs/scylla/bench-all
for s in alpaca gsm8k qa sum; do ln -sf "$PWD/../shared/data/prompts/$s.jsonl" runs/scylla/bench-all/$s.jsonl; done
for s in code heldout; do ln -sf "$PWD/hf_scylla/bench/prompts/$s.jsonl" runs/scylla/bench-all/$s.jsonl; done
OMP_NUM_THREADS=2 hf-scylla bench --draft runs/scylla/D1-selfdistill-2k --prompts-dir runs/scylla/bench-all --limit 5 \
    --max-new-tokens 128 --output-dir results/scylla/selfdistill-2k/bench --overwrite
