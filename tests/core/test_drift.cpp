// Representation drift (include/sparsecl/eval/drift.h): linear CKA against the O(N^2) HSIC formula with
// an explicit centring matrix in both of its computation paths, CKA's invariances, principal-angle
// similarity and the in-subspace displacement share on constructed subspaces, PCA's k at an energy
// threshold, and the llama3 fixture end to end: the token sample, base vs itself (CKA 1, no
// displacement -> inside_share null), a perturbed layer moving only the hidden states after it, and
// the safetensors round trip.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>

#include "sparsecl/common/error.h"
#include "sparsecl/eval/drift.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/decoder.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using nlohmann::json;

namespace {

const fs::path kModel = fs::path(SPARSECL_TEST_DATA) / "models" / "llama3";

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("sparsecl_drift_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() { [[maybe_unused]] int rc = std::system(("rm -rf '" + path.string() + "'").c_str()); }
};

at::Tensor randn(std::vector<int64_t> shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kDouble));
}

// A random orthogonal [n, n] matrix (Q of a QR decomposition).
at::Tensor orthogonal(int64_t n, uint64_t seed) { return std::get<0>(at::linalg_qr(randn({n, n}, seed))); }

// The reference: HSIC(K, L) = tr(K H L H) / (n-1)^2 with H = I - 11^T/n, K = X X^T, L = Y Y^T, no shortcut.
double reference_cka(const at::Tensor& X, const at::Tensor& Y) {
  const int64_t n = X.size(0);
  const auto H = at::eye(n, at::kDouble) - at::full({n, n}, 1.0 / n, at::kDouble);
  const auto K = at::matmul(X, X.t());
  const auto L = at::matmul(Y, Y.t());
  const auto hsic = [&](const at::Tensor& A, const at::Tensor& B) {
    return at::trace(at::matmul(at::matmul(A, H), at::matmul(B, H))).item<double>() / ((n - 1.0) * (n - 1.0));
  };
  return hsic(K, L) / std::sqrt(hsic(K, K) * hsic(L, L));
}

