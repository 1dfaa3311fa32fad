#!/bin/bash
# Round 7 of the tail estimate: why it loses pass keys (its estimated mass), and the level shift that
# corrects the mass. 1 torch thread per process, two processes at a time on the 2-core CPU (accuracy
# only, nothing timed but the last command, which ran alone). Every command resumes.
export OMP_NUM_THREADS=1
D=results/adamas/tail/round7
# The diagnosis, through the plain-PyTorch spec with the estimated logits changed per variant (code before the shift
# was built into the tail estimate; `plain` is the tail estimate as it was).
python scripts/diagnose_adamas_tail.py passkey --split heldout --trials 30 --lengths 4096 --variants plain candidate-shift \
  --output-dir $D/passkey_4096
python scripts/diagnose_adamas_tail.py passkey --split heldout --trials 30 --lengths 4096 --no-dense --variants mass-oracle \
  --output-dir $D/passkey_4096_mass_oracle
for skip in 150000 200000; do
  python scripts/diagnose_adamas_tail.py ppl --skip-tokens $skip --decode-tokens 128 \
    --variants plain mass-oracle candidate-shift dropped --output-dir $D/ppl_$skip
done
# The tail estimate with the level shift (the library code of this round), dense and the default side by side.
for skip in 250000 150000 200000; do
  hf-adamas ppl --output-dir $D/perplexity_$skip --resume --context 8192 --decode-tokens 128 --skip-tokens $skip \
    --budgets 64 --methods dense asymmetric-online asymmetric-online-tail2
done
hf-adamas passkey --output-dir $D/passkey_4096_b64 --resume --trials 30 --splits heldout --lengths 4096 --budgets 64 \
  --methods dense asymmetric-online asymmetric-online-tail2
hf-adamas passkey --output-dir $D/passkey_4096_b32 --resume --trials 30 --splits heldout --lengths 4096 --budgets 32 \
  --methods asymmetric-online asymmetric-online-tail2
# Added afterwards to the same folders (the earlier records kept): the tail estimate with rescore_factor=4.
for skip in 250000 150000 200000; do
  hf-adamas ppl --output-dir $D/perplexity_$skip --resume --context 8192 --decode-tokens 128 --skip-tokens $skip \
    --budgets 64 --methods dense asymmetric-online asymmetric-online-tail2 asymmetric-online-rescore-tail2
done
hf-adamas passkey --output-dir $D/passkey_4096_b64 --resume --trials 30 --splits heldout --lengths 4096 --budgets 64 \
  --methods dense asymmetric-online asymmetric-online-tail2 asymmetric-online-rescore-tail2
OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/cpu_decode --contexts 8192 --budgets 64 --steps 8 --rounds 3 \
  --methods dense-static asymmetric-online asymmetric-online-tail2
# The tuning-split check run before the shift was built in (variant sampled-shift = the rule built in); written to
# /tmp and copied into tuning/.
python scripts/diagnose_adamas_tail.py passkey --split tuning --trials 15 --lengths 4096 --variants plain sampled-shift \
  --output-dir /tmp/tune_pk
python scripts/diagnose_adamas_tail.py ppl --skip-tokens 100000 --decode-tokens 64 --no-dense \
  --variants plain sampled-shift mass-oracle --output-dir /tmp/tune_ppl
# The same configuration at 8K, budget 64 (dense and the default of these trials: ../../hard/round6/8k/).
hf-adamas passkey --output-dir $D/passkey_8192_b64 --resume --trials 30 --splits heldout --lengths 8192 --budgets 64 \
  --methods asymmetric-online-rescore-tail2
