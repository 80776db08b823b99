#!/usr/bin/env bash
# On the GPU machine (device tool; carry dist-gpu/{wheels,7b-full,7b-full-q4,prepared.json}):
# ours and the Hugging Face peer in one call, same GPU, same shape (Mistral-7B, full attention)
# and contexts; then the ratios. Ours runs fp16
# and q4f16_1, each without CUDA graphs (lib-nograph.so, compile --no-cuda-graph) and with them
# (lib.so, the default), on the model-owned KV cache (the default) and, with graphs, also on
# TVM's paged cache (bench --kv-cache paged).
#   scripts/gpu/versus.sh      -> $OUT/versus.txt, $OUT/ours-*.json, $OUT/hf-baseline.json
set -euo pipefail
source scripts/gpu/setup.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/versus.txt"
runs=()
for model in 7b-full 7b-full-q4; do
    for run in lib-nograph.so:owned lib.so:owned lib.so:paged; do
        lib=${run%:*} kv=${run#*:}
        [[ -f "dist-gpu/$model/$lib" ]] || continue
        name="ours-$model-${lib%.so}"
        [[ $kv == owned ]] || name="$name-$kv"
        echo "== $name"
        python3 -m mistral_compile -q bench "dist-gpu/$model" --lib "dist-gpu/$model/$lib" \
            --device cuda --random-weights --contexts 1024,4096 --prefill-chunks 4096 \
            --kv-cache "$kv" --json "$OUT/$name.json" 2>&1 | grep -v "loading weights"
        runs+=("$OUT/$name.json")
    done
done
python3 benchmarks/hf_baseline.py --contexts 1024,4096 --json "$OUT/hf-baseline.json"
python3 benchmarks/versus.py "${runs[0]}" "$OUT/hf-baseline.json" "${runs[@]:1}" \
    | tee -a "$OUT/versus.txt"