// Pre-tokenized examples for the fixture (vocab 512), lengths 6..21.
std::vector<data::Example> fixture_examples(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<data::Example> out;
  for (int64_t i = 0; i < count; ++i) {
    data::Example e;
    const int64_t len = 6 + static_cast<int64_t>(data::uniform_below(rng, 16));
    for (int64_t t = 0; t < len; ++t) e.ids.push_back(3 + static_cast<int64_t>(data::uniform_below(rng, 500)));
    e.loss_mask.assign(e.ids.size(), 1);
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace

TEST(DriftMeasures, CkaMatchesTheHsicReferenceInBothPaths) {
  // N > p: the feature-space path; N < p: the sample-space (Gram) path.
  for (auto [n, p] : {std::pair<int64_t, int64_t>{120, 9}, {25, 60}}) {
    const auto X = randn({n, p}, 1) + 0.7;  // an offset, removed by the centring
    const auto Y = at::matmul(X, randn({p, p}, 2)) + 0.5 * randn({n, p}, 3);
    const double got = eval::linear_cka(X, Y);
    EXPECT_NEAR(got, reference_cka(X, Y), 1e-10) << "n=" << n << " p=" << p;
    EXPECT_GT(got, 0.05);
    EXPECT_LT(got, 0.999);
    // Different widths (q != p) and fp32 inputs take the same route.
    const auto Z = at::matmul(X, randn({p, 5}, 4));
    EXPECT_NEAR(eval::linear_cka(X.to(at::kFloat), Z.to(at::kFloat)), reference_cka(X, Z), 1e-5);
  }
}

TEST(DriftMeasures, CkaInvariances) {
  const auto X = randn({300, 12}, 5);
  EXPECT_NEAR(eval::linear_cka(X, X), 1.0, 1e-12);
  const auto Q = orthogonal(12, 6);
  EXPECT_NEAR(eval::linear_cka(X, at::matmul(X, Q)), 1.0, 1e-10);        // orthogonal transform
  EXPECT_NEAR(eval::linear_cka(X, 3.7 * X + 2.0), 1.0, 1e-10);           // isotropic scaling + offset
  EXPECT_LT(eval::linear_cka(X, X * at::arange(1, 13, at::kDouble)), 0.99);  // anisotropic scaling is not invariant
  // Independent random matrices: CKA ~ sqrt(p q) / N, small.
  const double independent = eval::linear_cka(randn({3000, 8}, 7), randn({3000, 8}, 8));
  EXPECT_LT(independent, 0.02);
  EXPECT_GE(independent, 0.0);
  // No variance: NaN, not a division by zero.
  EXPECT_TRUE(std::isnan(eval::linear_cka(at::ones({10, 3}), X.slice(0, 0, 10))));
}

TEST(DriftMeasures, SubspaceSimilarityAndInsideShare) {
  const auto Q = orthogonal(10, 9);           // [10, 10]
  const auto U = Q.slice(1, 0, 3);            // span of the first three columns
  const auto rotated = at::matmul(U, orthogonal(3, 10));  // same subspace, another basis
  EXPECT_NEAR(eval::subspace_similarity(U, rotated), 1.0, 1e-12);
  EXPECT_NEAR(eval::subspace_similarity(U, Q.slice(1, 3, 6)), 0.0, 1e-12);  // orthogonal subspaces
  // span{q0, q1} vs span{q0, q2}: principal angles 0 and 90 degrees -> mean cos^2 = 0.5.
  EXPECT_NEAR(eval::subspace_similarity(Q.slice(1, 0, 2), at::stack({Q.select(1, 0), Q.select(1, 2)}, 1)), 0.5, 1e-12);
  // A subspace inside a larger one: the min(a, b) angles are all 0.
  EXPECT_NEAR(eval::subspace_similarity(Q.slice(1, 0, 2), Q.slice(1, 0, 5)), 1.0, 1e-12);
  EXPECT_TRUE(std::isnan(eval::subspace_similarity(U, at::zeros({10, 0}, at::kDouble))));

  const auto inside = at::matmul(randn({40, 3}, 11), U.t());                     // rows in span(U)
  const auto outside = at::matmul(randn({40, 4}, 12), Q.slice(1, 3, 7).t());     // rows orthogonal to it
  EXPECT_NEAR(eval::inside_share(inside, U), 1.0, 1e-12);
  EXPECT_NEAR(eval::inside_share(outside, U), 0.0, 1e-12);
  // Half of the energy inside: equal norms, orthogonal parts.
  const auto a = at::matmul(at::ones({1, 1}, at::kDouble), Q.select(1, 0).unsqueeze(0));
  const auto b = at::matmul(at::ones({1, 1}, at::kDouble), Q.select(1, 8).unsqueeze(0));
  EXPECT_NEAR(eval::inside_share(a + b, U), 0.5, 1e-12);
  EXPECT_TRUE(std::isnan(eval::inside_share(at::zeros({5, 10}, at::kDouble), U)));
}

TEST(DriftMeasures, PcaBasisTakesKAtTheEnergyThreshold) {
  // Variances 100, 25, 1, 0.25 along four orthonormal directions of R^8: energies 0.794, 0.992, ...
  const auto Q = orthogonal(8, 13);
  auto Z = randn({4000, 4}, 14);
  Z = (Z - Z.mean(0, true)) / Z.std(0, true, true);  // unit variance per column, exactly
  const auto scales = at::tensor({10.0, 5.0, 1.0, 0.5}, at::kDouble);
  const auto X = at::matmul(Z * scales, Q.slice(1, 0, 4).t());  // [4000, 8]
  const auto U1 = eval::pca_basis(X, 0.7);
  const auto U2 = eval::pca_basis(X, 0.9);
  const auto U4 = eval::pca_basis(X, 1.0);
  EXPECT_EQ(U1.size(1), 1);
  EXPECT_EQ(U2.size(1), 2);
  EXPECT_EQ(U4.size(1), 4);  // rank 4: energy 1 stops at the rank, not at 8
  EXPECT_TRUE(at::allclose(at::matmul(U2.t(), U2), at::eye(2, at::kDouble), 1e-9, 1e-9));
  EXPECT_GT(eval::subspace_similarity(U2, Q.slice(1, 0, 2)), 0.99);
  EXPECT_EQ(eval::pca_basis(at::ones({6, 8}), 0.9).size(1), 0);  // no variance

  // N <= H takes the Gram-matrix route: same k and subspace as an SVD of the centred matrix.
  for (auto [n, h] : {std::pair<int64_t, int64_t>{40, 64}, {64, 40}}) {
    const auto Y = at::matmul(randn({n, 6}, 15) * at::tensor({6.0, 4.0, 3.0, 1.0, 0.5, 0.2}, at::kDouble), randn({6, h}, 16)) +
                   0.05 * randn({n, h}, 17);
    const auto Yc = Y - Y.mean(0, true);
    const auto [u, sv, vh] = at::linalg_svd(Yc, false);
    const auto e = (sv.square().cumsum(0) / sv.square().sum()).contiguous();
    int64_t k = 0;
    while (e[k].item<double>() < 0.9) ++k;
    const auto reference = vh.slice(0, 0, k + 1).t();
    const auto basis = eval::pca_basis(Y, 0.9);
    EXPECT_EQ(basis.size(1), k + 1) << n << "x" << h;
    EXPECT_TRUE(at::allclose(at::matmul(basis.t(), basis), at::eye(k + 1, at::kDouble), 1e-9, 1e-9));
    EXPECT_NEAR(eval::subspace_similarity(basis, reference), 1.0, 1e-9) << n << "x" << h;
  }
  EXPECT_THROW(eval::pca_basis(X, 0.0), Error);
}

TEST(DriftFixture, BaseVsItselfAndAPerturbedLayer) {
  auto decoder = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  const auto examples = fixture_examples(12, 3);
  eval::CollectOptions opts;
  opts.max_tokens = 80;
  const auto base = eval::collect_representations(decoder, examples, 5, 0, 7, opts);
  ASSERT_EQ(base.layers.size(), 4u);  // 3 layers -> 4 hidden states
  EXPECT_EQ(base.tokens.size(0), 80);
  EXPECT_EQ(base.layers[0].sizes(), (at::IntArrayRef{80, 64}));
  EXPECT_EQ(base.layers[0].scalar_type(), at::kFloat);
  EXPECT_EQ(base.examples, 12);
  int64_t eligible = 0;
  for (const auto& e : examples) eligible += static_cast<int64_t>(e.ids.size()) - 1;
  EXPECT_EQ(base.eligible_tokens, eligible);
  // The sample: positions >= 1, ascending (example, position), ids as in the examples.
  for (int64_t r = 0; r < 80; ++r) {
    const int64_t e = base.tokens[r][0].item<int64_t>(), p = base.tokens[r][1].item<int64_t>();
    EXPECT_GE(p, 1);
    EXPECT_EQ(base.token_ids[r].item<int64_t>(), examples[e].ids[p]);
    if (r > 0) EXPECT_LT(base.tokens[r - 1][0].item<int64_t>() * 100 + base.tokens[r - 1][1].item<int64_t>(), e * 100 + p);
  }
  // Row 0 of layer 0 is the embedding of its token.
  const auto embed = decoder.named_parameters().front();
  ASSERT_EQ(embed.first, "model.embed_tokens.weight");
  EXPECT_TRUE(at::allclose(base.layers[0][0], (*embed.second)[base.token_ids[0].item<int64_t>()]));

  // Base vs itself, collected again with the same batching: bit-identical on the CPU.
  const auto again = eval::collect_representations(decoder, examples, 5, 0, 7, opts);
  for (size_t i = 0; i < base.layers.size(); ++i) EXPECT_TRUE(again.layers[i].equal(base.layers[i])) << i;
  const json same = eval::drift(base, again, 0.9);
  ASSERT_EQ(same["layers"].size(), 4u);
  for (const auto& l : same["layers"]) {
    EXPECT_NEAR(l["cka"].get<double>(), 1.0, 1e-6);
    EXPECT_NEAR(l["subspace_similarity"].get<double>(), 1.0, 1e-6);
    EXPECT_TRUE(l["inside_share"].is_null()) << l.dump();  // zero displacement
    EXPECT_EQ(l["relative_displacement"].get<double>(), 0.0);
    EXPECT_GE(l["k"].get<int64_t>(), 1);
  }
  EXPECT_NEAR(same["mean_cka"].get<double>(), 1.0, 1e-6);
  EXPECT_TRUE(same["mean_inside_share"].is_null());

  // Another batching pads differently: the rows agree to fp32 rounding (padding is masked), no more.
  const json rebatched = eval::drift(base, eval::collect_representations(decoder, examples, 3, 0, 7, opts), 0.9);
  for (const auto& l : rebatched["layers"]) {
    EXPECT_NEAR(l["cka"].get<double>(), 1.0, 1e-6);
    EXPECT_LT(l["relative_displacement"].get<double>(), 1e-5) << l.dump();
  }

  // Perturb layer 1's MLP: hidden states 0 (embeddings) and 1 (after layer 0) stay, 2 and 3 move.
  for (auto& [name, tensor] : decoder.named_parameters())
    if (name == "model.layers.1.mlp.down_proj.weight")
      tensor->add_(at::randn(tensor->sizes(), at::make_generator<at::CPUGeneratorImpl>(21)) * 0.5);
  const auto after = eval::collect_representations(decoder, examples, 5, 0, 7, opts);
  const json moved = eval::drift(base, after, 0.9);
  for (int i : {0, 1}) {
    EXPECT_NEAR(moved["layers"][i]["cka"].get<double>(), 1.0, 1e-6) << i;
    EXPECT_TRUE(moved["layers"][i]["inside_share"].is_null()) << i;
  }
  for (int i : {2, 3}) {
    const auto& l = moved["layers"][i];
    EXPECT_LT(l["cka"].get<double>(), 0.9999) << l.dump();
    EXPECT_GT(l["relative_displacement"].get<double>(), 1e-3) << l.dump();
    EXPECT_GT(l["inside_share"].get<double>(), 0.0) << l.dump();
    EXPECT_LE(l["inside_share"].get<double>(), 1.0 + 1e-9) << l.dump();
  }
  EXPECT_LT(moved["mean_cka"].get<double>(), 1.0);

  // Another seed samples other tokens: comparing them is refused, not silently unpaired.
  const auto other = eval::collect_representations(decoder, examples, 4, 0, 8, opts);
  EXPECT_FALSE(other.tokens.equal(base.tokens));
  EXPECT_THROW(eval::drift(base, other, 0.9), Error);
  EXPECT_THROW(eval::drift(base, base, 1.5), Error);
  EXPECT_THROW(eval::collect_representations(decoder, {}, 4, 0, 7, opts), Error);
}

TEST(DriftFixture, SaveLoadRoundTrip) {
  const auto decoder = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  const auto examples = fixture_examples(6, 4);
  eval::CollectOptions all;
  all.max_tokens = 0;  // every token but the first of each sequence
  const auto reps = eval::collect_representations(decoder, examples, 4, 0, 1, all);
  EXPECT_EQ(reps.tokens.size(0), reps.eligible_tokens);
  TempDir dir;
  const fs::path file = dir.path / "cache" / "base_representations.safetensors";
  eval::save_representations(reps, file);
  const auto loaded = eval::load_representations(file);
  ASSERT_EQ(loaded.layers.size(), reps.layers.size());
  for (size_t i = 0; i < reps.layers.size(); ++i) EXPECT_TRUE(loaded.layers[i].equal(reps.layers[i])) << i;
  EXPECT_TRUE(loaded.tokens.equal(reps.tokens));
  EXPECT_TRUE(loaded.token_ids.equal(reps.token_ids));
  EXPECT_EQ(loaded.examples, reps.examples);
  EXPECT_EQ(loaded.eligible_tokens, reps.eligible_tokens);
  EXPECT_EQ(loaded.model, reps.model);
  EXPECT_NEAR(eval::drift(reps, loaded, 0.9)["mean_cka"].get<double>(), 1.0, 1e-6);

  // A safetensors file from somewhere else is refused with its name in the message.
  const fs::path foreign = dir.path / "foreign.safetensors";
  io::save_safetensors(foreign, {{"layer.0", at::zeros({2, 2})}}, {{"producer", "someone else"}});
  try {
    eval::load_representations(foreign);
    FAIL() << "a foreign file was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("foreign.safetensors"), std::string::npos) << e.what();
  }
}
