// Per-neuron statistics: the CPU reference against a direct torch formulation (with and without a
// token mask, float64 and float32 accumulators, accumulation over several batches), argument errors,
// and the CUDA path against the CPU reference (counts exactly, sums to float tolerance).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <string>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/neuron_stats.h"
#include "sparsecl/kernels/topk.h"

using namespace sparsecl::kernels;

namespace {

#define REQUIRE_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device: CUDA kernel case compiled, not run"

// The statistics written with plain tensor ops: [I] sums of |h| and [I] top-k counts over kept rows.
std::pair<torch::Tensor, torch::Tensor> plain_stats(const torch::Tensor& h, int64_t k, const torch::Tensor& mask) {
  auto hf = h.to(torch::kCPU, torch::kDouble);
  auto keep = mask.to(torch::kCPU, torch::kDouble).unsqueeze(1);  // [N, 1]
  auto sums = (hf.abs() * keep).sum(0);                            // [I]
  auto bits = topk_abs_indices_cpu(h, k).to(torch::kLong);         // [N, k]
  auto onehot = torch::zeros({h.size(0), h.size(1)}, torch::kLong).scatter_(1, bits, 1);
  auto counts = (onehot * keep.to(torch::kLong)).sum(0);           // [I]
  return {sums, counts};
}

}  // namespace

TEST(NeuronStatsCpu, MatchesPlainFormulationOverBatches) {
  torch::manual_seed(11);
  const int64_t cols = 301, k = 9;
  auto sum64 = torch::zeros({cols}, torch::kDouble);
  auto sum32 = torch::zeros({cols}, torch::kFloat);
  auto cnt = torch::zeros({cols}, torch::kLong);
  auto cnt2 = torch::zeros({cols}, torch::kLong);
  auto want_s = torch::zeros({cols}, torch::kDouble);
  auto want_c = torch::zeros({cols}, torch::kLong);
  for (int b = 0; b < 3; ++b) {
    auto h = torch::randn({40 + b, cols}).to(torch::kBFloat16);
    auto mask = torch::rand({40 + b}) < 0.7;
    accumulate_neuron_stats_cpu(h, k, sum64, cnt, mask);
    accumulate_neuron_stats(h, k, sum32, cnt2, mask);  // dispatch -> CPU
    auto [s, c] = plain_stats(h, k, mask);
    want_s += s;
    want_c += c;
  }
  EXPECT_TRUE(torch::allclose(sum64, want_s, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(sum32.to(torch::kDouble), want_s, 1e-5, 1e-5));
  EXPECT_TRUE(torch::equal(cnt, want_c));
  EXPECT_TRUE(torch::equal(cnt2, want_c));
}

TEST(NeuronStatsCpu, NoMaskCountsEveryToken) {
  auto h = torch::randn({10, 64});
  auto s = torch::zeros({64}, torch::kDouble);
  auto c = torch::zeros({64}, torch::kLong);
  accumulate_neuron_stats(h, 64, s, c);
  EXPECT_TRUE(torch::equal(c, torch::full({64}, 10, torch::kLong)));
  EXPECT_TRUE(torch::allclose(s, h.to(torch::kDouble).abs().sum(0)));
}

TEST(NeuronStatsCpu, BadArgumentsNameTheArgument) {
  auto h = torch::randn({4, 10});
  auto s = torch::zeros({10}, torch::kDouble);
  auto c = torch::zeros({10}, torch::kLong);
  auto expect_error = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      FAIL() << "no error, expected one mentioning '" << needle << "'";
    } catch (const sparsecl::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto bad_s = torch::zeros({9}, torch::kDouble);
  auto bad_s2 = torch::zeros({10}, torch::kInt);
  auto bad_c = torch::zeros({10}, torch::kFloat);
  expect_error([&] { accumulate_neuron_stats(h, 3, bad_s, c); }, "sum_abs must be");
  expect_error([&] { accumulate_neuron_stats(h, 3, bad_s2, c); }, "sum_abs must be");
  expect_error([&] { accumulate_neuron_stats(h, 3, s, bad_c); }, "topk_count must be");
  expect_error([&] { accumulate_neuron_stats(h, 3, s, c, torch::ones({5}, torch::kBool)); }, "token_mask must be");
  expect_error([&] { accumulate_neuron_stats(h, 3, s, c, torch::ones({4}, torch::kFloat)); }, "token_mask must be");
  expect_error([&] { accumulate_neuron_stats(h, 11, s, c); }, "k must be in [1, I]");
}

TEST(NeuronStatsCuda, MatchesCpuReference) {
  REQUIRE_CUDA();
  torch::manual_seed(12);
  for (auto dt : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    for (int64_t cols : {1, 301, 14336}) {
      const int64_t k = std::max<int64_t>(1, cols / 100);
      auto opt = torch::TensorOptions().device(torch::kCUDA);
      auto s64 = torch::zeros({cols}, opt.dtype(torch::kDouble));
      auto s32 = torch::zeros({cols}, opt.dtype(torch::kFloat));
      auto c = torch::zeros({cols}, opt.dtype(torch::kLong));
      auto ref_s = torch::zeros({cols}, torch::kDouble);
      auto ref_c = torch::zeros({cols}, torch::kLong);
      for (int b = 0; b < 2; ++b) {
        auto h = torch::randn({300 + b, cols + 3}).to(dt).to(torch::kCUDA).narrow(1, 2, cols);  // strided rows
        auto mask = (torch::rand({300 + b}) < 0.8).to(torch::kCUDA);
        auto c32 = torch::zeros_like(c);
        accumulate_neuron_stats(h, k, s64, c, mask);
        accumulate_neuron_stats(h, k, s32, c32, mask);
        accumulate_neuron_stats_cpu(h, k, ref_s, ref_c, mask);
      }
      const std::string tag = std::string(c10::toString(dt)) + " I=" + std::to_string(cols);
      EXPECT_TRUE(torch::equal(c.cpu(), ref_c)) << tag;
      EXPECT_TRUE(torch::allclose(s64.cpu(), ref_s, 1e-5, 1e-6)) << tag;
      EXPECT_TRUE(torch::allclose(s32.cpu().to(torch::kDouble), ref_s, 1e-4, 1e-4)) << tag;
    }
  }
}
