#!/bin/bash
# Issue 12: verification on hf_common.few_rows_linear. Run from the repository root with the venv active.
set -e
# 1. The tuning split: prompts 6-8 of each shared set (the bench below reads prompts 1-5; code and heldout
#    are never tuned on). Chain and tree shapes were chosen on this split only.
mkdir -p runs/scylla/tune
for s in alpaca gsm8k qa sum; do sed -n 6,8p ../shared/data/prompts/$s.jsonl > runs/scylla/tune/$s-tune.jsonl; done
hf-scylla bench --draft model_cards/SmolLM2-135M-Instruct-scylla-D1 --prompts-dir runs/scylla/tune --max-new-tokens 128 \
    --chain 3 4 --chain 4 6 --chain 6 8 --tree 4 4 8 --tree 6 4 12 --tree 6 8 16 \
    --output-dir results/scylla/few_rows_linear/tune --overwrite
# 2. Every reported set (first 5 prompts of each; code and heldout never tuned on), the shipped setting
#    (2-token chains + 4-token prompt lookup) on the kernel, next to greedy and prompt lookup with and
#    without it, the draft on F.linear, the chain alone and one tree.
mkdir -p runs/scylla/bench-all
for s in alpaca gsm8k qa sum; do ln -sf "$PWD/../shared/data/prompts/$s.jsonl" runs/scylla/bench-all/$s.jsonl; done
for s in code heldout; do ln -sf "$PWD/hf_scylla/bench/prompts/$s.jsonl" runs/scylla/bench-all/$s.jsonl; done
hf-scylla bench --draft model_cards/SmolLM2-135M-Instruct-scylla-D1 --prompts-dir runs/scylla/bench-all --limit 5 \
    --max-new-tokens 128 --few-rows-linear-rows --tree 4 4 8 --output-dir results/scylla/few_rows_linear/bench --overwrite
