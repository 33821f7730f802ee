// CUDA column sums of |h| for the per-neuron statistics (the top-k counts come from topk.cu's kernel
// with its `counts` output): each thread owns one column and a chunk of rows, sums in float32, then
// adds the chunk's partial sum to the float64/float32 accumulator with one atomic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/detail.h"

namespace sparsecl::kernels::detail {
namespace {

struct LoadF32 {
  using Scalar = float;
  __device__ static float get(const float* p) { return __ldg(p); }
};
struct LoadBf16 {
  using Scalar = uint16_t;
  __device__ static float get(const uint16_t* p) { return __uint_as_float(static_cast<uint32_t>(__ldg(p)) << 16); }
};
struct LoadF16 {
  using Scalar = uint16_t;
  __device__ static float get(const uint16_t* p) { return __half2float(__ushort_as_half(__ldg(p))); }
};

// h: [rows, cols] (inner stride 1); out: [cols] (+=). Grid: (ceil(cols / blockDim), row chunks).
template <class L, class Acc>
__global__ void col_abs_sum_kernel(const typename L::Scalar* h, int64_t rows, int64_t cols,
                                   int64_t row_stride, const bool* row_mask, int64_t rows_per_chunk,
                                   Acc* out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = min(rows, r0 + rows_per_chunk);
  float acc = 0.f;
#pragma unroll 4
  for (int64_t r = r0; r < r1; ++r) {
    if (row_mask != nullptr && !row_mask[r]) continue;
    acc += fabsf(L::get(h + r * row_stride + col));
  }
  atomicAdd(out + col, static_cast<Acc>(acc));
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

template <class L>
void launch_kind(const ColAbsSumLaunch& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t chunk = std::max<int64_t>(128, (a.rows + 65534) / 65535);
  const dim3 grid(static_cast<unsigned>((a.cols + kThreads - 1) / kThreads),
                  static_cast<unsigned>((a.rows + chunk - 1) / chunk));
  const auto* h = static_cast<const typename L::Scalar*>(a.h);
  if (a.out_is_double) {
    col_abs_sum_kernel<L, double><<<grid, kThreads, 0, stream>>>(
        h, a.rows, a.cols, a.row_stride, a.row_mask, chunk, static_cast<double*>(a.out));
  } else {
    col_abs_sum_kernel<L, float><<<grid, kThreads, 0, stream>>>(
        h, a.rows, a.cols, a.row_stride, a.row_mask, chunk, static_cast<float*>(a.out));
  }
  check_cuda(cudaGetLastError(), "col_abs_sum launch");
}

}  // namespace

void launch_col_abs_sum(const ColAbsSumLaunch& args, void* stream) {
  if (args.rows == 0 || args.cols == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.kind) {
    case ScalarKind::f32: launch_kind<LoadF32>(args, s); break;
    case ScalarKind::bf16: launch_kind<LoadBf16>(args, s); break;
    case ScalarKind::f16: launch_kind<LoadF16>(args, s); break;
  }
}

}  // namespace sparsecl::kernels::detail
