#!/usr/bin/env bash
# Sets up (scripts/setup.sh: packages, venv, default model, build) and runs the whole test suite with
# ctest. Tests that need assets outside the repo (../shared) report themselves as skipped.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup.sh"
start=$(date +%s)
# ctest runs tests in parallel; one intra-op thread each avoids oversubscribing the cores (with two
# threads per test on 2 cores, LAPACK eigh and GEMMs slow down several-fold).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ctest --test-dir "${BUILD_DIR:-$repo/build}" --output-on-failure -j "${SPARSECL_TEST_JOBS:-2}" "$@"
echo "[test] ctest took $(( $(date +%s) - start )) s"
