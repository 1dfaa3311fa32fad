#!/bin/bash
# Which training settings win, by tau on the validation split (magpie-val): each run is the shipped
# draft (D1-selfdistill-e4) + 1 epoch of the same self-distilled data with one setting changed.
set -e
cd /work/main
export OMP_NUM_THREADS=2
FEAT=runs/scylla/D1-selfdistill/features-1155x256-31fe4b490fb6.pt
INIT=model_cards/SmolLM2-135M-Instruct-scylla-D1
COMMON="--data runs/scylla/self-distill/dataset --samples 1155 --max-length 256 --init-draft $INIT --features $FEAT --epochs 1 --learning-rate 3e-4 --batch-size 8"
run() {  # name, extra train flags
  if [ ! -f runs/scylla/settings/$1/model.safetensors ]; then
    .venv/bin/hf-scylla train $COMMON $2 --output-dir runs/scylla/settings/$1 $( [ -d runs/scylla/settings/$1 ] && echo --resume ) > runs/scylla/settings/$1.log 2>&1
  fi
}
run u2-t0.5 "--unroll-steps 2 --token-weight 0.5"
run u3-t0.5 "--unroll-steps 3 --token-weight 0.5"
run u1-t0.5 "--unroll-steps 1 --token-weight 0.5"
run u2-t2 "--unroll-steps 2 --token-weight 2.0"
for d in e4:$INIT u2-t0.5:runs/scylla/settings/u2-t0.5 u3-t0.5:runs/scylla/settings/u3-t0.5 u1-t0.5:runs/scylla/settings/u1-t0.5 u2-t2:runs/scylla/settings/u2-t2; do
  name=${d%%:*}; path=${d#*:}
  [ -f runs/scylla/settings/bench-$name/bench.json ] || .venv/bin/hf-scylla bench --draft $path --max-draft-tokens 6 --confidence-threshold 0 \
    --prompts-dir runs/scylla/val-prompts --limit 8 --max-new-tokens 128 --output-dir runs/scylla/settings/bench-$name > runs/scylla/settings/bench-$name.log 2>&1
done
echo done
