#!/usr/bin/env bash
# On a machine of several GPUs (carry what `prepare.py --tp` built: dist-gpu/{wheels-core,
# 7b-full,7b-full-tp2,...}): tensor-parallel scaling (issue 22). Batch-1 decode at 1k and a
# 4096-token prefill of each library, and the batched decode step at 64 sequences for the 7B
# ones, random weights made by each shard on its own GPU. Results in $OUT/tp.tgz (a device call
# returns 8 files). The shards of a library take GPUs 0..N-1; a library of more shards than
# there are GPUs still runs, its shards sharing GPUs through gloo (a check of the path, not a
# figure). NVLink multicast stays off (runtime/shards.py sets NO_MULTICAST; set here as well).
#   [DIST=dist-gpu] [TP="7b-full 7b-full-tp2"] [BATCH=64, empty: none] scripts/gpu/tp.sh
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
DIST="${DIST:-dist-gpu}"
WHEELS="${WHEELS:-$DIST/wheels-core}" source scripts/gpu/setup.sh
RES="$(mktemp -d)"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$RES/gpus.txt"
for name in ${TP:-7b-full 7b-full-tp2 7b-full-tp4 codestral-22b-tp2 small-24b-tp2 large-123b-tp4 large-123b-tp8}; do
    [[ -d "$DIST/$name" ]] || { echo "== $name: not carried"; continue; }
    echo "== $name"
    python3 -m mistral_compile -q bench "$DIST/$name" --lib "$DIST/$name/lib.so" \
        --device cuda --random-weights --contexts 1024 --prefill-chunks 4096 \
        --json "$RES/tp-$name.json" 2>&1 | grep -v "loading weights" | tee "$RES/tp-$name.log"
    if [[ $name == 7b-* && -n "${BATCH-64}" ]]; then
        python3 -m mistral_compile -q bench "$DIST/$name" --lib "$DIST/$name/lib.so" \
            --device cuda --random-weights --batch "${BATCH-64}" \
            --json "$RES/tp-$name-batch.json" 2>&1 | grep -v "loading weights" \
            | tee "$RES/tp-$name-batch.log"
    fi
done
tar czf "$OUT/tp.tgz" -C "$RES" .
