#!/usr/bin/env bash
# On the GPU machine (carry what `prepare.py --shapes` built: dist-gpu/{wheels-core,7b-full,...}):
# batch-1 decode at 1k, 4k and 32k and prefill of a 4096-token chunk for every configs/ shape,
# fp16 (and q4f16_1 on 7B and 24B), each against the copy bandwidth measured in the same run; then
# the HF peer on the shapes named. Results in $OUT/shapes.tgz (a device
# call returns 8 files) (issue 20).
#   [SHAPES="7b-full small-24b"] [CONTEXTS=1024,4096] [PEER_CONFIGS="mistral-small-24b-base-2501.json"] scripts/gpu/shapes.sh
set -euo pipefail
WHEELS=dist-gpu/wheels-core source scripts/gpu/setup.sh
RES="$(mktemp -d)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu-shapes.txt"
for name in ${SHAPES:-7b-full 7b-full-q4 ministral-8b nemo-12b codestral-22b small-24b small-24b-q4}; do
    [[ -d "dist-gpu/$name" ]] || { echo "== $name: not carried"; continue; }
    echo "== $name"
    python3 -m mistral_compile -q bench "dist-gpu/$name" --lib "dist-gpu/$name/lib.so" \
        --device cuda --random-weights --contexts "${CONTEXTS:-1024,4096,32768}" --prefill-chunks 4096 \
        --json "$RES/shape-$name.json" 2>&1 | grep -v "loading weights" | tee "$RES/shape-$name.log"
done
for config in ${PEER_CONFIGS:-mistral-small-24b-base-2501.json}; do
    echo "== HF peer on $config"
    python3 benchmarks/hf_baseline.py --config "configs/$config" --contexts 1024 --steps 16 \
        --json "$RES/peer-${config%.json}.json" 2>&1 | tee "$RES/peer-${config%.json}.log"
done
tar czf "$OUT/shapes.tgz" -C "$RES" .
