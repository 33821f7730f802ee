// Per-neuron statistics for one batch of tokens: the CPU reference (float64 column sums of |h| and
// top-k membership counts from the top-k reference), the CUDA path (the top-k kernel's counts output
// plus a column-sum kernel, all on the device) and the device dispatch.
#include "sparsecl/kernels/neuron_stats.h"

#include <ATen/Parallel.h>

#include <vector>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/detail.h"

#ifdef SPARSECL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sparsecl::kernels {

namespace {

constexpr const char* kOp = "accumulate_neuron_stats";

void check_stats_args(const torch::Tensor& h, int64_t k, const torch::Tensor& sum_abs,
                      const torch::Tensor& topk_count, const std::optional<torch::Tensor>& token_mask) {
  detail::check_activations(h, k, kOp);
  const int64_t rows = h.size(0), cols = h.size(1);
  if (!sum_abs.defined() || sum_abs.dim() != 1 || sum_abs.size(0) != cols ||
      (sum_abs.scalar_type() != torch::kDouble && sum_abs.scalar_type() != torch::kFloat))
    throw Error(std::string(kOp) + ": sum_abs must be float64 or float32 [I] = [" + std::to_string(cols) +
                "], got " + (sum_abs.defined() ? detail::shape_str(sum_abs) : "undefined"));
  if (!topk_count.defined() || topk_count.dim() != 1 || topk_count.size(0) != cols ||
      topk_count.scalar_type() != torch::kLong)
    throw Error(std::string(kOp) + ": topk_count must be int64 [I] = [" + std::to_string(cols) + "], got " +
                (topk_count.defined() ? detail::shape_str(topk_count) : "undefined"));
  if (token_mask && (!token_mask->defined() || token_mask->dim() != 1 || token_mask->size(0) != rows ||
                     token_mask->scalar_type() != torch::kBool))
    throw Error(std::string(kOp) + ": token_mask must be bool [N] = [" + std::to_string(rows) + "], got " +
                (token_mask->defined() ? detail::shape_str(*token_mask) : "undefined"));
}

}  // namespace

void accumulate_neuron_stats_cpu(const torch::Tensor& h, int64_t k, torch::Tensor& sum_abs,
                                 torch::Tensor& topk_count, const std::optional<torch::Tensor>& token_mask) {
  check_stats_args(h, k, sum_abs, topk_count, token_mask);
  const int64_t rows = h.size(0), cols = h.size(1);
  auto hf = h.to(torch::kCPU, torch::kFloat).contiguous();  // [N, I]
  std::vector<uint8_t> keep(static_cast<size_t>(rows), 1);
  if (token_mask) {
    auto m = token_mask->to(torch::kCPU).contiguous();
    const bool* mp = m.data_ptr<bool>();
    for (int64_t r = 0; r < rows; ++r) keep[r] = mp[r] ? 1 : 0;
  }
  auto idx = torch::empty({rows, k}, torch::kInt);  // [N, k]
  detail::topk_abs_rows_cpu(hf, k, idx.data_ptr<int32_t>());

  auto sums = torch::zeros({cols}, torch::kDouble);  // [I]
  auto counts = torch::zeros({cols}, torch::kLong);  // [I]
  const float* x = hf.data_ptr<float>();
  double* s = sums.data_ptr<double>();
  at::parallel_for(0, cols, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < rows; ++r) {
      if (!keep[r]) continue;
      const float* xr = x + r * cols;
      for (int64_t j = begin; j < end; ++j) s[j] += std::fabs(static_cast<double>(xr[j]));
    }
  });
  int64_t* c = counts.data_ptr<int64_t>();
  const int32_t* ip = idx.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    if (!keep[r]) continue;
    for (int64_t i = 0; i < k; ++i) ++c[ip[r * k + i]];
  }
  sum_abs.add_(sums.to(sum_abs.device(), sum_abs.scalar_type()));
  topk_count.add_(counts.to(topk_count.device()));
}

#ifdef SPARSECL_WITH_CUDA
void accumulate_neuron_stats_cuda(const torch::Tensor& h_in, int64_t k, torch::Tensor& sum_abs,
                                  torch::Tensor& topk_count, const std::optional<torch::Tensor>& token_mask) {
  check_stats_args(h_in, k, sum_abs, topk_count, token_mask);
  auto same_device = [&](const torch::Tensor& t, const char* name) {
    if (t.device() != h_in.device())
      throw Error(std::string(kOp) + ": " + name + " is on " + t.device().str() + ", h on " +
                  h_in.device().str());
    if (!t.is_contiguous()) throw Error(std::string(kOp) + ": " + name + " must be contiguous");
  };
  if (!h_in.is_cuda()) throw Error(std::string(kOp) + ": h must be a CUDA tensor, got " + h_in.device().str());
  same_device(sum_abs, "sum_abs");
  same_device(topk_count, "topk_count");
  if (token_mask) same_device(*token_mask, "token_mask");

  const torch::Tensor h = (h_in.size(1) == 1 || h_in.stride(1) == 1) ? h_in : h_in.contiguous();
  c10::cuda::CUDAGuard guard(h.device());
  const bool* mask = token_mask ? token_mask->data_ptr<bool>() : nullptr;
  detail::topk_abs_counts_cuda(h, k, topk_count.data_ptr<int64_t>(), mask);

  detail::ColAbsSumLaunch a;
  a.h = h.data_ptr();
  a.rows = h.size(0);
  a.cols = h.size(1);
  a.row_stride = h.size(0) == 1 ? 0 : h.stride(0);
  a.kind = h.scalar_type() == torch::kBFloat16 ? detail::ScalarKind::bf16
           : h.scalar_type() == torch::kHalf   ? detail::ScalarKind::f16
                                               : detail::ScalarKind::f32;
  a.row_mask = mask;
  a.out = sum_abs.data_ptr();
  a.out_is_double = sum_abs.scalar_type() == torch::kDouble;
  detail::launch_col_abs_sum(a, c10::cuda::getCurrentCUDAStream(h.device().index()).stream());
}
#endif

void accumulate_neuron_stats(const torch::Tensor& h, int64_t k, torch::Tensor& sum_abs,
                             torch::Tensor& topk_count, const std::optional<torch::Tensor>& token_mask) {
  if (h.defined() && h.is_cuda()) {
#ifdef SPARSECL_WITH_CUDA
    accumulate_neuron_stats_cuda(h, k, sum_abs, topk_count, token_mask);
    return;
#else
    throw Error(std::string(kOp) + ": h is on " + h.device().str() +
                " but this sparsecl was built without CUDA kernels");
#endif
  }
  accumulate_neuron_stats_cpu(h, k, sum_abs, topk_count, token_mask);
}

}  // namespace sparsecl::kernels
