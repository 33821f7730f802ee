// Top-k of |h| per row: the CPU reference (the k-th largest |h| by std::nth_element over order-preserving
// integer keys, then one pass in index order: (|h| desc, index asc), NaN above +inf), the CUDA entry points (argument checks, strides, stream) and the device dispatch.
#include "sparsecl/kernels/topk.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/detail.h"

#ifdef SPARSECL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sparsecl::kernels {

namespace detail {

// |v| as an unsigned key whose order is the ranking order: the IEEE-754 bits of a non-negative float
// grow with its value, and every NaN maps to the quiet NaN's bits, which lie above +inf's.
inline uint32_t magnitude_key(float v) {
  const float a = std::fabs(v);
  if (std::isnan(a)) return 0x7FC00000u;
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  return bits;
}

void topk_abs_rows_cpu(const at::Tensor& hf, int64_t k, int32_t* out) {
  const int64_t rows = hf.size(0), cols = hf.size(1);
  const float* data = hf.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(static_cast<size_t>(cols)), scratch(static_cast<size_t>(cols));
    for (int64_t r = begin; r < end; ++r) {
      const float* x = data + r * cols;
      for (int64_t j = 0; j < cols; ++j) keys[j] = magnitude_key(x[j]);
      // t = the k-th largest key: every key above t is in the set, and keys equal to t fill the rest,
      // lowest index first (the tie rule). One pass in index order emits them already sorted.
      scratch = keys;
      std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<uint32_t>());
      const uint32_t t = scratch[k - 1];
      int64_t equal_slots = k;
      for (int64_t j = 0; j < cols; ++j) equal_slots -= keys[j] > t;
      int32_t* o = out + r * k;
      for (int64_t j = 0; j < cols; ++j) {
        if (keys[j] > t || (keys[j] == t && equal_slots-- > 0)) *o++ = static_cast<int32_t>(j);
      }
    }
  });
}

}  // namespace detail

namespace {

// h -> float32 [N, I] contiguous on the CPU.
torch::Tensor cpu_float(const torch::Tensor& h) {
  return h.to(torch::kCPU, torch::kFloat).contiguous();
}

torch::Tensor bitset_from_indices_cpu(const torch::Tensor& idx /* int32 [N, k] */, int64_t cols) {
  const int64_t rows = idx.size(0), k = idx.size(1), words = (cols + 63) / 64;
  auto bits = torch::zeros({rows, words}, torch::kLong);
  const int32_t* in = idx.data_ptr<int32_t>();
  auto* out = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i) {
      const int64_t j = in[r * k + i];
      out[r * words + j / 64] |= uint64_t{1} << (j % 64);
    }
  return bits;
}

#ifndef SPARSECL_WITH_CUDA
[[noreturn]] void no_cuda(const char* op, const torch::Tensor& h) {
  throw Error(std::string(op) + ": h is on " + h.device().str() +
              " but this sparsecl was built without CUDA kernels");
}
#endif

}  // namespace

torch::Tensor topk_abs_indices_cpu(const torch::Tensor& h, int64_t k) {
  detail::check_activations(h, k, "topk_abs_indices");
  auto hf = cpu_float(h);
  auto out = torch::empty({h.size(0), k}, torch::kInt);
  detail::topk_abs_rows_cpu(hf, k, out.data_ptr<int32_t>());
  return out;
}

torch::Tensor topk_abs_bitset_cpu(const torch::Tensor& h, int64_t k) {
  detail::check_activations(h, k, "topk_abs_bitset");
  return bitset_from_indices_cpu(topk_abs_indices_cpu(h, k), h.size(1));
}

#ifdef SPARSECL_WITH_CUDA
namespace {

detail::ScalarKind scalar_kind(const torch::Tensor& h) {
  switch (h.scalar_type()) {
    case torch::kBFloat16: return detail::ScalarKind::bf16;
    case torch::kHalf: return detail::ScalarKind::f16;
    default: return detail::ScalarKind::f32;
  }
}

// Runs the kernel on h (CUDA) with the given outputs; h with inner stride != 1 is copied first.
void run_topk_cuda(const torch::Tensor& h_in, int64_t k, int32_t* indices, int64_t* bits,
                   int64_t* counts, const bool* row_mask, detail::TopkPath path) {
  const torch::Tensor h = (h_in.size(1) == 1 || h_in.stride(1) == 1) ? h_in : h_in.contiguous();
  c10::cuda::CUDAGuard guard(h.device());
  detail::TopkLaunch a;
  a.h = h.data_ptr();
  a.rows = h.size(0);
  a.cols = h.size(1);
  a.row_stride = h.size(0) == 1 ? 0 : h.stride(0);
  a.k = k;
  a.kind = scalar_kind(h);
  a.indices = indices;
  a.bits = bits;
  a.counts = counts;
  a.row_mask = row_mask;
  a.path = path;
  auto workspace = torch::empty({h.size(0) + 1}, h.options().dtype(torch::kInt));  // [N + 1]
  a.workspace = workspace.data_ptr<int32_t>();
  detail::launch_topk_abs(a, c10::cuda::getCurrentCUDAStream(h.device().index()).stream());
}

void require_cuda(const torch::Tensor& h, const char* op) {
  if (!h.is_cuda()) throw Error(std::string(op) + ": h must be a CUDA tensor, got " + h.device().str());
}

}  // namespace

void detail::topk_abs_counts_cuda(const at::Tensor& h, int64_t k, int64_t* counts, const bool* row_mask) {
  run_topk_cuda(h, k, nullptr, nullptr, counts, row_mask, detail::TopkPath::kAuto);
}

torch::Tensor topk_abs_indices_cuda(const torch::Tensor& h, int64_t k, detail::TopkPath path) {
  detail::check_activations(h, k, "topk_abs_indices");
  require_cuda(h, "topk_abs_indices");
  auto out = torch::empty({h.size(0), k}, h.options().dtype(torch::kInt));
  run_topk_cuda(h, k, out.data_ptr<int32_t>(), nullptr, nullptr, nullptr, path);
  return out;
}

torch::Tensor topk_abs_bitset_cuda(const torch::Tensor& h, int64_t k, detail::TopkPath path) {
  detail::check_activations(h, k, "topk_abs_bitset");
  require_cuda(h, "topk_abs_bitset");
  auto out = torch::empty({h.size(0), (h.size(1) + 63) / 64}, h.options().dtype(torch::kLong));
  run_topk_cuda(h, k, nullptr, out.data_ptr<int64_t>(), nullptr, nullptr, path);
  return out;
}
#endif

torch::Tensor topk_abs_indices(const torch::Tensor& h, int64_t k) {
  if (h.defined() && h.is_cuda()) {
#ifdef SPARSECL_WITH_CUDA
    return topk_abs_indices_cuda(h, k);
#else
    no_cuda("topk_abs_indices", h);
#endif
  }
  return topk_abs_indices_cpu(h, k);
}

torch::Tensor topk_abs_bitset(const torch::Tensor& h, int64_t k) {
  if (h.defined() && h.is_cuda()) {
#ifdef SPARSECL_WITH_CUDA
    return topk_abs_bitset_cuda(h, k);
#else
    no_cuda("topk_abs_bitset", h);
#endif
  }
  return topk_abs_bitset_cpu(h, k);
}

}  // namespace sparsecl::kernels
