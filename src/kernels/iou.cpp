// Set overlap on bitsets: CPU references (std::popcount loops), CUDA entry points and device dispatch
// for pair IoU, all-pairs intersection counts and index lists -> bitsets; set_iou for two sets.
#include "sparsecl/kernels/iou.h"

#include <ATen/Parallel.h>

#include <bit>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/detail.h"

#ifdef SPARSECL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sparsecl::kernels {

namespace {

void check_pair(const torch::Tensor& a, const torch::Tensor& b, const char* na, const char* nb,
                const char* op, bool same_rows) {
  detail::check_bitset(a, 2, na, op);
  detail::check_bitset(b, 2, nb, op);
  if (a.size(1) != b.size(1) || (same_rows && a.size(0) != b.size(0)))
    throw Error(std::string(op) + ": " + na + " " + detail::shape_str(a) + " and " + nb + " " +
                detail::shape_str(b) + " do not match");
  if (a.device() != b.device())
    throw Error(std::string(op) + ": " + na + " is on " + a.device().str() + ", " + nb + " on " +
                b.device().str());
}

void check_indices(const torch::Tensor& indices, int64_t num_neurons, const char* op) {
  if (!indices.defined() || indices.dim() != 2 ||
      (indices.scalar_type() != torch::kInt && indices.scalar_type() != torch::kLong))
    throw Error(std::string(op) + ": indices must be int32 or int64 [P, K], got " +
                (indices.defined() ? detail::shape_str(indices) : "undefined"));
  if (num_neurons < 1) throw Error(std::string(op) + ": num_neurons must be >= 1, got " + std::to_string(num_neurons));
  if (indices.numel() > 0) {
    const int64_t lo = indices.min().item<int64_t>(), hi = indices.max().item<int64_t>();
    if (lo < 0 || hi >= num_neurons)
      throw Error(std::string(op) + ": indices must be in [0, " + std::to_string(num_neurons) + "), got [" +
                  std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
}

const uint64_t* words_of(const torch::Tensor& t) { return reinterpret_cast<const uint64_t*>(t.data_ptr<int64_t>()); }

#ifndef SPARSECL_WITH_CUDA
[[noreturn]] void no_cuda(const char* op, const torch::Tensor& t) {
  throw Error(std::string(op) + ": input is on " + t.device().str() +
              " but this sparsecl was built without CUDA kernels");
}
#endif

}  // namespace

// ---- CPU references -------------------------------------------------------------------------------
torch::Tensor pair_iou_cpu(const torch::Tensor& bits_a, const torch::Tensor& bits_b) {
  check_pair(bits_a, bits_b, "bits_a", "bits_b", "pair_iou", true);
  auto a = bits_a.cpu().contiguous(), b = bits_b.cpu().contiguous();  // [P, W]
  const int64_t pairs = a.size(0), words = a.size(1);
  auto out = torch::empty({pairs}, torch::kFloat);  // [P]
  const uint64_t *pa = words_of(a), *pb = words_of(b);
  float* o = out.data_ptr<float>();
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t inter = 0, uni = 0;
    for (int64_t w = 0; w < words; ++w) {
      inter += std::popcount(pa[p * words + w] & pb[p * words + w]);
      uni += std::popcount(pa[p * words + w] | pb[p * words + w]);
    }
    o[p] = uni > 0 ? static_cast<float>(inter) / static_cast<float>(uni) : 0.f;
  }
  return out;
}

torch::Tensor intersection_counts_cpu(const torch::Tensor& bits_x, const torch::Tensor& bits_y) {
  check_pair(bits_x, bits_y, "bits_x", "bits_y", "intersection_counts", false);
  auto x = bits_x.cpu().contiguous(), y = bits_y.cpu().contiguous();  // [N, W], [M, W]
  const int64_t n = x.size(0), m = y.size(0), words = x.size(1);
  auto out = torch::empty({n, m}, torch::kInt);  // [N, M]
  const uint64_t *px = words_of(x), *py = words_of(y);
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < m; ++j) {
        int32_t c = 0;
        for (int64_t w = 0; w < words; ++w) c += std::popcount(px[i * words + w] & py[j * words + w]);
        o[i * m + j] = c;
      }
  });
  return out;
}

torch::Tensor indices_to_bitset_cpu(const torch::Tensor& indices, int64_t num_neurons) {
  check_indices(indices, num_neurons, "indices_to_bitset");
  auto idx = indices.to(torch::kCPU, torch::kLong).contiguous();  // [P, K]
  const int64_t rows = idx.size(0), k = idx.size(1), words = (num_neurons + 63) / 64;
  auto out = torch::zeros({rows, words}, torch::kLong);  // [P, W]
  const int64_t* in = idx.data_ptr<int64_t>();
  auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i) {
      const int64_t j = in[r * k + i];
      o[r * words + j / 64] |= uint64_t{1} << (j % 64);
    }
  return out;
}

