#!/bin/bash
# Fourth round: the budgets the harder-passkey grid lacked (16, 128, 512) at 4K, for the default selector,
# the exact top-k bound and dense, with the code of this round (fast-scanned CPU selection, the same
# indices as the reference, so the selection of earlier rounds is unchanged). 1 torch thread; it shared
# the 2-core CPU with a test run (not timed, so the sharing changes no figure).
export OMP_NUM_THREADS=1
hf-adamas passkey --output-dir results/adamas/hard/round4 --resume --trials 30 --splits heldout --lengths 4096 \
  --budgets 16 128 512 --methods dense oracle asymmetric-online
# The same at 8192 tokens for the budgets the 8K grid lacked (128, 256, 512), dense and the default only
# (2 torch threads; nothing else ran but a paused data-generation job).
OMP_NUM_THREADS=2 hf-adamas passkey --output-dir results/adamas/hard/round4-8k --resume --trials 30 --splits heldout \
  --lengths 8192 --budgets 128 256 512 --methods dense asymmetric-online
