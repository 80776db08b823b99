#!/usr/bin/env bash
# On the GPU machine (device tool, dist-gpu carried): our bench on the Mistral-7B shape with the
# window (4096) and with full attention, then the decode-latency plot. Results in $OUT.
#   scripts/gpu/bench.sh [extra bench args...]
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site dist-gpu/wheels/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu-bench.txt"
for variant in 7b-window 7b-full; do
    echo "== $variant"
    python3 -m mistral_compile -q bench "dist-gpu/$variant" --lib "dist-gpu/$variant/lib.so" \
        --device cuda --random-weights --json "$OUT/bench-$variant.json" "$@" 2>&1 \
        | grep -v "loading weights" | tee "$OUT/bench-$variant.log"
done
python3 benchmarks/plot_decode.py "$OUT/bench-7b-window.json" "$OUT/bench-7b-full.json" \
    "$OUT/decode-latency.png"
