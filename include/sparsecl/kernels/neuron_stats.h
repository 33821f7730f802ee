// Streaming per-neuron statistics over batches of tokens: sums of |h| and top-k membership counts,
// accumulated in place on h's device (nothing goes to the host), for mean_abs and freq in the probe.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <optional>

namespace sparsecl::kernels {

// h: [N, I] float32 | bfloat16 | float16, any strides; 1 <= k <= I (top-k order as in topk.h).
// sum_abs: [I] float64 | float32, contiguous, in/out: sum_abs[j] += sum over kept tokens of |h[t, j]|.
// topk_count: [I] int64, contiguous, in/out: topk_count[j] += number of kept tokens whose top-k has j.
// token_mask: optional bool [N]; tokens where it is false are skipped (padding, prompt tokens...).
// NaN in h propagates into sum_abs (and ranks above +inf for the counts).
// On CUDA the per-column sums are added with atomics: the last bits of sum_abs may differ run to run.
void accumulate_neuron_stats(const torch::Tensor& h, int64_t k, torch::Tensor& sum_abs,
                             torch::Tensor& topk_count,
                             const std::optional<torch::Tensor>& token_mask = std::nullopt);
void accumulate_neuron_stats_cpu(const torch::Tensor& h, int64_t k, torch::Tensor& sum_abs,
                                 torch::Tensor& topk_count,
                                 const std::optional<torch::Tensor>& token_mask = std::nullopt);

#ifdef SPARSECL_WITH_CUDA
void accumulate_neuron_stats_cuda(const torch::Tensor& h, int64_t k, torch::Tensor& sum_abs,
                                  torch::Tensor& topk_count,
                                  const std::optional<torch::Tensor>& token_mask = std::nullopt);
#endif

}  // namespace sparsecl::kernels
