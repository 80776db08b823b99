#!/usr/bin/env bash
# On the GPU machine: bench's batch-1 decode of several libraries in turn, ROUNDS times over, so
# that clock and power drifts fall on all of them alike (A B C A B C). Each argument is a model
# directory holding mistral-config.json and lib.so. Logs and JSON in $OUT/ab.tgz only (a device
# call returns 8 files).
#   [ROUNDS=2] [CONTEXTS=1024] [PREFILL=4096] [WHEELS=dist-gpu/wheels-core] scripts/gpu/ab.sh DIR...
set -euo pipefail
WHEELS="${WHEELS:-dist-gpu/wheels-core}" source scripts/gpu/setup.sh
AB="$(mktemp -d)"
for round in $(seq "${ROUNDS:-2}"); do
    for dir in "$@"; do
        name="$(basename "$dir")"
        echo "== round $round: $dir"
        python3 -m mistral_compile -q bench "$dir" --lib "$dir/lib.so" --device cuda \
            --random-weights --contexts "${CONTEXTS:-1024}" --prefill-chunks "${PREFILL:-4096}" \
            --json "$AB/ab-$name-$round.json" 2>&1 | grep -v "loading weights" \
            | tee "$AB/ab-$name-$round.log"
    done
done
tar czf "$OUT/ab.tgz" -C "$AB" .
