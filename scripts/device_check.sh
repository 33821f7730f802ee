#!/usr/bin/env bash
# The whole GPU-machine check in one call (device time is scarce): build with the carried packages
# (.device/build.sh), the decoder on CUDA against the HF references (scripts/device_model_check.py),
# then the kernel tests, sanitizers and benchmark (scripts/device_kernels.sh). Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
start=$(date +%s)
bash .device/build.sh -DSPARSECL_BUILD_TESTS=ON >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
export LD_LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 scripts/device_model_check.py build-gpu/sparsecl 2>&1 | tee "$OUT/model_check.log"
OUT=$OUT bash scripts/device_kernels.sh build-gpu
echo "total: $(( $(date +%s) - start )) s"
