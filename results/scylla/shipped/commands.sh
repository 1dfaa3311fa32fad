#!/bin/bash
# The draft shipped in model_cards/SmolLM2-135M-Instruct-scylla-D1 from issue 12's fifth session:
# u3-t0.5 of ../settings (the staged e4 draft + 1 epoch, 3 unrolled passes), 2-token chains (../chain-shape).
set -e
hf-scylla bench --draft runs/scylla/settings/u3-t0.5 --max-draft-tokens 2 --confidence-threshold 0 --tree 2 2 3 \
    --prompts-dir runs/scylla/bench-all --limit 4 --max-new-tokens 128 --output-dir results/scylla/shipped --overwrite
python scripts/scylla_card_results.py results/scylla/shipped/bench.json results/scylla/shipped/eval-results.json \
    --setting "greedy, chat template, 128 new tokens, chains of 2 draft tokens (no threshold), batch 1, float32 on a 2-core CPU; speed-up over plain greedy in the same run (results/scylla/shipped/bench.json)"
hf-scylla stage runs/scylla/settings/u3-t0.5 --repo-name hf-adamas-scylla-vrgd/SmolLM2-135M-Instruct-scylla-D1 \
    --output-dir model_cards/SmolLM2-135M-Instruct-scylla-D1 --overwrite --eval-results results/scylla/shipped/eval-results.json \
    --dataset openai/gsm8k --max-draft-tokens 2 --confidence-threshold 0 --training-notes "$(cat results/scylla/shipped/training-notes.txt)"
hf-scylla eval --model hf-scylla --model_args baseline=True --device cpu --tasks gsm8k_local --apply_chat_template \
    --limit 10 --log_samples --output_path runs/lm_eval/card_u3 --card model_cards/SmolLM2-135M-Instruct-scylla-D1
hf-scylla demo   # twice, the figures in README.md
