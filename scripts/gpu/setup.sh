# Sourced by run.sh and bench.sh on the GPU machine: install the carried wheels (runtime-only TVM,
# mistral-common, ...; WHEELS=dist-gpu/wheels-core for TVM alone) into /tmp/site and put them and the repo on PYTHONPATH; $OUT for results.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${WHEELS:-dist-gpu/wheels}"/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
