#!/bin/bash
# Round 6: a floor on the exact second stage's candidates (AdamasConfig.rescore_candidates).
# Machine: the project's 2-core CPU VM, 1 torch thread per process, two processes side by side (not timed).
export OMP_NUM_THREADS=1
# Choice of the floor, on the TUNING split only (4K, 30 trials): no floor (the previous default; run at
# commit 0a888a7 plus the new field, when the default was still 0) against a floor of 128.
hf-adamas passkey --output-dir results/adamas/hard/round6/tuning-floor0 --resume --trials 30 --splits tuning \
  --lengths 4096 --budgets 16 32 64 --methods dense oracle asymmetric-online --rescore-candidates 0
hf-adamas passkey --output-dir results/adamas/hard/round6/tuning-floor128 --resume --trials 30 --splits tuning \
  --lengths 4096 --budgets 16 32 64 --methods asymmetric-online --rescore-candidates 128
# The new default (rescore_candidates=128) on the HELD-OUT split at 2K, 4K and 8K, 30 trials each.
for length in 2048 4096 8192; do
  hf-adamas passkey --output-dir results/adamas/hard/round6/$((length / 1024))k --resume --trials 30 --splits heldout \
    --lengths $length --budgets 16 32 64 --methods dense asymmetric-online
done
# Decode speed at 8K / 64 without and with the floor (2 torch threads, nothing else running), then the demo twice.
for floor in 0 128; do
  OMP_NUM_THREADS=2 hf-adamas bench --output-dir results/adamas/hard/round6/speed-8k-64-floor$floor --contexts 8192 \
    --budgets 64 --steps 16 --rounds 3 --methods dense-static asymmetric-online --rescore-candidates $floor
done
OMP_NUM_THREADS=2 hf-adamas demo; OMP_NUM_THREADS=2 hf-adamas demo
