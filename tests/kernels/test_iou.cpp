// Bitset overlap: CPU references against std::set arithmetic, argument errors, and the CUDA kernels
// (pair IoU, all-pairs intersection counts with odd N, M, W, index lists -> bitsets) against them.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <set>
#include <string>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/iou.h"
#include "sparsecl/kernels/topk.h"

using namespace sparsecl::kernels;

namespace {

#define REQUIRE_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device: CUDA kernel case compiled, not run"

std::set<int64_t> row_set(const torch::Tensor& idx, int64_t r) {
  std::set<int64_t> s;
  for (int64_t i = 0; i < idx.size(1); ++i) s.insert(idx[r][i].item<int64_t>());
  return s;
}

// [rows, k] random index lists in [0, n) (with duplicates)
torch::Tensor random_indices(int64_t rows, int64_t k, int64_t n) { return torch::randint(0, n, {rows, k}, torch::kLong); }

}  // namespace

TEST(IouCpu, MatchesSetArithmetic) {
  torch::manual_seed(21);
  const int64_t n = 200;
  auto ia = random_indices(6, 30, n), ib = random_indices(6, 30, n);
  auto a = indices_to_bitset_cpu(ia, n), b = indices_to_bitset_cpu(ib.to(torch::kInt), n);
  ASSERT_EQ(a.sizes(), (std::vector<int64_t>{6, 4}));
  auto iou = pair_iou_cpu(a, b);
  auto inter = intersection_counts_cpu(a, b);
  for (int64_t p = 0; p < 6; ++p) {
    auto sa = row_set(ia, p);
    for (int64_t q = 0; q < 6; ++q) {
      auto sb = row_set(ib, q);
      int64_t common = 0;
      for (auto j : sa) common += sb.count(j);
      EXPECT_EQ(inter[p][q].item<int32_t>(), common);
      if (p == q) {
        const double uni = static_cast<double>(sa.size() + sb.size() - common);
        EXPECT_FLOAT_EQ(iou[p].item<float>(), static_cast<float>(common / uni));
      }
    }
  }
  EXPECT_DOUBLE_EQ(set_iou(a[0], a[0]), 1.0);
  EXPECT_DOUBLE_EQ(set_iou(torch::zeros({4}, torch::kLong), torch::zeros({4}, torch::kLong)), 0.0);
}

TEST(IouCpu, TopkBitsetsOfOneRowAgree) {
  auto h = torch::randn({3, 500});
  auto bits = topk_abs_bitset(h, 50);
  auto iou = pair_iou(bits, bits);
  EXPECT_TRUE(torch::equal(iou, torch::ones({3})));
  auto inter = intersection_counts(bits, bits);
  EXPECT_TRUE(torch::equal(inter.diagonal(), torch::full({3}, 50, torch::kInt)));
}

TEST(IouCpu, BadArgumentsNameTheArgument) {
  auto expect_error = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      FAIL() << "no error, expected one mentioning '" << needle << "'";
    } catch (const sparsecl::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto a = torch::zeros({3, 4}, torch::kLong);
  expect_error([&] { pair_iou(a, torch::zeros({3, 5}, torch::kLong)); }, "do not match");
  expect_error([&] { pair_iou(a, torch::zeros({2, 4}, torch::kLong)); }, "do not match");
  expect_error([&] { pair_iou(a.to(torch::kInt), a); }, "bits_a must be an int64 bitset");
  expect_error([&] { intersection_counts(a, torch::zeros({4}, torch::kLong)); }, "bits_y must be an int64 bitset");
  expect_error([&] { indices_to_bitset(torch::tensor({{0, 5}}), 5); }, "indices must be in [0, 5)");
  expect_error([&] { indices_to_bitset(torch::tensor({{-1, 2}}), 5); }, "indices must be in [0, 5)");
  expect_error([&] { indices_to_bitset(torch::zeros({3}, torch::kLong), 5); }, "indices must be int32 or int64");
  expect_error([&] { set_iou(a, a); }, "bits_a must be an int64 bitset of rank 1");
}

TEST(IouCuda, MatchesCpuReference) {
  REQUIRE_CUDA();
  torch::manual_seed(22);
  for (int64_t n_neurons : {1, 64, 1000, 14336}) {
    const int64_t k = std::max<int64_t>(1, n_neurons / 10);
    for (auto [nx, ny] : {std::pair<int64_t, int64_t>{1, 1}, {67, 130}, {200, 3}}) {
      auto ix = random_indices(nx, k, n_neurons), iy = random_indices(ny, k, n_neurons);
      auto bx_ref = indices_to_bitset_cpu(ix, n_neurons), by_ref = indices_to_bitset_cpu(iy, n_neurons);
      auto bx = indices_to_bitset(ix.cuda(), n_neurons), by = indices_to_bitset(iy.to(torch::kInt).cuda(), n_neurons);
      const std::string tag = "I=" + std::to_string(n_neurons) + " " + std::to_string(nx) + "x" + std::to_string(ny);
      ASSERT_TRUE(torch::equal(bx.cpu(), bx_ref)) << tag;
      ASSERT_TRUE(torch::equal(by.cpu(), by_ref)) << tag;
      EXPECT_TRUE(torch::equal(intersection_counts(bx, by).cpu(), intersection_counts_cpu(bx_ref, by_ref))) << tag;
      // non-contiguous rows: every other row of a wider tensor
      auto bx2 = torch::cat({bx, bx}, 1).narrow(1, 0, bx.size(1));
      EXPECT_TRUE(torch::equal(intersection_counts(bx2, by).cpu(), intersection_counts_cpu(bx_ref, by_ref))) << tag;
      const int64_t p = std::min(nx, ny);
      auto got = pair_iou(bx.narrow(0, 0, p), by.narrow(0, 0, p)).cpu();
      auto want = pair_iou_cpu(bx_ref.narrow(0, 0, p), by_ref.narrow(0, 0, p));
      EXPECT_TRUE(torch::equal(got, want)) << tag;
    }
  }
}
