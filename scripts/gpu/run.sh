#!/usr/bin/env bash
# Run the GPU test suite on the device machine (TVM runtime only), from the repo root:
#   scripts/gpu/run.sh [pytest args...]   (e.g. tests/gpu/test_batch_cuda.py, or -k mixtral)
# Needs dist-gpu/ from scripts/gpu/prepare.py (carried with the call). Log in $OUT/gpu-tests.log.
set -euo pipefail
source scripts/gpu/setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import tvm, os; print('tvm', tvm.__version__, 'compiler present:',
os.path.exists(os.path.join(os.path.dirname(tvm.__file__), 'lib', 'libtvm_compiler.so')))" \
    | tee -a "$OUT/gpu.txt"
# a test file or folder among the arguments is run alone; otherwise the whole of tests/gpu
where=(tests/gpu)
for arg in "$@"; do [[ $arg == tests/* ]] && where=(); done
python3 -m pytest -m gpu "${where[@]}" -s -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu-tests.log"
