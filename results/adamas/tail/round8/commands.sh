#!/usr/bin/env bash
# Round 8 of the tail estimate: the one-call C++ op (hf_adamas.ops.cpu.tail_decode_attention_cpu), at commit a1e85ab.
set -euo pipefail
D=results/adamas/tail/round8
OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/cpu_decode --contexts 8192 --budgets 64 256 --steps 16 --rounds 5 \
  --methods dense-static asymmetric-online asymmetric-online-tail2 asymmetric-online-rescore-tail2
# End-to-end check that the new op changes nothing measurable (the window never tuned on; round 7: dense 17.22, tail 17.10).
OMP_NUM_THREADS=2 hf-adamas ppl --output-dir $D/perplexity_250000 --context 8192 --decode-tokens 128 --skip-tokens 250000 \
  --budgets 64 --methods dense asymmetric-online-tail2
# The second run, with the cache's value codes encoded in C++ (the code of commit 259659c).
OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/cpu_decode_values_in_cpp --contexts 8192 --budgets 64 256 --steps 16 \
  --rounds 5 --methods dense-static asymmetric-online asymmetric-online-tail2
# One layer's op against the spec, the PyTorch path and sdpa (commit 09be5ec).
OMP_NUM_THREADS=2 python scripts/bench_adamas_tail_op.py --output-dir $D/op
