// CUDA set-overlap kernels on bitsets (uint64 words): pair IoU (one warp per pair, popcount of AND and
// OR), all-pairs intersection counts (64x64 output tiles, 16-word stages in shared memory, 4x4 outputs
// per thread, popcount of AND), and index lists -> bitsets (atomicOr).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/detail.h"

namespace sparsecl::kernels::detail {
namespace {

constexpr unsigned kFull = 0xffffffffu;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

// a, b: [pairs, words]; out: [pairs]. One warp per pair.
__global__ void pair_iou_kernel(const unsigned long long* a, int64_t stride_a,
                                const unsigned long long* b, int64_t stride_b, int64_t pairs,
                                int64_t words, float* out) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (pair >= pairs) return;  // uniform per warp
  const unsigned long long* ra = a + pair * stride_a;
  const unsigned long long* rb = b + pair * stride_b;
  int inter = 0, uni = 0;
  for (int64_t w = lane; w < words; w += 32) {
    const unsigned long long x = __ldg(ra + w), y = __ldg(rb + w);
    inter += __popcll(x & y);
    uni += __popcll(x | y);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    inter += __shfl_xor_sync(kFull, inter, o);
    uni += __shfl_xor_sync(kFull, uni, o);
  }
  if (lane == 0) out[pair] = uni > 0 ? static_cast<float>(inter) / static_cast<float>(uni) : 0.f;
}

constexpr int kTile = 64, kStage = 16;

// x: [n, words], y: [m, words]; out: [n, m] int32. Block (16, 16) computes a 64x64 tile; thread
// (tx, ty) owns rows ty + 16 i and columns tx + 16 j (i, j < 4): conflict-free shared-memory reads.
__global__ void __launch_bounds__(256) intersection_counts_kernel(
    const unsigned long long* x, int64_t stride_x, int64_t n, const unsigned long long* y,
    int64_t stride_y, int64_t m, int64_t words, int32_t* out) {
  __shared__ unsigned long long xs[kStage][kTile];
  __shared__ unsigned long long ys[kStage][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile, m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  int acc[4][4] = {};
  for (int64_t w0 = 0; w0 < words; w0 += kStage) {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int lin = tid + 256 * l, r = lin / kStage, w = lin % kStage;
      const bool wok = w0 + w < words;
      xs[w][r] = (wok && n0 + r < n) ? __ldg(x + (n0 + r) * stride_x + w0 + w) : 0ull;
      ys[w][r] = (wok && m0 + r < m) ? __ldg(y + (m0 + r) * stride_y + w0 + w) : 0ull;
    }
    __syncthreads();
#pragma unroll
    for (int kw = 0; kw < kStage; ++kw) {
      unsigned long long xa[4], yb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xa[i] = xs[kw][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) yb[j] = ys[kw][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += __popcll(xa[i] & yb[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = n0 + ty + 16 * i;
    if (r >= n) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = m0 + tx + 16 * j;
      if (c < m) out[r * m + c] = acc[i][j];
    }
  }
}

// indices: [rows, k]; out: [rows, words], zeroed. One thread per index.
template <class Index>
__global__ void indices_to_bitset_kernel(const Index* indices, int64_t rows, int64_t k, int64_t words,
                                         unsigned long long* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * k) return;
  const int64_t row = i / k;
  const int64_t j = static_cast<int64_t>(indices[i]);
  atomicOr(out + row * words + (j >> 6), 1ull << (j & 63));
}

}  // namespace

void launch_pair_iou(const uint64_t* a, int64_t stride_a, const uint64_t* b, int64_t stride_b,
                     int64_t pairs, int64_t words, float* out, void* stream) {
  if (pairs == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (pairs * 32 + kThreads - 1) / kThreads;
  pair_iou_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const unsigned long long*>(a), stride_a,
      reinterpret_cast<const unsigned long long*>(b), stride_b, pairs, words, out);
  check_cuda(cudaGetLastError(), "pair_iou launch");
}

void launch_intersection_counts(const uint64_t* x, int64_t stride_x, int64_t n, const uint64_t* y,
                                int64_t stride_y, int64_t m, int64_t words, int32_t* out, void* stream) {
  if (n == 0 || m == 0) return;
  const dim3 grid(static_cast<unsigned>((m + kTile - 1) / kTile), static_cast<unsigned>((n + kTile - 1) / kTile));
  if (grid.y > 65535) throw Error("intersection_counts: bits_x has too many rows: " + std::to_string(n));
  intersection_counts_kernel<<<grid, dim3(16, 16), 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const unsigned long long*>(x), stride_x, n,
      reinterpret_cast<const unsigned long long*>(y), stride_y, m, words, out);
  check_cuda(cudaGetLastError(), "intersection_counts launch");
}

void launch_indices_to_bitset(const void* indices, bool is64, int64_t rows, int64_t k, int64_t words,
                              uint64_t* out, void* stream) {
  const int64_t total = rows * k;
  if (total == 0) return;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  auto* o = reinterpret_cast<unsigned long long*>(out);
  auto s = static_cast<cudaStream_t>(stream);
  if (is64) {
    indices_to_bitset_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const int64_t*>(indices), rows, k, words, o);
  } else {
    indices_to_bitset_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const int32_t*>(indices), rows, k, words, o);
  }
  check_cuda(cudaGetLastError(), "indices_to_bitset launch");
}

}  // namespace sparsecl::kernels::detail
