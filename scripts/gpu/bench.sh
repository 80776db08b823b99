#!/usr/bin/env bash
# On the GPU machine (device tool; carry dist-gpu/{wheels,7b-window,7b-full,prepared.json}):
# our bench on the Mistral-7B shape with the window (4096) and with full attention, then the
# decode-latency plot. Results in $OUT.
#   [VARIANTS="7b-window-q4 7b-full-q4"] scripts/gpu/bench.sh [extra bench args...]
set -euo pipefail
source scripts/gpu/setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu-bench.txt"
for variant in ${VARIANTS:-7b-window 7b-full}; do
    echo "== $variant"
    python3 -m mistral_compile -q bench "dist-gpu/$variant" --lib "dist-gpu/$variant/lib.so" \
        --device cuda --random-weights --json "$OUT/bench-$variant.json" "$@" 2>&1 \
        | grep -v "loading weights" | tee "$OUT/bench-$variant.log"
done
if [[ -f "$OUT/bench-7b-window.json" && -f "$OUT/bench-7b-full.json" ]]; then
    python3 benchmarks/plot_decode.py "$OUT/bench-7b-window.json" "$OUT/bench-7b-full.json" \
        "$OUT/decode-latency.png"
fi
