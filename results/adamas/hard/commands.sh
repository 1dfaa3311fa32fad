#!/bin/bash
# The commands that produced the records in this folder (each resumable: --resume measures only the
# (trial, method) pairs that are missing; --report-only rebuilds the summaries from the records).
# Machine: the project's shared 2-core CPU box (under heavy load from other jobs), 1 torch thread each.
export OMP_NUM_THREADS=1

# Harder passkey, 2048 tokens, budgets 16-64, the held-out and the tuning split (two processes).
# (The dense records of held-out trials 0-1 came from `--methods dense --trials 6 --splits heldout` run in
# another folder and copied in before these started; an earlier run whose haystack ended mid-sentence was discarded.)
for split in heldout tuning; do
  hf-adamas passkey --output-dir results/adamas/hard --resume --trials 30 --splits $split --lengths 2048 \
    --budgets 16 32 64 --methods dense asymmetric-online adamas-calibrated adamas asymmetric-calibrated &
done
wait

# Perplexity at 8K on held-out text (tinyshakespeare from token 150000; calibration used its first 1024).
hf-adamas ppl --output-dir results/adamas/hard --resume --context 8192 --decode-tokens 64 --skip-tokens 150000 \
  --budgets 64 256 --methods dense asymmetric-online adamas streaming_llm quest adamas-calibrated asymmetric-calibrated

# Summaries from all records.
hf-adamas passkey --output-dir results/adamas/hard --report-only --splits heldout tuning

# Baselines, per-KV-group selection and a larger budget on the first held-out trials (started later, run alongside).
hf-adamas passkey --output-dir results/adamas/hard --resume --trials 2 --splits heldout --lengths 2048 \
  --budgets 32 64 256 --methods streaming_llm quest asymmetric-online-kvgroup asymmetric-online

# A second perplexity window (tinyshakespeare from token 200000), budget 64 only, stopped at the deadline.
hf-adamas ppl --output-dir results/adamas/hard/perplexity_window2 --resume --context 8192 --decode-tokens 64 \
  --skip-tokens 200000 --budgets 64 --methods dense asymmetric-online adamas-calibrated asymmetric-calibrated adamas

# Second session (C++ CPU ops, 1 thread): 4096 and 8192 tokens, held-out split.
hf-adamas passkey --output-dir results/adamas/hard --resume --trials 30 --splits heldout --lengths 4096 \
  --budgets 16 32 64 --methods dense asymmetric-online adamas streaming_llm quest
hf-adamas passkey --output-dir results/adamas/hard --resume --trials 30 --splits heldout --lengths 4096 \
  --budgets 32 64 256 --methods dense asymmetric-online-kvgroup asymmetric-online
# 8192 (30 trials; the run was stopped once after 12 trials and resumed), then the paper rule and the baselines
# at 64 (run in the third session, code of commit ded0440, 2 torch threads; the dense records are round 2's).
hf-adamas passkey --output-dir results/adamas/hard --resume --trials 30 --splits heldout --lengths 8192 \
  --budgets 16 32 64 --methods dense asymmetric-online
hf-adamas passkey --output-dir results/adamas/hard --resume --trials 30 --splits heldout --lengths 8192 \
  --budgets 64 --methods dense adamas streaming_llm quest
hf-adamas passkey --output-dir results/adamas/hard --report-only --splits heldout tuning
