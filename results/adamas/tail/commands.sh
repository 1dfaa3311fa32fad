#!/bin/bash
# The tail estimate (AdamasConfig(value_code_bits=2 or 4)) against the default (unselected keys dropped) and dense,
# re-measured side by side in each run. 1 torch thread per process; the perplexity windows and the passkey grid
# ran two at a time on the 2-core CPU (not timed, so the sharing changes no figure). Every command resumes.
export OMP_NUM_THREADS=1
# Perplexity at 8K on held-out Shakespeare: the two windows of round 3, and one never used before (250000).
for skip in 150000 200000 250000; do
  hf-adamas ppl --output-dir results/adamas/tail/perplexity_$skip --resume --context 8192 --decode-tokens 128 \
    --skip-tokens $skip --budgets 64 128 256 --methods dense asymmetric-online asymmetric-online-tail2 asymmetric-online-tail4
done
# Harder passkey, 4096 tokens, held-out split, 30 trials (where budget 64 missed dense by one trial, 32 by five).
hf-adamas passkey --output-dir results/adamas/tail/passkey_4096 --resume --trials 30 --splits heldout --lengths 4096 \
  --budgets 16 32 64 --methods dense asymmetric-online asymmetric-online-tail2 asymmetric-online-tail4
OMP_NUM_THREADS=2 hf-adamas bench --output-dir results/adamas/tail/cpu_decode --contexts 8192 --budgets 64 256 --steps 8 --rounds 3 \
  --methods dense-static asymmetric-online asymmetric-online-tail2
# The tail estimate with the rescoring stage (rescore_factor=4): the candidates' logits, already read exactly, replace
# their estimates in the tail (method asymmetric-online-rescore-tail2), budget 64 only; dense re-measured alike.
for skip in 150000 200000 250000; do
  hf-adamas ppl --output-dir results/adamas/tail/perplexity_$skip --resume --context 8192 --decode-tokens 128 \
    --skip-tokens $skip --budgets 64 --methods dense asymmetric-online-rescore-tail2
done
hf-adamas passkey --output-dir results/adamas/tail/passkey_4096 --resume --trials 30 --splits heldout --lengths 4096 \
  --budgets 32 64 --methods dense asymmetric-online-rescore-tail2
# Decode speed of that configuration at 8K, budget 64, side by side with dense-static and the default.
OMP_NUM_THREADS=2 hf-adamas bench --output-dir results/adamas/tail/cpu_decode_rescore --contexts 8192 --budgets 64 --steps 8 \
  --rounds 3 --methods dense-static asymmetric-online asymmetric-online-rescore-tail2
