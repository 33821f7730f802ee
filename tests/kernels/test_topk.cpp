// Top-k of |h| per row: the CPU reference against hand-worked cases and torch::topk, argument errors,
// and the CUDA kernel (every algorithm path: auto, full, staged) against the CPU reference exactly: ties,
// NaN/inf, k = 1, k = I, N = 1, odd sizes, non-contiguous inputs, float32 / bfloat16 / float16, and
// batches with many more rows than the staged path's persistent blocks (rows of very different scales,
// rows left to the full kernel among normal ones; top-k counts under a row mask). CUDA cases skip when no
// GPU is present but are always compiled.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cctype>
#include <limits>
#include <string>
#include <vector>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/iou.h"
#include "sparsecl/kernels/topk.h"

#ifdef SPARSECL_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

using namespace sparsecl::kernels;

namespace {

#define REQUIRE_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device: CUDA kernel case compiled, not run"

torch::Tensor idx_tensor(std::vector<std::vector<int32_t>> rows) {
  const int64_t n = static_cast<int64_t>(rows.size()), k = static_cast<int64_t>(rows[0].size());
  auto t = torch::empty({n, k}, torch::kInt);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < k; ++i) t[r][i] = rows[r][i];
  return t;
}

void expect_equal(const torch::Tensor& got, const torch::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  ASSERT_EQ(got.scalar_type(), want.scalar_type()) << what;
  const auto g = got.cpu(), w = want.cpu();
  if (!torch::equal(g, w)) {
    auto diff = (g != w).nonzero();
    const int64_t r = diff[0][0].item<int64_t>();
    FAIL() << what << ": first mismatch in row " << r << "\n got  " << g[r] << "\n want " << w[r];
  }
}

}  // namespace

// ---- CPU reference --------------------------------------------------------------------------------
TEST(TopkCpu, HandWorkedTiesNanAndSigns) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  auto h = torch::tensor({{1.f, -3.f, 3.f, 2.f, -0.f, 0.f},     // |3| tie: indices 1, 2
                          {0.f, -0.f, 0.f, 0.f, 0.f, 0.f},       // all zero: lowest indices
                          {-inf, nan, 5.f, -nan, inf, 1.f}});    // NaN > inf, NaNs tie
  expect_equal(topk_abs_indices_cpu(h, 1), idx_tensor({{1}, {0}, {1}}), "k=1");
  expect_equal(topk_abs_indices_cpu(h, 2), idx_tensor({{1, 2}, {0, 1}, {1, 3}}), "k=2");
  expect_equal(topk_abs_indices_cpu(h, 3), idx_tensor({{1, 2, 3}, {0, 1, 2}, {0, 1, 3}}), "k=3");
  expect_equal(topk_abs_indices_cpu(h, 6), idx_tensor({{0, 1, 2, 3, 4, 5}, {0, 1, 2, 3, 4, 5}, {0, 1, 2, 3, 4, 5}}),
               "k=I");
}

TEST(TopkCpu, MatchesTorchTopkWithoutTies) {
  torch::manual_seed(1);
  auto h = torch::randn({37, 1000});  // float32 normals: ties have probability ~0
  for (int64_t k : {1, 10, 333, 1000}) {
    auto want = std::get<1>(torch::topk(h.abs(), k)).to(torch::kInt);
    want = std::get<0>(torch::sort(want, 1));
    expect_equal(topk_abs_indices_cpu(h, k), want, "k=" + std::to_string(k));
  }
}

TEST(TopkCpu, BitsetMatchesIndicesAndDtypes) {
  torch::manual_seed(2);
  auto h = torch::randn({5, 130});
  for (auto dt : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    auto hd = h.to(dt);
    auto idx = topk_abs_indices_cpu(hd, 17);
    auto bits = topk_abs_bitset_cpu(hd, 17);
    ASSERT_EQ(bits.sizes(), (std::vector<int64_t>{5, 3}));
    expect_equal(bits, indices_to_bitset_cpu(idx, 130), "bitset vs indices");
    // the reference sees the rounded values: the same as running on the upcast tensor
    expect_equal(idx, topk_abs_indices_cpu(hd.to(torch::kFloat), 17), "dtype");
  }
}

