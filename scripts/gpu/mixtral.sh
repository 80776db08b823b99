#!/usr/bin/env bash
# On the GPU machine (carry what `prepare.py --mixtral` built: dist-gpu/{wheels-core,tiny/mixtral,
# mixtral-8x7b,mixtral-8x7b-q4,mixtral-8x7b-2l,prepared.json}): issue 21's H200 figures.
#   1. the tiny Mixtral against HF (fp32, fp16, q4 vs its dequantized weights) and in the batched
#      runtime, then the 8x7B shape (2 layers) against HF float32 on the same random weights
#      (2100-token prompt, a decode step); precision: full depth (scripts/gpu/mixtral_precision.py)
#   2. bench: batch-1 decode at 1k and 4k, prefill of a 2048 chunk, fp16 and q4f16_1, against
#      the copy bandwidth of the same run
#   3. the HF peer (transformers' own experts implementation) on the same shape
#   [PARTS="tests precision bench peer"] scripts/gpu/mixtral.sh
set -euo pipefail
WHEELS=dist-gpu/wheels-core source scripts/gpu/setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
parts=" ${PARTS:-tests precision bench peer} "
failed=0
if [[ $parts == *" tests "* ]]; then
    python3 -m pytest -m gpu tests/gpu/test_cuda.py tests/gpu/test_batch_cuda.py -k mixtral \
        -s -q -p no:cacheprovider 2>&1 | tee "$OUT/mixtral-tests.log" || failed=1
fi
if [[ $parts == *" precision "* ]]; then
    python3 -P scripts/gpu/mixtral_precision.py 2>&1 | grep -v "Loading weights" \
        | tee "$OUT/mixtral-precision.log"
fi
if [[ $parts == *" bench "* ]]; then
    for name in mixtral-8x7b mixtral-8x7b-q4; do
        echo "== $name"
        python3 -m mistral_compile -q bench "dist-gpu/$name" --lib "dist-gpu/$name/lib.so" \
            --device cuda --random-weights --contexts 1024,4096 --prefill-chunks 2048 \
            --json "$OUT/bench-$name.json" 2>&1 | grep -v "loading weights" | tee "$OUT/bench-$name.log"
    done
fi
if [[ $parts == *" peer "* ]]; then
    echo "== HF peer on mixtral-8x7b-v0.1.json"
    python3 benchmarks/hf_baseline.py --config configs/mixtral-8x7b-v0.1.json --contexts 1024 \
        --steps 16 --json "$OUT/peer-mixtral-8x7b.json" 2>&1 | tee "$OUT/peer-mixtral-8x7b.log"
fi
exit $failed
