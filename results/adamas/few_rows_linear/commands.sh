#!/bin/bash
# Issue 15, round 11: the 8K decode target with every method's linear layers on hf_common.few_rows_linear.
# Run from the repository root with the venv active (commit 63f0164).
set -e
OMP_NUM_THREADS=2 hf-adamas bench --output-dir results/adamas/few_rows_linear --contexts 8192 --budgets 64 256 \
    --steps 16 --rounds 5 --methods dense-static asymmetric-online --few-rows-linear both
