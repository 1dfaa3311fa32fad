#!/bin/bash
# Third round (C++ ops with OpenMP and pruned top-k, lazily built codes, the oracle selector and rescore_factor).
# Every method re-measured with the code of this round; 1 torch thread per process, the two windows and
# the passkey grid ran side by side on the 2-core CPU (not timed, so the sharing changes no figure).
export OMP_NUM_THREADS=1
# Perplexity at 8K on held-out text, two windows (tinyshakespeare from token 150000 and 200000), 128 scored tokens.
for skip in 150000 200000; do
  hf-adamas ppl --output-dir results/adamas/hard/round3/perplexity_$skip --resume --context 8192 --decode-tokens 128 \
    --skip-tokens $skip --budgets 64 128 256 --methods dense oracle asymmetric-online asymmetric-online-rescore
done
# Harder passkey, 4096 tokens, held-out split, 30 trials (the length where round 2 missed the targets).
hf-adamas passkey --output-dir results/adamas/hard/round3 --resume --trials 30 --splits heldout --lengths 4096 \
  --budgets 32 64 --methods dense oracle asymmetric-online asymmetric-online-rescore
# Peak memory of an 8K generation (one fresh process per method).
python scripts/measure_adamas_memory.py --output-dir results/adamas/memory --overwrite
