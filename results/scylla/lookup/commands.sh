#!/bin/bash
# Issue 12, seventh session: prompt lookup next to the staged draft (lookup_tokens 4), every prompt set.
set -e
# the new held-out code set, committed; rebuilding it needs the file removed first:
#   python scripts/scylla_code_prompts.py --output hf_scylla/bench/prompts/code.jsonl
ln -sf "$PWD/hf_scylla/bench/prompts/code.jsonl" runs/scylla/bench-all/code.jsonl
hf-scylla bench --draft model_cards/SmolLM2-135M-Instruct-scylla-D1 --lookup-tokens 4 --prompts-dir runs/scylla/bench-all \
    --limit 5 --max-new-tokens 128 --output-dir results/scylla/lookup --overwrite
python scripts/scylla_card_results.py results/scylla/lookup/bench.json results/scylla/lookup/eval-results.json \
    --setting "greedy, chat template, 128 new tokens, chains of 2 draft tokens (no threshold) or 4-token prompt-lookup proposals, batch 1, float32 on a 2-core CPU; speed-up over plain greedy in the same run (results/scylla/lookup/bench.json)"
hf-scylla stage runs/scylla/settings/u3-t0.5 --repo-name hf-adamas-scylla-vrgd/SmolLM2-135M-Instruct-scylla-D1 \
    --output-dir model_cards/SmolLM2-135M-Instruct-scylla-D1 --overwrite --eval-results results/scylla/lookup/eval-results.json \
    --dataset openai/gsm8k --max-draft-tokens 2 --confidence-threshold 0 --lookup-tokens 4 \
    --training-notes "$(cat results/scylla/lookup/training-notes.txt)"
hf-scylla eval --model hf-scylla --model_args baseline=True --device cpu --tasks gsm8k_local --apply_chat_template \
    --limit 10 --log_samples --output_path runs/lm_eval/card_lookup --card model_cards/SmolLM2-135M-Instruct-scylla-D1
python scripts/scylla_sampling_check.py --samples 2000 --output-dir results/scylla/sampling --overwrite
hf-scylla demo   # twice, the figures in README.md