// ---- CUDA -----------------------------------------------------------------------------------------
#ifdef SPARSECL_WITH_CUDA
namespace {
// Row-major view with inner stride 1 (copies otherwise); the row stride is returned in *stride.
torch::Tensor rows_view(const torch::Tensor& t, int64_t* stride) {
  torch::Tensor v = (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
  *stride = v.size(0) <= 1 ? v.size(1) : v.stride(0);
  return v;
}
void* stream_of(const torch::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
}  // namespace

torch::Tensor pair_iou_cuda(const torch::Tensor& bits_a, const torch::Tensor& bits_b) {
  check_pair(bits_a, bits_b, "bits_a", "bits_b", "pair_iou", true);
  if (!bits_a.is_cuda()) throw Error("pair_iou: bits_a must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(bits_a.device());
  int64_t sa, sb;
  auto a = rows_view(bits_a, &sa), b = rows_view(bits_b, &sb);
  auto out = torch::empty({a.size(0)}, a.options().dtype(torch::kFloat));  // [P]
  detail::launch_pair_iou(words_of(a), sa, words_of(b), sb, a.size(0), a.size(1), out.data_ptr<float>(),
                          stream_of(a));
  return out;
}

torch::Tensor intersection_counts_cuda(const torch::Tensor& bits_x, const torch::Tensor& bits_y) {
  check_pair(bits_x, bits_y, "bits_x", "bits_y", "intersection_counts", false);
  if (!bits_x.is_cuda()) throw Error("intersection_counts: bits_x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(bits_x.device());
  int64_t sx, sy;
  auto x = rows_view(bits_x, &sx), y = rows_view(bits_y, &sy);
  auto out = torch::empty({x.size(0), y.size(0)}, x.options().dtype(torch::kInt));  // [N, M]
  detail::launch_intersection_counts(words_of(x), sx, x.size(0), words_of(y), sy, y.size(0), x.size(1),
                                     out.data_ptr<int32_t>(), stream_of(x));
  return out;
}

torch::Tensor indices_to_bitset_cuda(const torch::Tensor& indices, int64_t num_neurons) {
  check_indices(indices, num_neurons, "indices_to_bitset");
  if (!indices.is_cuda()) throw Error("indices_to_bitset: indices must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(indices.device());
  auto idx = indices.contiguous();  // [P, K]
  const int64_t words = (num_neurons + 63) / 64;
  auto out = torch::zeros({idx.size(0), words}, idx.options().dtype(torch::kLong));  // [P, W]
  detail::launch_indices_to_bitset(idx.data_ptr(), idx.scalar_type() == torch::kLong, idx.size(0), idx.size(1),
                                   words, reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()), stream_of(idx));
  return out;
}
#endif

// ---- dispatch -------------------------------------------------------------------------------------
torch::Tensor pair_iou(const torch::Tensor& bits_a, const torch::Tensor& bits_b) {
  if (bits_a.defined() && bits_a.is_cuda()) {
#ifdef SPARSECL_WITH_CUDA
    return pair_iou_cuda(bits_a, bits_b);
#else
    no_cuda("pair_iou", bits_a);
#endif
  }
  return pair_iou_cpu(bits_a, bits_b);
}

torch::Tensor intersection_counts(const torch::Tensor& bits_x, const torch::Tensor& bits_y) {
  if (bits_x.defined() && bits_x.is_cuda()) {
#ifdef SPARSECL_WITH_CUDA
    return intersection_counts_cuda(bits_x, bits_y);
#else
    no_cuda("intersection_counts", bits_x);
#endif
  }
  return intersection_counts_cpu(bits_x, bits_y);
}

torch::Tensor indices_to_bitset(const torch::Tensor& indices, int64_t num_neurons) {
  if (indices.defined() && indices.is_cuda()) {
#ifdef SPARSECL_WITH_CUDA
    return indices_to_bitset_cuda(indices, num_neurons);
#else
    no_cuda("indices_to_bitset", indices);
#endif
  }
  return indices_to_bitset_cpu(indices, num_neurons);
}

double set_iou(const torch::Tensor& bits_a, const torch::Tensor& bits_b) {
  detail::check_bitset(bits_a, 1, "bits_a", "set_iou");
  detail::check_bitset(bits_b, 1, "bits_b", "set_iou");
  return pair_iou(bits_a.unsqueeze(0), bits_b.unsqueeze(0)).item<double>();
}

}  // namespace sparsecl::kernels
