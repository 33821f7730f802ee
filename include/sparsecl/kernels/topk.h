// Per-token top-k of |h| over the intermediate dimension, as sorted index lists or as bitsets.
//
// Order (fixed, so that CPU and CUDA select the same set, ties included): larger |h| first; equal |h|
// -> lower neuron index first. NaN ranks above +inf, and all NaNs tie with each other (then the lower
// index wins). -0 and +0 are equal. Subnormals are compared exactly (no flush to zero).
//
// Each op is a dispatcher (by h.device()) over a CPU reference `_cpu` with the same signature, which is
// also the CPU path of the binary, and a CUDA version (src/kernels/topk.cu, only in CUDA builds).
#pragma once
#include <torch/types.h>

#include <cstdint>

#include "sparsecl/kernels/detail.h"

namespace sparsecl::kernels {

// h: [N, I] float32 | bfloat16 | float16, any strides; 1 <= k <= I.
// Returns int32 [N, k]: the k selected neuron indices of each row, in ascending index order (the top-k
// SET in canonical order; not sorted by magnitude).
torch::Tensor topk_abs_indices(const torch::Tensor& h, int64_t k);
torch::Tensor topk_abs_indices_cpu(const torch::Tensor& h, int64_t k);

// h as above. Returns int64 [N, ceil(I/64)]: bit (j % 64) of word j / 64 is set iff neuron j is in the
// row's top-k (the unused high bits of the last word are 0).
torch::Tensor topk_abs_bitset(const torch::Tensor& h, int64_t k);
torch::Tensor topk_abs_bitset_cpu(const torch::Tensor& h, int64_t k);

#ifdef SPARSECL_WITH_CUDA
// path: kFull forces the whole-row radix select (tests compare both paths against the reference).
torch::Tensor topk_abs_indices_cuda(const torch::Tensor& h, int64_t k,
                                    detail::TopkPath path = detail::TopkPath::kAuto);
torch::Tensor topk_abs_bitset_cuda(const torch::Tensor& h, int64_t k,
                                   detail::TopkPath path = detail::TopkPath::kAuto);
#endif

}  // namespace sparsecl::kernels
