#!/usr/bin/env bash
# On the GPU machine (carry dist-gpu/ from `prepare.py --batch`): the batched engine on the
# Mistral-7B shape (fp16 and q4f16_1) and the HF peer's batched decode in the same call, then
# the sampled/greedy step on Ministral-8B. Results in $OUT.
#   BATCHES=1,8,32,64,128 THROUGHPUT="1000:128:128 256:512:512" scripts/gpu/batch.sh
set -euo pipefail
source scripts/gpu/setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu-batch.txt"
tp=()
for spec in ${THROUGHPUT:-1000:128:128 256:512:512}; do tp+=(--throughput "$spec"); done
echo "== 7b-full fp16"
python3 -m mistral_compile -q bench dist-gpu/7b-full --lib dist-gpu/7b-full/lib.so --device cuda \
    --random-weights --batch "${BATCHES:-1,8,32,64,128}" --contexts "${CONTEXTS:-1024,4096}" \
    "${tp[@]}" --json "$OUT/batch-7b-full.json" 2>&1 | grep -v "loading weights" \
    | tee "$OUT/batch-7b-full.log"
echo "== 7b-full q4f16_1"
python3 -m mistral_compile -q bench dist-gpu/7b-full-q4 --lib dist-gpu/7b-full-q4/lib.so \
    --device cuda --random-weights --batch 1,64 --contexts 1024 \
    --json "$OUT/batch-7b-full-q4.json" 2>&1 | grep -v "loading weights" \
    | tee "$OUT/batch-7b-full-q4.log"
echo "== ministral-8b fp16 (sampled step)"
python3 -m mistral_compile -q bench dist-gpu/ministral-8b --lib dist-gpu/ministral-8b/lib.so \
    --device cuda --random-weights --batch 1 --contexts 1024 \
    --json "$OUT/batch-ministral.json" 2>&1 | grep -v "loading weights" \
    | tee "$OUT/batch-ministral.log"
if [[ -z "${NO_PEER:-}" ]]; then
    echo "== HF peer"
    python3 benchmarks/hf_baseline.py --contexts 1024 --steps 16 --batches "${PEER_BATCHES:-64}" \
        --json "$OUT/batch-hf.json" 2>&1 | tee "$OUT/batch-hf.log"
fi