TEST(TopkCpu, NonContiguousInput) {
  torch::manual_seed(3);
  auto base = torch::randn({64, 90});
  auto t = base.t();                              // [90, 64], inner stride 90
  auto slice = base.narrow(1, 3, 77);            // [64, 77], row stride 90
  expect_equal(topk_abs_indices_cpu(t, 9), topk_abs_indices_cpu(t.contiguous(), 9), "transposed");
  expect_equal(topk_abs_indices_cpu(slice, 9), topk_abs_indices_cpu(slice.contiguous(), 9), "slice");
}

TEST(TopkCpu, DispatchUsesCpuPath) {
  auto h = torch::randn({4, 50});
  expect_equal(topk_abs_indices(h, 5), topk_abs_indices_cpu(h, 5), "dispatch");
  expect_equal(topk_abs_bitset(h, 5), topk_abs_bitset_cpu(h, 5), "dispatch bitset");
}

TEST(TopkCpu, BadArgumentsNameTheArgument) {
  auto h = torch::randn({4, 10});
  auto expect_error = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      FAIL() << "no error, expected one mentioning '" << needle << "'";
    } catch (const sparsecl::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { topk_abs_indices(h, 0); }, "k must be in [1, I]");
  expect_error([&] { topk_abs_indices(h, 11); }, "k must be in [1, I]");
  expect_error([&] { topk_abs_bitset(torch::randn({10}), 1); }, "h must be 2-D");
  expect_error([&] { topk_abs_indices(torch::randn({2, 3, 4}), 1); }, "h must be 2-D");
  expect_error([&] { topk_abs_indices(h.to(torch::kDouble), 1); }, "h must be float32, bfloat16 or float16");
  expect_error([&] { topk_abs_indices(h.to(torch::kInt), 1); }, "h must be float32, bfloat16 or float16");
}

// ---- CUDA kernel vs CPU reference -----------------------------------------------------------------
namespace {

struct Case {
  int64_t rows, cols, k;
  torch::Dtype dtype;
  // contiguous | transposed | colslice | rowstep | ties | nan | sample_high | sample_low | rowscale | mixed
  std::string layout;
};

std::string case_name(const Case& c) {
  return std::to_string(c.rows) + "x" + std::to_string(c.cols) + " k=" + std::to_string(c.k) + " " +
         std::string(c10::toString(c.dtype)) + " " + c.layout;
}

void PrintTo(const Case& c, std::ostream* os) { *os << case_name(c); }

}  // namespace

// Builds the input of a case on `device` (values decided on the CPU, so both sides see the same data).
static torch::Tensor make_input(const Case& c, torch::Device device) {
  torch::manual_seed(1234 + c.rows * 7 + c.cols * 13 + c.k);
  torch::Tensor h;
  if (c.layout == "transposed") {
    h = torch::randn({c.cols, c.rows}).to(c.dtype).to(device).t();  // inner stride != 1
  } else if (c.layout == "colslice") {
    h = torch::randn({c.rows, c.cols + 5}).to(c.dtype).to(device).narrow(1, 3, c.cols);  // misaligned rows
  } else if (c.layout == "rowstep") {
    h = torch::randn({2 * c.rows, c.cols}).to(c.dtype).to(device).slice(0, 0, 2 * c.rows, 2);
  } else if (c.layout == "ties") {
    // few distinct magnitudes, both signs: the threshold almost always falls inside a run of ties
    h = (torch::randint(0, 4, {c.rows, c.cols}).to(torch::kFloat) *
         (torch::randint(0, 2, {c.rows, c.cols}).to(torch::kFloat) * 2 - 1))
            .to(c.dtype)
            .to(device);
  } else if (c.layout == "nan") {
    auto x = torch::randn({c.rows, c.cols});
    auto u = torch::rand({c.rows, c.cols});
    x.masked_fill_(u < 0.01, std::numeric_limits<float>::quiet_NaN());
    x.masked_fill_((u >= 0.01) & (u < 0.02), -std::numeric_limits<float>::infinity());
    x.masked_fill_((u >= 0.02) & (u < 0.03), std::numeric_limits<float>::infinity());
    h = x.to(c.dtype).to(device);
  } else if (c.layout == "sample_high" || c.layout == "sample_low" || c.layout == "mixed") {
    // The kernel samples element 0 of every 8 (16-bit) / 4 (float32) elements. Make the samples
    // systematically larger (or smaller) than the rest so the sample threshold misses and rows take
    // the exact fallback. mixed: rows 1, 4, 7, ... like sample_high, the others normal.
    const int64_t vec = c.dtype == torch::kFloat ? 4 : 8;
    auto x = torch::rand({c.rows, c.cols}) + 1.0;  // [1, 2)
    auto is_sample = (torch::arange(c.cols) % vec == 0).unsqueeze(0).expand({c.rows, c.cols});
    auto big = torch::exp(torch::rand({c.rows, c.cols}) * 8.0) * 100.0;  // distinct, > 100
    auto tiny = torch::rand({c.rows, c.cols}) * 1e-3;
    x = torch::where(is_sample, c.layout == "sample_low" ? tiny : big, x);
    if (c.layout == "mixed") {
      auto skewed_row = (torch::arange(c.rows) % 3 == 1).unsqueeze(1).expand({c.rows, c.cols});
      x = torch::where(skewed_row, x, torch::randn({c.rows, c.cols}));
    }
    h = x.to(c.dtype).to(device);
  } else if (c.layout == "rowscale") {
    // each row scaled by exp(U(-6, 6)): a row's threshold says little about the next row's
    auto scale = torch::exp(torch::rand({c.rows, 1}) * 12.0 - 6.0);  // [N, 1]
    h = (torch::randn({c.rows, c.cols}) * scale).to(c.dtype).to(device);
  } else {
    h = torch::randn({c.rows, c.cols}).to(c.dtype).to(device);
  }
  return h;
}

