#!/usr/bin/env bash
# On the GPU machine (carry dist-gpu/{wheels,7b-full,prepared.json} from `prepare.py --batch`;
# the wheels include the server's, see CARRIED there):
# the server on the Mistral-7B shape (random weights made on the device) driven by
# benchmarks/serve_load.py, and `bench --throughput` on the same workload's means, in one call.
#   CONCURRENCY=64 REQUESTS=512 IN=512 OUT=128 scripts/gpu/serve_load.sh
set -euo pipefail
source scripts/gpu/setup.sh
MODEL=dist-gpu/7b-full
python3 -m mistral_compile -q serve "$MODEL" --lib "$MODEL/lib.so" --device cuda --random-weights \
    --port 8000 --max-batch-size "${CONCURRENCY:-64}" > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 600); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 0.5; done
python3 benchmarks/serve_load.py --requests "${REQUESTS:-512}" --concurrency "${CONCURRENCY:-64}" \
    --prompt-tokens "${IN:-512}" --output-tokens "${OUT_TOKENS:-128}" --spread 0 \
    --json "$OUT/serve-load.json" | tee "$OUT/serve-load.log"
kill $server
python3 -m mistral_compile -q bench "$MODEL" --lib "$MODEL/lib.so" --device cuda --random-weights \
    --max-batch-size "${CONCURRENCY:-64}" \
    --throughput "${REQUESTS:-512}:${IN:-512}:${OUT_TOKENS:-128}" \
    --json "$OUT/serve-load-bench.json" 2>&1 | grep -v "loading weights" | tee -a "$OUT/serve-load.log"
