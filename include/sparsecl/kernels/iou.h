// Set overlap of neuron sets stored as bitsets (int64 words, bit j % 64 of word j / 64 = neuron j, the
// layout topk_abs_bitset produces): pair IoU via popcount, all-pairs intersection counts, and the
// conversion from index lists. IoU of two empty sets is defined as 0.
#pragma once
#include <torch/types.h>

#include <cstdint>

namespace sparsecl::kernels {

// bits_a, bits_b: int64 [P, W] on the same device. Returns float32 [P]: |a_p & b_p| / |a_p | b_p|.
torch::Tensor pair_iou(const torch::Tensor& bits_a, const torch::Tensor& bits_b);
torch::Tensor pair_iou_cpu(const torch::Tensor& bits_a, const torch::Tensor& bits_b);

// bits_x: int64 [N, W], bits_y: int64 [M, W]. Returns int32 [N, M]: |x_n & y_m| for all pairs
// (IoU = inter / (|x_n| + |y_m| - inter), with the set sizes from popcounts or known k).
torch::Tensor intersection_counts(const torch::Tensor& bits_x, const torch::Tensor& bits_y);
torch::Tensor intersection_counts_cpu(const torch::Tensor& bits_x, const torch::Tensor& bits_y);

// indices: int32 | int64 [P, K], each in [0, num_neurons) (duplicates allowed). Returns int64
// [P, ceil(num_neurons / 64)] with the listed neurons' bits set.
torch::Tensor indices_to_bitset(const torch::Tensor& indices, int64_t num_neurons);
torch::Tensor indices_to_bitset_cpu(const torch::Tensor& indices, int64_t num_neurons);

// Set-level IoU of two neuron sets given as bitsets int64 [W] (any device). Host scalar.
double set_iou(const torch::Tensor& bits_a, const torch::Tensor& bits_b);

#ifdef SPARSECL_WITH_CUDA
torch::Tensor pair_iou_cuda(const torch::Tensor& bits_a, const torch::Tensor& bits_b);
torch::Tensor intersection_counts_cuda(const torch::Tensor& bits_x, const torch::Tensor& bits_y);
torch::Tensor indices_to_bitset_cuda(const torch::Tensor& indices, int64_t num_neurons);
#endif

}  // namespace sparsecl::kernels
