#!/usr/bin/env bash
# Round 9 of the tail estimate: the C++ op's logits fast-scanned (uint8 nibble tables), at commit 66b232c.
set -euo pipefail
D=results/adamas/tail/round9
OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/cpu_decode --contexts 8192 --budgets 64 256 --steps 16 --rounds 5 \
  --methods dense-static asymmetric-online asymmetric-online-tail2
OMP_NUM_THREADS=2 python scripts/bench_adamas_tail_op.py --output-dir $D/op
# End-to-end check of what the quantized estimates change (window 250000 never tuned on; 150000 held out).
for window in 250000 150000; do
  OMP_NUM_THREADS=2 hf-adamas ppl --output-dir $D/perplexity_$window --context 8192 --decode-tokens 128 \
    --skip-tokens $window --budgets 64 --methods dense asymmetric-online-tail2
done
# Passkey at 4K, budget 64, the 30 held-out trials of round 7 (1 thread, the two runs side by side; round 7:
# dense 15, default 14, tail 13, tail + rescore_factor=4 14).
OMP_NUM_THREADS=1 hf-adamas passkey --output-dir $D/passkey_4096_b64 --trials 30 --splits heldout --lengths 4096 \
  --budgets 64 --methods asymmetric-online-tail2
OMP_NUM_THREADS=1 hf-adamas passkey --output-dir $D/passkey_4096_b64_rescore --trials 30 --splits heldout \
  --lengths 4096 --budgets 64 --methods asymmetric-online-rescore-tail2
# A second end-to-end run with the tail + rescoring configuration (commit e745266).
OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/cpu_decode_rescore --contexts 8192 --budgets 64 256 --steps 16 \
  --rounds 5 --methods dense-static asymmetric-online asymmetric-online-rescore-tail2
# A repeat of the first run (commit 46bc4f3).
OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/cpu_decode_run2 --contexts 8192 --budgets 64 256 --steps 16 --rounds 5 \
  --methods dense-static asymmetric-online asymmetric-online-tail2
# The same at 4K (commit c689b1c).
OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/cpu_decode_4k --contexts 4096 --budgets 64 256 --steps 16 --rounds 5 \
  --methods dense-static asymmetric-online asymmetric-online-tail2
