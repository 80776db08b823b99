#!/usr/bin/env bash
# On the GPU machine (device tool, dist-gpu carried): ours and the Hugging Face peer in one call,
# same GPU, same shape (Mistral-7B, fp16, full attention) and contexts; then the ratios.
#   scripts/gpu/versus.sh      -> $OUT/versus.txt, $OUT/ours*.json, $OUT/hf-baseline.json
set -euo pipefail
source scripts/gpu/setup.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/versus.txt"
python3 -m mistral_compile -q bench dist-gpu/7b-full --lib dist-gpu/7b-full/lib.so --device cuda \
    --random-weights --contexts 1024,4096 --prefill-chunks 4096 --json "$OUT/ours.json" 2>&1 \
    | grep -v "loading weights"
python3 -m mistral_compile -q bench dist-gpu/7b-full-q4 --lib dist-gpu/7b-full-q4/lib.so \
    --device cuda --random-weights --contexts 1024,4096 --prefill-chunks 4096 \
    --json "$OUT/ours-q4.json" 2>&1 | grep -v "loading weights"
python3 benchmarks/hf_baseline.py --contexts 1024,4096 --json "$OUT/hf-baseline.json"
python3 benchmarks/versus.py "$OUT/ours.json" "$OUT/hf-baseline.json" "$OUT/ours-q4.json" \
    | tee -a "$OUT/versus.txt"
