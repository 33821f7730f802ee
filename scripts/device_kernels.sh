#!/usr/bin/env bash
# Device check of the top-k / statistics / IoU kernels, for the GPU machine after `bash .device/build.sh`
# has built build-gpu/: the kernel tests (CUDA cases against the CPU reference), the core suite's CUDA
# cases (probe, pipeline placement, chunked loss), compute-sanitizer
# memcheck + racecheck on a few small cases and on one batch with several rows per persistent block of
# the staged path, `sparsecl bench kernels` (bf16 1% = the H200 target, bf16 5% = the probe default, float32
# 1%; bf16 1% again with SPARSECL_TOPK_VPT=16, the other register tier, to choose the default; each run
# also times the staged path, TopkPath::kStaged; bf16 1% twice more with SPARSECL_TOPK_STAGED_THREADS=256
# and 384 against the default 512) and Nsight Compute summaries of the fast and the staged top-k kernel.
# Logs go to $OUT (default /tmp/device_kernels-out). About 3.5 minutes (at most 12.5 by the per-step timeouts).
#   usage: bash scripts/device_kernels.sh [build-dir]
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-build-gpu}
OUT=${OUT:-/tmp/device_kernels-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
status=0
step() {  # step NAME TIMEOUT CMD...: run, tee to $OUT/NAME.log, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee "$OUT/$name.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc" | tee -a "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

step kernel_tests 100 "$B/tests/sparsecl_kernel_tests" --gtest_brief=1
# The core suite's GPU cases: the probe on CUDA vs the CPU, a cuda:0 + cpu pipeline split vs the CPU
# (two-GPU cases skip on one GPU), the chunked LM loss under bf16 autocast vs float32 on the CPU.
step core_cuda_tests 120 "$B/tests/sparsecl_tests" --gtest_brief=1 --gtest_filter='*Cuda*'

SMALL='Kernels/TopkCuda.MatchesCpuReference/*_5x100_*:Kernels/TopkCuda.MatchesCpuReference/*x4099_k_41_BFloat16_contiguous:'
SMALL+='Kernels/TopkCuda.MatchesCpuReference/*_19x4099_k_41_Float_colslice:Kernels/TopkCuda.MatchesCpuReference/*_23x4096_k_41_BFloat16_ties:'
SMALL+='Kernels/TopkCuda.MatchesCpuReference/*_23x4096_k_400_BFloat16_sample_high'
# the staged path's persistent blocks take 2-3 rows each here (double-buffer reuse, retried rows between
# settled ones); a step of its own for racecheck, whose slowdown on 1200 rows x 3 paths is not known
STAGED='Kernels/TopkCuda.MatchesCpuReference/*_1200x4096_k_400_BFloat16_mixed'
if command -v compute-sanitizer >/dev/null; then
  step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/tests/sparsecl_kernel_tests" \
    --gtest_brief=1 --gtest_filter="$SMALL:$STAGED:IouCuda.*:NeuronStatsCuda.*"
  step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 9 "$B/tests/sparsecl_kernel_tests" \
    --gtest_brief=1 --gtest_filter="$SMALL"
  step racecheck_staged 60 compute-sanitizer --tool racecheck --error-exitcode 9 "$B/tests/sparsecl_kernel_tests" \
    --gtest_brief=1 --gtest_filter="$STAGED"
fi

step bench_bf16_1pct 60 "$B/sparsecl" bench kernels
step bench_bf16_5pct 40 "$B/sparsecl" bench kernels --ratio 0.05 --iters 10
step bench_bf16_1pct_vpt16 40 env SPARSECL_TOPK_VPT=16 "$B/sparsecl" bench kernels --iters 10
step bench_f32_1pct 40 "$B/sparsecl" bench kernels --dtype float32 --rows 8192 --iters 10
step bench_bf16_1pct_staged256 40 env SPARSECL_TOPK_STAGED_THREADS=256 "$B/sparsecl" bench kernels --iters 10
step bench_bf16_1pct_staged384 40 env SPARSECL_TOPK_STAGED_THREADS=384 "$B/sparsecl" bench kernels --iters 10

if command -v ncu >/dev/null; then
  step ncu_topk 45 ncu --clock-control none --kernel-name regex:topk_abs_fast --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    "$B/sparsecl" bench kernels --iters 1
  step ncu_topk_staged 45 ncu --clock-control none --kernel-name regex:topk_abs_staged --launch-skip 1 \
    --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
    "$B/sparsecl" bench kernels --iters 1
fi

echo "device_kernels: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED), logs in $OUT"
exit $status
