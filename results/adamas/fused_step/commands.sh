#!/usr/bin/env bash
# Round 10: the default rule's decode step as one C++ call per layer (ops.cpu.asymmetric_decode_step_cpu),
# at commit 9859870. Every run alone on the 2-core VM, 2 threads.
set -euo pipefail
D=results/adamas/fused_step
for run in cpu_decode cpu_decode_run2; do
  OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/$run --contexts 8192 --budgets 64 256 --steps 16 --rounds 5 \
    --methods dense-static asymmetric-online asymmetric-online-tail2
done
OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/cpu_decode_4k --contexts 4096 --budgets 64 256 --steps 16 --rounds 5 \
  --methods dense-static asymmetric-online asymmetric-online-tail2
OMP_NUM_THREADS=2 hf-adamas bench --output-dir $D/cpu_decode_run3 --contexts 8192 --budgets 64 256 --steps 16 --rounds 5 \
  --methods dense-static asymmetric-online   # a third run, at commit 5ced5b2
