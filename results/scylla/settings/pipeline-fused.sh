#!/bin/bash
# EAGLE-3 layer fusion next to the settings of pipeline.sh: the shipped draft given fusion (starting
# exactly from it), + 1 epoch of the same data with u2-t0.5's settings, then the same validation bench.
set -e
cd /work/main
while pgrep -f "settings/pipeline.sh" > /dev/null; do sleep 20; done
export OMP_NUM_THREADS=2
INIT=model_cards/SmolLM2-135M-Instruct-scylla-D1
if [ ! -f runs/scylla/settings/fused-u2-t0.5/model.safetensors ]; then
  .venv/bin/hf-scylla train --data runs/scylla/self-distill/dataset --samples 1155 --max-length 256 --init-draft $INIT \
    --fuse-layers --epochs 1 --learning-rate 3e-4 --batch-size 8 --unroll-steps 2 --token-weight 0.5 \
    --output-dir runs/scylla/settings/fused-u2-t0.5 $( [ -d runs/scylla/settings/fused-u2-t0.5 ] && echo --resume ) > runs/scylla/settings/fused-u2-t0.5.log 2>&1
fi
[ -f runs/scylla/settings/bench-fused-u2-t0.5/bench.json ] || .venv/bin/hf-scylla bench --draft runs/scylla/settings/fused-u2-t0.5 \
  --max-draft-tokens 6 --confidence-threshold 0 --prompts-dir runs/scylla/val-prompts --limit 8 --max-new-tokens 128 \
  --output-dir runs/scylla/settings/bench-fused-u2-t0.5 > runs/scylla/settings/bench-fused-u2-t0.5.log 2>&1
echo done
