#!/usr/bin/env bash
# On the GPU machine (carry dist-gpu/{wheels,7b-full,prepared.json} from `prepare.py --batch`;
# the wheels include the server's, see CARRIED there): the server on the Mistral-7B shape (random
# weights made on the device) driven by benchmarks/serve_load.py with the two workloads of issue
# 19's targets, then `bench --throughput` on the first workload, in one call:
#   A: CONCURRENCY streams (default 64), REQUESTS requests of IN prompt and OUT_TOKENS output
#      tokens (512, 512, 128): output tok/s against bench --throughput on the same workload;
#   B: 16 streams of 1024-token prompts (TTFT_REQUESTS requests, 64): time to first token.
#   [ENGINES="process thread"] CONCURRENCY=64 REQUESTS=512 IN=512 OUT_TOKENS=128 scripts/gpu/serve_load.sh
# (ENGINES: the server's engine in its own process, the default, and/or on a thread of the
# server's process; B runs with the first)
set -euo pipefail
source scripts/gpu/setup.sh
MODEL=dist-gpu/7b-full
first=1
for engine in ${ENGINES:-process}; do  # process: the engine in its own process; thread: --engine-thread
flags=(); [[ $engine == thread ]] && flags=(--engine-thread)
python3 -m mistral_compile -q serve "$MODEL" --lib "$MODEL/lib.so" --device cuda --random-weights \
    --port 8000 --max-batch-size "${CONCURRENCY:-64}" "${flags[@]}" > "$OUT/serve-$engine.log" 2>&1 &
server=$!
for _ in $(seq 600); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 0.5; done
echo "== A ($engine engine): ${CONCURRENCY:-64} streams, ${IN:-512}:${OUT_TOKENS:-128}" | tee -a "$OUT/serve-load.log"
python3 benchmarks/serve_load.py --requests "${REQUESTS:-512}" --concurrency "${CONCURRENCY:-64}" \
    --prompt-tokens "${IN:-512}" --output-tokens "${OUT_TOKENS:-128}" --spread 0 \
    --json "$OUT/serve-load-$engine.json" | tee -a "$OUT/serve-load.log"
if [[ -n $first ]]; then
echo "== B ($engine engine): 16 streams, 1024:128" | tee -a "$OUT/serve-load.log"
python3 benchmarks/serve_load.py --requests "${TTFT_REQUESTS:-64}" --concurrency 16 \
    --prompt-tokens 1024 --output-tokens 128 --spread 0 --seed 1 \
    --json "$OUT/serve-load-ttft.json" | tee -a "$OUT/serve-load.log"
echo "== B' ($engine engine): 16 streams, 1024:128, lengths spread 0.5 (arrivals desynchronise)" | tee -a "$OUT/serve-load.log"
python3 benchmarks/serve_load.py --requests "${TTFT_REQUESTS:-64}" --concurrency 16 \
    --prompt-tokens 1024 --output-tokens 128 --spread 0.5 --seed 1 \
    --json "$OUT/serve-load-ttft-spread.json" | tee -a "$OUT/serve-load.log"
curl -s http://127.0.0.1:8000/metrics | grep -E "^mistral_compile_(preemptions|prefix|kv)" \
    | tee -a "$OUT/serve-load.log" || true
fi
first=
kill $server
wait $server || true
done
echo "== bench --throughput on A's workload" | tee -a "$OUT/serve-load.log"
python3 -m mistral_compile -q bench "$MODEL" --lib "$MODEL/lib.so" --device cuda --random-weights \
    --max-batch-size "${CONCURRENCY:-64}" \
    --throughput "${REQUESTS:-512}:${IN:-512}:${OUT_TOKENS:-128}" \
    --json "$OUT/serve-load-bench.json" 2>&1 | grep -v "loading weights" | tee -a "$OUT/serve-load.log"