class TopkCuda : public ::testing::TestWithParam<Case> {};

TEST_P(TopkCuda, MatchesCpuReference) {
  REQUIRE_CUDA();
#ifdef SPARSECL_WITH_CUDA
  const Case& c = GetParam();
  auto h = make_input(c, torch::kCUDA);
  auto want_idx = topk_abs_indices_cpu(h, c.k);
  auto want_bits = topk_abs_bitset_cpu(h, c.k);
  using sparsecl::kernels::detail::TopkPath;
  for (auto path : {TopkPath::kAuto, TopkPath::kFull, TopkPath::kStaged}) {
    const std::string tag = case_name(c) + (path == TopkPath::kAuto   ? " auto"
                                            : path == TopkPath::kFull ? " full"
                                                                      : " staged");
    auto idx = topk_abs_indices_cuda(h, c.k, path);
    auto bits = topk_abs_bitset_cuda(h, c.k, path);
    ASSERT_TRUE(idx.is_cuda());
    expect_equal(idx, want_idx, tag + " indices");
    expect_equal(bits, want_bits, tag + " bitset");
  }
  expect_equal(topk_abs_indices(h, c.k), want_idx, case_name(c) + " dispatch");
#endif
}

static std::vector<Case> cuda_cases() {
  std::vector<Case> cases;
  for (auto dt : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    // odd sizes, k = 1, k = I, N = 1, tiny rows
    cases.push_back({1, 1, 1, dt, "contiguous"});
    cases.push_back({3, 7, 1, dt, "contiguous"});
    cases.push_back({3, 7, 7, dt, "contiguous"});
    cases.push_back({5, 100, 13, dt, "contiguous"});
    cases.push_back({1, 4099, 41, dt, "contiguous"});
    cases.push_back({17, 4099, 1, dt, "contiguous"});
    cases.push_back({17, 4099, 4099, dt, "contiguous"});
    cases.push_back({9, 4099, 2048, dt, "contiguous"});
    // the shapes of real models, the probe's k (1% and 5%)
    cases.push_back({33, 14336, 143, dt, "contiguous"});
    cases.push_back({33, 14336, 717, dt, "contiguous"});
    cases.push_back({7, 11008, 110, dt, "contiguous"});
    // register tiers: 16 vectors per thread, and rows streamed from global memory
    cases.push_back({5, 20000, 200, dt, "contiguous"});
    cases.push_back({5, 40000, 400, dt, "contiguous"});
    cases.push_back({3, 140001, 1400, dt, "contiguous"});
    // layouts
    cases.push_back({31, 1000, 10, dt, "transposed"});
    cases.push_back({19, 4099, 41, dt, "colslice"});
    cases.push_back({19, 4096, 41, dt, "rowstep"});
    cases.push_back({23, 4096, 41, dt, "ties"});
    cases.push_back({23, 4093, 500, dt, "ties"});
    cases.push_back({23, 4096, 1, dt, "ties"});
    cases.push_back({23, 4096, 60, dt, "nan"});
    cases.push_back({23, 4096, 400, dt, "sample_high"});
    cases.push_back({23, 4096, 40, dt, "sample_low"});
    // many more rows than the staged path's persistent blocks (a few hundred on an H200): each block
    // runs its row loop several times; the previous row's threshold misses often (rowscale), rows go
    // to the full kernel between settled ones (mixed)
    cases.push_back({2400, 4096, 41, dt, "rowscale"});
  }
  cases.push_back({2000, 14336, 143, torch::kBFloat16, "contiguous"});
  cases.push_back({1500, 4099, 41, torch::kFloat, "contiguous"});  // partial last vector
  cases.push_back({1200, 4096, 400, torch::kBFloat16, "mixed"});
  cases.push_back({1200, 4096, 400, torch::kFloat, "mixed"});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Kernels, TopkCuda, ::testing::ValuesIn(cuda_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string s = case_name(info.param);
                           for (auto& ch : s)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return std::to_string(info.index) + "_" + s;
                         });

