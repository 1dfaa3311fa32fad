#!/usr/bin/env bash
# The lm-eval evidence runs of results/lm_eval/README.md (CPU, single-threaded, short --limit).
# Usage: scripts/lm_eval_evidence.sh DRAFT_DIR [OUT_DIR]   (run from the repository root)
set -euo pipefail
DRAFT=${1:?usage: $0 DRAFT_DIR [OUT_DIR]}
OUT=${2:-results/lm_eval}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
# plain lm-eval "hf" reads the default model from the safetensors cache our loader converts the GGUF into
BASE=$($PY -c "from hf_common import default_model_path; print(default_model_path())")
HF_ARGS="pretrained=$BASE,dtype=float32,attn_implementation=sdpa"

# 1. GSM8K: plain greedy (hf) vs Scylla speculative decoding (hf-scylla, also timing greedy itself)
$PY -m hf_scylla.cli eval --model hf --model_args "$HF_ARGS" --device cpu --tasks gsm8k_local \
    --apply_chat_template --limit 10 --log_samples --output_path "$OUT/gsm8k_hf"
$PY -m hf_scylla.cli eval --model hf-scylla --model_args "draft=$DRAFT,baseline=True" --device cpu \
    --tasks gsm8k_local --apply_chat_template --limit 10 --log_samples --output_path "$OUT/gsm8k_hf-scylla"

# 2. Passkey retrieval at 2K/4K/8K tokens: dense sdpa vs Adamas at budgets of 64 and 256 keys
$PY -m hf_adamas.cli eval --model hf --model_args "$HF_ARGS" --device cpu --tasks passkey_local \
    --limit 2 --output_path "$OUT/passkey_hf"
for budget in 64 256; do
    $PY -m hf_adamas.cli eval --model hf-adamas --model_args "token_budget=$budget" --device cpu \
        --tasks passkey_local --limit 2 --output_path "$OUT/passkey_hf-adamas-$budget"
done

# 3. Rolling perplexity of one 8,000-character slice of tinyshakespeare: dense vs budgets 64/256/1024
#    (8192 >= the slice's length: one forward, the same as dense)
$PY -m hf_adamas.cli eval --model hf --model_args "$HF_ARGS" --device cpu --tasks tinyshakespeare_ppl \
    --limit 1 --output_path "$OUT/ppl_hf"
for budget in 64 256 1024 8192; do
    $PY -m hf_adamas.cli eval --model hf-adamas --model_args "token_budget=$budget" --device cpu \
        --tasks tinyshakespeare_ppl --limit 1 --output_path "$OUT/ppl_hf-adamas-$budget"
done