// The top-k counts with a row mask (the neuron statistics' use), through the launch interface, which
// takes the path: every path against the CPU reference over the unmasked rows.
TEST(TopkCudaExtra, CountsWithRowMaskAllPaths) {
  REQUIRE_CUDA();
#ifdef SPARSECL_WITH_CUDA
  using sparsecl::kernels::detail::TopkPath;
  const Case c{1500, 4096, 41, torch::kBFloat16, "rowscale"};
  auto h = make_input(c, torch::kCUDA);                            // [N, I] contiguous
  auto mask = torch::rand({c.rows}) < 0.7;                         // [N] bool, CPU
  auto sel = topk_abs_indices_cpu(h.cpu().index({mask}), c.k);     // [M, k]
  auto want = torch::bincount(sel.flatten().to(torch::kLong), {}, c.cols);  // [I] int64
  auto mask_dev = mask.to(torch::kCUDA);
  for (auto path : {TopkPath::kAuto, TopkPath::kFull, TopkPath::kStaged}) {
    auto counts = torch::zeros({c.cols}, h.options().dtype(torch::kLong));    // [I]
    auto workspace = torch::empty({c.rows + 1}, h.options().dtype(torch::kInt));  // [N + 1]
    sparsecl::kernels::detail::TopkLaunch a;
    a.h = h.data_ptr();
    a.rows = c.rows;
    a.cols = c.cols;
    a.row_stride = h.stride(0);
    a.k = c.k;
    a.kind = sparsecl::kernels::detail::ScalarKind::bf16;
    a.counts = counts.data_ptr<int64_t>();
    a.row_mask = mask_dev.data_ptr<bool>();
    a.path = path;
    a.workspace = workspace.data_ptr<int32_t>();
    sparsecl::kernels::detail::launch_topk_abs(a, c10::cuda::getCurrentCUDAStream().stream());
    expect_equal(counts, want, "counts, path " + std::to_string(static_cast<int>(path)));
  }
#endif
}

TEST(TopkCudaExtra, LargeBatchAgreesWithTorchValues) {
  REQUIRE_CUDA();
  // 2048 x 14336 bf16, k = 1%: the selected magnitudes equal torch::topk's (sets may differ on ties)
  torch::manual_seed(7);
  auto h = torch::randn({2048, 14336}, torch::TensorOptions().device(torch::kCUDA)).to(torch::kBFloat16);
  const int64_t k = 143;
  auto idx = topk_abs_indices(h, k).to(torch::kLong);
  auto ours = std::get<0>(torch::sort(h.abs().gather(1, idx).to(torch::kFloat), 1));
  auto theirs = std::get<0>(torch::sort(std::get<0>(torch::topk(h.abs(), k)).to(torch::kFloat), 1));
  EXPECT_TRUE(torch::equal(ours, theirs));
  expect_equal(topk_abs_indices(h.narrow(0, 0, 64), k), topk_abs_indices_cpu(h.narrow(0, 0, 64), k), "rows 0..63");
}
