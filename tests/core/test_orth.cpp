// The `orth` fine-tuning method (include/sparsecl/train/orth.h): GPM's basis extension against bases
// known by construction, InfLoRA's A, the GPM statistic (padding excluded), the project / init modes
// keeping every trained A orthogonal to the earlier basis (max |A U| <= 1e-5, the criterion),
// the O-LoRA penalty against a hand computation, the two-stage hand-over through orth_bases.safetensors,
// the gradients / deltas basis kinds, and the method state round trip + resume. On the llama3 fixture.
// OrthMethodLong (SPARSECL_LONG=1) runs code -> math on models/smollm2-135m-instruct.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "sparsecl/common/error.h"
#include "sparsecl/config/options.h"
#include "sparsecl/config/schema.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/lora.h"
#include "sparsecl/text/tokenizer.h"
#include "sparsecl/train/methods.h"
#include "sparsecl/train/orth.h"
#include "sparsecl/train/trainer.h"

#include "test_support.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using nlohmann::json;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA);
const fs::path kModel = kData / "models" / "llama3";

using testing_support::TempDir;

// Pre-tokenized examples (vocab 512) of varying length with a learnable next-token pattern; `shift`
// changes the pattern, so two "tasks" differ.
std::vector<data::Example> fixture_examples(int64_t count, uint64_t seed, int64_t shift = 0) {
  std::mt19937_64 rng(seed);
  std::vector<data::Example> out;
  for (int64_t i = 0; i < count; ++i) {
    data::Example e;
    const int64_t len = 8 + static_cast<int64_t>(data::uniform_below(rng, 16));
    for (int64_t t = 0; t < len; ++t) {
      const int64_t prev = t == 0 ? 3 + static_cast<int64_t>(data::uniform_below(rng, 50)) + shift : e.ids.back();
      e.ids.push_back(data::uniform_below(rng, 4) == 0 ? 3 + static_cast<int64_t>(data::uniform_below(rng, 500))
                                                       : (prev * 7 + 1 + shift) % 509 + 3);
      e.loss_mask.push_back(t >= 3 ? 1 : 0);
    }
    out.push_back(std::move(e));
  }
  return out;
}

model::LoraConfig fixture_lora() {
  model::LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.dropout = 0.0;
  c.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return c;
}

train::OrthOptions fixture_orth(train::OrthMode mode, train::OrthBasis basis = train::OrthBasis::Gpm,
                                int64_t stage_index = 0) {
  train::OrthOptions o;
  o.stage_index = stage_index;
  o.mode = mode;
  o.basis = basis;
  o.energy = 0.9;
  o.lambda = 0.5;
  o.basis_samples = 8;
  o.batch_size = 3;
  o.seed = 5;
  return o;
}

train::TrainOptions fixture_options(int64_t steps) {
  train::TrainOptions o;
  o.steps = steps;
  o.batch_size = 3;
  o.grad_accum = 1;
  o.lr = 1e-2;
  o.warmup_steps = 0;
  o.weight_decay = 0.01;
  o.seed = 7;
  o.progress = false;
  return o;
}

train::RunInfo fixture_info() { return {json{{"fixture", true}}, "00000000000000aa", kModel.string()}; }

model::Decoder load_model() { return model::Decoder::load(kModel, at::kFloat, at::kCPU); }

// A random orthonormal basis [n, k] (fp64) from a seeded generator.
at::Tensor random_orthonormal(int64_t n, int64_t k, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return std::get<0>(at::linalg_qr(at::randn({n, k}, gen, at::kDouble)));
}

double orthonormality_error(const at::Tensor& U) {
  const at::Tensor u = U.to(at::kDouble);
  return (u.t().mm(u) - at::eye(u.size(1), at::kDouble)).abs().max().item<double>();
}

// Largest |A U| over every adapted module of the decoder's newest adapter.
double max_overlap(model::Decoder& dec, const std::map<std::string, at::Tensor>& bases, int64_t expect_modules = 21) {
  double worst = 0.0;
  int64_t checked = 0;
  for (auto& [name, lin] : dec.named_linears()) {
    auto it = bases.find(name);
    if (it == bases.end() || lin->lora.empty()) continue;
    worst = std::max(worst, lin->lora.back().A.detach().mm(it->second).abs().max().item<double>());
    ++checked;
  }
  EXPECT_EQ(checked, expect_modules) << "every adapted layer should have a basis";
  return worst;
}

// Stage 1: orth training + output + finish_stage (the basis) + merge; returns the method's bases.
std::map<std::string, at::Tensor> run_stage(model::Decoder& dec, train::OrthMethod& method,
                                            const std::vector<data::Example>& examples, const fs::path& dir,
                                            int64_t steps) {
  train::train(dec, method, examples, fixture_options(steps), dir, fixture_info());
  method.finish_stage(dec, examples, dir);
  method.merge_into_base(dec);
  return method.bases();
}

}  // namespace

// ---- pure linear algebra -----------------------------------------------------------------------------

TEST(OrthMethod, GpmExtendFindsAKnownSubspaceWithExactEnergyThresholds) {
  // C = Q diag(100, 25, 9, 4, 1) Q^T in 12 dimensions: the energy rule's k is known exactly.
  const at::Tensor Q = random_orthonormal(12, 5, 1);
  const at::Tensor lambda = at::tensor(std::vector<double>{100, 25, 9, 4, 1}, at::kDouble);
  const at::Tensor C = Q.mm(at::diag(lambda)).mm(Q.t()).to(at::kFloat);  // [12, 12]
  const std::vector<std::pair<double, int64_t>> expect = {
      {0.5, 1}, {0.71, 1}, {0.72, 2}, {0.8, 2}, {0.95, 3}, {0.99, 4}, {1.0, 5}};  // cumulative: .7194 .899 .964 .993 1
  int64_t last_k = 0;
  for (const auto& [energy, k] : expect) {
    const at::Tensor U = train::gpm_extend(at::Tensor(), C, energy);
    ASSERT_EQ(U.dim(), 2);
    EXPECT_EQ(U.size(0), 12);
    EXPECT_EQ(U.size(1), k) << "energy " << energy;
    EXPECT_EQ(U.scalar_type(), at::kFloat);
    EXPECT_LT(orthonormality_error(U), 1e-5);
    EXPECT_GE(U.size(1), last_k);  // monotone in the threshold
    last_k = U.size(1);
    // U spans the top-k eigenvectors: Q[:, :k] lies in span(U).
    const at::Tensor Qk = Q.narrow(1, 0, k), Ud = U.to(at::kDouble);
    EXPECT_LT((Qk - Ud.mm(Ud.t().mm(Qk))).abs().max().item<double>(), 1e-5) << "energy " << energy;
  }
}

TEST(OrthMethod, GpmExtendOfDataInAThreeDimensionalSubspace) {
  // 200 samples lying exactly in span(S), S [16, 3]: even at energy 1 the basis is 3-dimensional and spans S.
  const at::Tensor S = random_orthonormal(16, 3, 2);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor X = at::randn({200, 3}, gen, at::kDouble).mm(S.t()).to(at::kFloat);  // [200, 16]
  const at::Tensor C = X.t().mm(X);
  for (double energy : {0.999, 1.0}) {
    const at::Tensor U = train::gpm_extend(at::Tensor(), C, energy);
    ASSERT_EQ(U.size(1), 3) << "energy " << energy;
    EXPECT_LT(orthonormality_error(U), 1e-5);
    const at::Tensor Ud = U.to(at::kDouble);
    EXPECT_LT((S - Ud.mm(Ud.t().mm(S))).abs().max().item<double>(), 1e-5);
  }
  // Extending a basis that already spans the data adds nothing; one that spans part of it adds the rest.
  const at::Tensor full = train::gpm_extend(S.to(at::kFloat), C, 1.0);
  EXPECT_EQ(full.size(1), 3);
  const at::Tensor part = S.narrow(1, 0, 1).to(at::kFloat).contiguous();
  const at::Tensor grown = train::gpm_extend(part, C, 1.0);
  ASSERT_EQ(grown.size(1), 3);
  EXPECT_TRUE(at::equal(grown.narrow(1, 0, 1), part));  // the old columns are kept as they are
  EXPECT_LT(orthonormality_error(grown), 1e-5);
}

TEST(OrthMethod, GpmExtendCountsWhatTheOldBasisAlreadyCaptures) {
  const at::Tensor Q = random_orthonormal(10, 3, 4);
  const at::Tensor C = Q.mm(at::diag(at::tensor(std::vector<double>{100, 25, 9}, at::kDouble))).mm(Q.t());
  // U holds the top direction (100 of 134): energy 0.8 (107.2) needs one more, the 25 one.
  const at::Tensor U1 = Q.narrow(1, 0, 1).to(at::kFloat).contiguous();
  const at::Tensor U = train::gpm_extend(U1, C, 0.8);
  ASSERT_EQ(U.size(1), 2);
  const at::Tensor q2 = Q.narrow(1, 1, 1), Ud = U.to(at::kDouble);
  EXPECT_LT((q2 - Ud.mm(Ud.t().mm(q2))).abs().max().item<double>(), 1e-5);
  // An unrelated old direction captures nothing: energy 0.7 then needs the top direction.
  const at::Tensor other = random_orthonormal(10, 1, 5);
  const at::Tensor unrelated = other - Q.mm(Q.t().mm(other));
  const at::Tensor U2 = train::gpm_extend((unrelated / unrelated.norm()).to(at::kFloat), C, 0.7);
  EXPECT_EQ(U2.size(1), 2);
  EXPECT_LT(orthonormality_error(U2), 1e-5);
  EXPECT_THROW(train::gpm_extend(U1, C, 0.0), Error);
  EXPECT_THROW(train::gpm_extend(U1, C.narrow(0, 0, 5), 0.9), Error);
}

TEST(OrthMethod, InfloraDownSpansTheTopResidualDirections) {
  const at::Tensor Q = random_orthonormal(12, 4, 6);
  const at::Tensor C = Q.mm(at::diag(at::tensor(std::vector<double>{100, 25, 9, 4}, at::kDouble))).mm(Q.t());
  const at::Tensor U = Q.narrow(1, 0, 1).to(at::kFloat).contiguous();  // the old task took the top direction
  const at::Tensor A = train::inflora_down(U, C, 2);                   // [2, 12]
  ASSERT_EQ(A.sizes(), (std::vector<int64_t>{2, 12}));
  EXPECT_LE(A.mm(U).abs().max().item<double>(), 1e-6);
  // Rows: orthogonal, norm 1/sqrt(3), spanning the next two eigenvectors (25, 9).
  const at::Tensor G = A.to(at::kDouble).mm(A.to(at::kDouble).t()) * 3.0;
  EXPECT_LT((G - at::eye(2, at::kDouble)).abs().max().item<double>(), 1e-5);
  const at::Tensor rows = (A.to(at::kDouble) * std::sqrt(3.0)).t();  // [12, 2] orthonormal
  const at::Tensor want = Q.narrow(1, 1, 2);
  EXPECT_LT((want - rows.mm(rows.t().mm(want))).abs().max().item<double>(), 1e-5);
  // Rank 10 still fits outside one direction even where C has no energy; rank 12 does not.
  const at::Tensor A10 = train::inflora_down(U, C, 10);
  EXPECT_LE(A10.mm(U).abs().max().item<double>(), 1e-6);
  EXPECT_THROW(train::inflora_down(U, C, 12), Error);
}

// ---- statistics --------------------------------------------------------------------------------------

TEST(OrthMethod, InputCovariancesCountRealTokensOnly) {
  auto dec = load_model();
  const auto examples = fixture_examples(5, 11);  // different lengths: the batch is padded
  const std::vector<std::string> modules = {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                                            "model.layers.2.mlp.down_proj"};
  const auto cov = train::input_covariances(dec, modules, examples, 5, 0);
  ASSERT_EQ(cov.size(), 3u);
  EXPECT_TRUE(cov.at(modules[0]).is_same(cov.at(modules[1])));  // q and k share their input
  // Reference: each example alone (no padding); the down_proj input is the MLP intermediate.
  at::Tensor want = at::zeros({176, 176}, at::kDouble);
  at::NoGradGuard no_grad;
  for (const auto& e : examples) {
    model::ForwardOptions opt;
    opt.mlp_act = true;
    model::ForwardInput in;
    in.input_ids = at::tensor(e.ids, at::kLong).unsqueeze(0);  // [1, T]
    auto out = dec.forward(in, opt);
    const at::Tensor h = out.mlp_act[2][0].to(at::kDouble);  // [T, I]
    want += h.t().mm(h);
  }
  const at::Tensor got = cov.at(modules[2]).to(at::kDouble);
  EXPECT_LT((got - want).abs().max().item<double>(), 1e-4 * want.abs().max().item<double>());
  // One layer per pass (a budget below one layer's statistics) gives the same covariances.
  const auto chunked = train::input_covariances(dec, modules, examples, 5, 0, /*memory_budget=*/1);
  for (const auto& m : modules)
    EXPECT_LT((chunked.at(m) - cov.at(m)).abs().max().item<double>(), 1e-6 * cov.at(m).abs().max().item<double>()) << m;
}

// ---- the method over two stages ------------------------------------------------------------------------

// Stage 1 (project, gpm) -> bases on disk -> stage 2 reads them; every A of stage 2 stays orthogonal to
// them during training; stage 2's bases contain stage 1's span.
TEST(OrthMethod, ProjectModeTwoStagesEndToEnd) {
  TempDir s1("s1"), s2("s2");
  const auto task1 = fixture_examples(12, 21, 0), task2 = fixture_examples(12, 22, 101);
  auto dec = load_model();
  train::OrthMethod stage1(fixture_lora(), fixture_orth(train::OrthMode::Project));
  const auto U1 = run_stage(dec, stage1, task1, s1.path, 3);
  ASSERT_EQ(U1.size(), 21u);
  EXPECT_TRUE(fs::exists(s1.path / "orth_bases.safetensors"));
  EXPECT_TRUE(fs::exists(s1.path / "adapter_model.safetensors"));
  const json info = json::parse(std::ifstream(s1.path / "orth.json"));
  EXPECT_EQ(info["basis"], "gpm");
  EXPECT_EQ(info["modules"].size(), 21u);
  for (const auto& [m, U] : U1) {
    EXPECT_LT(orthonormality_error(U), 1e-5) << m;
    EXPECT_GE(info["modules"][m]["energy"].get<double>(), 0.9 - 1e-9) << m;
    EXPECT_EQ(info["modules"][m]["k"].get<int64_t>(), U.size(1)) << m;
    EXPECT_LT(U.size(1), U.size(0)) << m;  // room is left for the next task
  }
  // The saved energy is what the statistic says: trace(U^T C U) / trace(C) >= energy for stage 1's data.
  {
    auto before = load_model();  // the statistic is of the model after stage 1; re-derive it
    model::attach_lora(before, model::LoraAdapter::load(s1.path));
    const std::string m = "model.layers.0.mlp.down_proj";
    std::vector<data::Example> all = task1;  // basis_samples 8 of 12: a subsample, so only a lower bound holds
    const auto cov = train::input_covariances(before, {m}, all, 4, 0);
    const at::Tensor C = cov.at(m).to(at::kDouble), U = U1.at(m).to(at::kDouble);
    EXPECT_GT((C.mm(U) * U).sum().item<double>() / C.trace().item<double>(), 0.5);
  }

  train::OrthMethod stage2(fixture_lora(), fixture_orth(train::OrthMode::Project, train::OrthBasis::Gpm, 1), {}, s1.path);
  ASSERT_EQ(stage2.bases().size(), U1.size());
  for (const auto& [m, U] : U1) EXPECT_TRUE(at::equal(stage2.bases().at(m), U)) << m;
  const auto loaded = train::load_orth_bases(s1.path);
  EXPECT_EQ(loaded.size(), U1.size());
  const auto r = train::train(dec, stage2, task2, fixture_options(4), s2.path, fixture_info());
  EXPECT_TRUE(r.finished);
  EXPECT_LE(max_overlap(dec, U1), 1e-5);
  // ... and training did happen: the adapter moved.
  const auto adapter = model::LoraAdapter::load(s2.path);
  for (const auto& [m, ab] : adapter.weights) EXPECT_GT(ab.second.abs().max().item<float>(), 0.0f) << m;
  // Without the projection, the same training leaves the old subspace (the check above can fail).
  {
    auto plain = load_model();
    train::OrthMethod p1(fixture_lora(), fixture_orth(train::OrthMode::Project));
    TempDir x("plain"), y("plain2");
    run_stage(plain, p1, task1, x.path, 3);
    train::LoraMethod lora(fixture_lora(), 5);
    train::train(plain, lora, task2, fixture_options(4), y.path, fixture_info());
    EXPECT_GT(max_overlap(plain, U1), 1e-3);
  }

  stage2.finish_stage(dec, task2, s2.path);
  const auto U2 = train::load_orth_bases(s2.path);
  ASSERT_EQ(U2.size(), U1.size());
  for (const auto& [m, u1] : U1) {
    const at::Tensor u2 = U2.at(m);
    EXPECT_GE(u2.size(1), u1.size(1)) << m;
    EXPECT_LT(orthonormality_error(u2), 1e-5) << m;
    // span(U1) inside span(U2): every singular value of U2^T U1 is 1.
    const at::Tensor sv = at::linalg_svdvals(u2.to(at::kDouble).t().mm(u1.to(at::kDouble)));
    EXPECT_LT((sv - 1.0).abs().max().item<double>(), 1e-5) << m;
  }
  // The earlier As travel along: stage 2's file stacks both stages' A [r, in] per module.
  const auto prev = io::load_safetensors(s2.path / "orth_previous_A.safetensors");
  ASSERT_EQ(prev.size(), 21u);
  EXPECT_EQ(prev.begin()->second.size(0), 8);
}

TEST(OrthMethod, InitModeFreezesAnOrthogonalAAndTrainsB) {
  TempDir s1("i1"), s2("i2");
  const auto task1 = fixture_examples(12, 31, 0), task2 = fixture_examples(12, 32, 77);
  auto dec = load_model();
  train::OrthMethod stage1(fixture_lora(), fixture_orth(train::OrthMode::Init), task1);
  const auto U1 = run_stage(dec, stage1, task1, s1.path, 3);
  ASSERT_EQ(U1.size(), 21u);

  train::OrthMethod stage2(fixture_lora(), fixture_orth(train::OrthMode::Init, train::OrthBasis::Gpm, 1), task2, s1.path);
  auto params = stage2.setup(dec);
  ASSERT_EQ(params.size(), 21u);  // only the Bs
  for (const auto& [name, p] : params) EXPECT_NE(name.find(".lora_B."), std::string::npos) << name;
  std::map<std::string, at::Tensor> A0;
  for (auto& [name, lin] : dec.named_linears()) {
    const at::Tensor& A = lin->lora.back().A;
    EXPECT_FALSE(A.requires_grad()) << name;
    const at::Tensor G = A.mm(A.t()) * 3.0;  // rows orthogonal, of norm 1/sqrt(3)
    EXPECT_LT((G - at::eye(A.size(0))).abs().max().item<double>(), 1e-4) << name;
    A0[name] = A.clone();
  }
  EXPECT_LE(max_overlap(dec, U1), 1e-5);
  // Train it for real (a fresh model state: merge stage 1 and attach via the trainer's setup call).
  for (auto& [name, lin] : dec.named_linears()) lin->lora.pop_back();
  train::OrthMethod trained(fixture_lora(), fixture_orth(train::OrthMode::Init, train::OrthBasis::Gpm, 1), task2, s1.path);
  train::train(dec, trained, task2, fixture_options(4), s2.path, fixture_info());
  EXPECT_LE(max_overlap(dec, U1), 1e-5);
  for (auto& [name, lin] : dec.named_linears()) {
    EXPECT_TRUE(at::equal(lin->lora.back().A, A0.at(name))) << name;  // frozen, and the same init
    EXPECT_GT(lin->lora.back().B.abs().max().item<float>(), 0.0f) << name;
  }
}

TEST(OrthMethod, RegularizeAddsTheOLoraPenalty) {
  TempDir s1("r1");
  const auto task1 = fixture_examples(9, 41, 0), task2 = fixture_examples(9, 42, 55);
  auto dec = load_model();
  train::OrthMethod stage1(fixture_lora(), fixture_orth(train::OrthMode::Regularize));
  run_stage(dec, stage1, task1, s1.path, 2);
  {  // the first stage has no earlier A: no penalty
    auto fresh = load_model();
    train::OrthMethod first(fixture_lora(), fixture_orth(train::OrthMode::Regularize));
    first.setup(fresh);
    EXPECT_FALSE(first.extra_loss(fresh, 0).defined());
  }
  train::OrthMethod stage2(fixture_lora(), fixture_orth(train::OrthMode::Regularize, train::OrthBasis::Gpm, 1), {}, s1.path);
  auto params = stage2.setup(dec);
  ASSERT_EQ(params.size(), 42u);
  const at::Tensor loss = stage2.extra_loss(dec, 0);
  ASSERT_TRUE(loss.defined());
  // By hand: lambda * sum over modules of sum |A_1 A_2^T| with A_1 from stage 1's adapter.
  const auto adapter1 = model::LoraAdapter::load(s1.path);
  double want = 0.0;
  for (auto& [name, lin] : dec.named_linears()) {
    const at::Tensor A1 = adapter1.weights.at(name).first.to(at::kDouble), A2 = lin->lora.back().A.detach().to(at::kDouble);
    want += A1.mm(A2.t()).abs().sum().item<double>();
  }
  want *= 0.5;
  EXPECT_NEAR(loss.item<double>(), want, 1e-5 * want);
  EXPECT_GT(want, 0.0);
  loss.backward();
  for (auto& [name, lin] : dec.named_linears()) {
    ASSERT_TRUE(lin->lora.back().A.grad().defined()) << name;
    EXPECT_GT(lin->lora.back().A.grad().abs().max().item<float>(), 0.0f) << name;
  }
  // Training with the penalty lowers |A_1 A_2^T| relative to plain LoRA from the same init. (Adam moves
  // every element by ~lr per step: with a step as large as |A_1 A_2^T| itself, the L1 term oscillates.)
  for (auto& [name, lin] : dec.named_linears()) lin->lora.pop_back();
  TempDir s2("r2"), s3("r3");
  auto o = fixture_options(8);
  o.lr = 2e-3;
  train::OrthMethod reg(fixture_lora(), fixture_orth(train::OrthMode::Regularize, train::OrthBasis::Gpm, 1), {}, s1.path);
  train::train(dec, reg, task2, o, s2.path, fixture_info());
  const double with = reg.extra_loss(dec, 0).item<double>() / 0.5;
  for (auto& [name, lin] : dec.named_linears()) lin->lora.pop_back();
  auto no_penalty = fixture_orth(train::OrthMode::Regularize, train::OrthBasis::Gpm, 1);
  no_penalty.lambda = 0.0;
  train::OrthMethod plain(fixture_lora(), no_penalty, {}, s1.path);
  train::train(dec, plain, task2, o, s3.path, fixture_info());
  double without = 0.0;
  for (auto& [name, lin] : dec.named_linears())
    without += adapter1.weights.at(name).first.mm(lin->lora.back().A.detach().t()).abs().sum().item<double>();
  EXPECT_LT(with, 0.75 * without);  // 5.5 vs 10.4 here
}

TEST(OrthMethod, DeltaAndGradientBasesAreOrthonormalAndSized) {
  const auto task = fixture_examples(9, 51, 0);
  for (auto kind : {train::OrthBasis::Deltas, train::OrthBasis::Gradients}) {
    SCOPED_TRACE(train::orth_basis_name(kind));
    TempDir dir("kind");
    auto dec = load_model();
    train::OrthMethod method(fixture_lora(), fixture_orth(train::OrthMode::Project, kind));
    train::train(dec, method, task, fixture_options(3), dir.path, fixture_info());
    const auto adapter = model::LoraAdapter::load(dir.path);
    method.finish_stage(dec, task, dir.path);
    const auto bases = train::load_orth_bases(dir.path);
    ASSERT_EQ(bases.size(), 21u);
    for (auto& [name, lin] : dec.named_linears()) {
      const at::Tensor U = bases.at(name);
      const int64_t in = lin->weight.size(1), out = lin->weight.size(0);
      EXPECT_EQ(U.size(0), in) << name;
      EXPECT_GE(U.size(1), 1) << name;
      EXPECT_LE(U.size(1), kind == train::OrthBasis::Deltas ? 4 : std::min(in, out)) << name;
      EXPECT_LT(orthonormality_error(U), 1e-5) << name;
      if (kind == train::OrthBasis::Deltas) {
        // The energy rule on D = scale B A: what U leaves out is at most 10% of ||D||^2.
        const auto& [A, B] = adapter.weights.at(name);
        const at::Tensor D = B.to(at::kDouble).mm(A.to(at::kDouble)), Ud = U.to(at::kDouble);
        const double rest = (D - D.mm(Ud).mm(Ud.t())).pow(2).sum().item<double>();
        EXPECT_LE(rest, 0.1 * D.pow(2).sum().item<double>() + 1e-12) << name;
      }
    }
    // The gradient pass leaves the model as it was: no base weight requires grad afterwards.
    for (auto& [name, p] : dec.named_parameters()) EXPECT_FALSE(p->requires_grad()) << name;
    if (kind == train::OrthBasis::Gradients) {
      // One layer per pass (its own forward + backward each) gives the same bases.
      TempDir again("kind_chunked");
      for (const char* f : {"adapter_config.json", "adapter_model.safetensors"}) fs::copy_file(dir.path / f, again.path / f);
      auto o = fixture_orth(train::OrthMode::Project, kind);
      o.memory_budget = 1;
      train::OrthMethod chunked(fixture_lora(), o);
      chunked.finish_stage(dec, task, again.path);
      const auto other = train::load_orth_bases(again.path);
      for (const auto& [name, U] : bases) {
        ASSERT_EQ(other.at(name).size(1), U.size(1)) << name;
        const at::Tensor sv = at::linalg_svdvals(U.to(at::kDouble).t().mm(other.at(name).to(at::kDouble)));
        EXPECT_LT((sv - 1.0).abs().max().item<double>(), 1e-4) << name;
      }
    }
  }
}

// The method state (bases, earlier As, InfLoRA's frozen A) survives a checkpoint: save_state/load_state
// round trip, and 4 steps in one go == 2 steps + resume 2.
TEST(OrthMethod, StateRoundTripAndResume) {
  TempDir s1("st1"), full("full"), split("split"), state("state");
  const auto task1 = fixture_examples(9, 61, 0), task2 = fixture_examples(9, 62, 33);
  {
    auto dec = load_model();
    train::OrthMethod stage1(fixture_lora(), fixture_orth(train::OrthMode::Project));
    run_stage(dec, stage1, task1, s1.path, 2);
  }
  auto after_stage1 = [&] {  // a fresh process rebuilding the model after stage 1
    auto d = load_model();
    train::apply_stage_output(d, "lora", s1.path);
    return d;
  };
  {
    auto a = after_stage1();
    train::OrthMethod m(fixture_lora(), fixture_orth(train::OrthMode::Init, train::OrthBasis::Gpm, 1), task2, s1.path);
    m.setup(a);
    m.save_state(state.path);
    auto b = after_stage1();
    train::OrthMethod n(fixture_lora(), fixture_orth(train::OrthMode::Init), task2);  // no previous stage
    n.setup(b);
    std::map<std::string, at::Tensor> want;
    for (auto& [name, lin] : a.named_linears()) want[name] = lin->lora.back().A;
    int64_t differ = 0;
    for (auto& [name, lin] : b.named_linears()) differ += at::equal(lin->lora.back().A, want.at(name)) ? 0 : 1;
    EXPECT_GT(differ, 0);  // without the basis, InfLoRA picks other directions
    n.load_state(state.path);
    ASSERT_EQ(n.bases().size(), m.bases().size());
    for (const auto& [k, U] : m.bases()) EXPECT_TRUE(at::equal(n.bases().at(k), U)) << k;
    ASSERT_EQ(n.previous_A().size(), m.previous_A().size());
    for (auto& [name, lin] : b.named_linears()) EXPECT_TRUE(at::equal(lin->lora.back().A, want.at(name))) << name;
    // Another mode's checkpoint is refused.
    auto c = after_stage1();
    train::OrthMethod other(fixture_lora(), fixture_orth(train::OrthMode::Project, train::OrthBasis::Gpm, 1), {}, s1.path);
    other.setup(c);
    EXPECT_THROW(other.load_state(state.path), Error);
  }
  {
    auto a = after_stage1();
    train::OrthMethod m(fixture_lora(), fixture_orth(train::OrthMode::Project, train::OrthBasis::Gpm, 1), {}, s1.path);
    train::train(a, m, task2, fixture_options(4), full.path, fixture_info());
  }
  {
    auto a = after_stage1();
    train::OrthMethod m(fixture_lora(), fixture_orth(train::OrthMode::Project, train::OrthBasis::Gpm, 1), {}, s1.path);
    auto o = fixture_options(4);
    o.stop_after = 2;
    train::train(a, m, task2, o, split.path, fixture_info());
    EXPECT_TRUE(fs::exists(split.path / "checkpoints" / "step-00000002" / "orth_state.safetensors"));
  }
  {
    auto a = after_stage1();
    train::OrthMethod m(fixture_lora(), fixture_orth(train::OrthMode::Project, train::OrthBasis::Gpm, 1), {}, s1.path);
    auto o = fixture_options(4);
    o.resume = true;
    train::train(a, m, task2, o, split.path, fixture_info());
  }
  const auto wa = model::LoraAdapter::load(full.path), wb = model::LoraAdapter::load(split.path);
  ASSERT_EQ(wa.weights.size(), 21u);
  for (const auto& [m, ab] : wa.weights) {
    EXPECT_TRUE(at::equal(ab.first, wb.weights.at(m).first)) << m;
    EXPECT_TRUE(at::equal(ab.second, wb.weights.at(m).second)) << m;
  }
}

TEST(OrthMethod, ConfigAndBadInput) {
  config::Config cfg(config::schema());
  cfg.set("orth.mode", std::string("regularize"));
  cfg.set("orth.basis", std::string("deltas"));
  cfg.set("orth.energy", 0.8);
  cfg.set("orth.basis_samples", int64_t{16});
  train::StageContext ctx;
  ctx.seed = 3;
  auto method = train::make_orth_method(cfg, ctx);
  EXPECT_EQ(method->name(), "orth");
  auto* orth = dynamic_cast<train::OrthMethod*>(method.get());
  ASSERT_NE(orth, nullptr);
  EXPECT_EQ(orth->options().mode, train::OrthMode::Regularize);
  EXPECT_EQ(orth->options().basis, train::OrthBasis::Deltas);
  EXPECT_DOUBLE_EQ(orth->options().energy, 0.8);
  EXPECT_EQ(orth->options().basis_samples, 16);
  // init without examples, and a previous stage without bases: errors that say what is missing.
  cfg.set("orth.mode", std::string("init"));
  EXPECT_THROW(train::make_orth_method(cfg, ctx), Error);
  TempDir empty("empty");
  cfg.set("orth.mode", std::string("project"));
  ctx.previous = {empty.path};
  try {
    train::make_orth_method(cfg, ctx);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("orth_bases.safetensors"), std::string::npos) << e.what();
  }
  EXPECT_THROW(train::parse_orth_mode("sideways"), Error);
  EXPECT_THROW(train::parse_orth_basis("pca"), Error);
}

// ---- the real default model (SPARSECL_LONG=1) ----------------------------------------------------------

// code -> math with orth (project, gpm) on SmolLM2-135M-Instruct: the math held-out loss before and after
// stage 2, the tokens/s of both stages and the cost of the basis pass. Numbers go to stdout.
TEST(OrthMethodLong, SmolLM2CodeThenMath) {
  const char* on = std::getenv("SPARSECL_LONG");
  if (!on || std::string(on) != "1") GTEST_SKIP() << "set SPARSECL_LONG=1 to run";
  const fs::path root = fs::path(SPARSECL_TEST_DATA).parent_path().parent_path();
  const fs::path model_dir = root / "models" / "smollm2-135m-instruct";
  if (!fs::exists(model_dir / "config.json")) GTEST_SKIP() << model_dir << " is not there";
  auto tok = text::Tokenizer::load_if_present(model_dir);
  ASSERT_TRUE(tok);
  data::LoadOptions lo;
  lo.max_length = 256;
  lo.seed = 0;
  const auto code = data::load_jsonl(root / "data" / "code" / "train.jsonl", tok.get(), lo);
  const auto math = data::load_jsonl(root / "data" / "math" / "train.jsonl", tok.get(), lo);
  data::LoadOptions ho = lo;
  ho.shuffle = false;
  ho.max_samples = 32;
  const auto heldout = data::load_jsonl(root / "data" / "math" / "heldout.jsonl", tok.get(), ho);
  const int64_t pad = data::pad_id_for(tok.get());

  config::Config cfg(config::schema());
  cfg.set("orth.basis_samples", int64_t{8});
  cfg.set("train.batch_size", int64_t{2});
  train::TrainOptions o;
  o.steps = 15;
  o.batch_size = 2;
  o.lr = 2e-4;
  o.warmup_steps = 1;
  o.seed = 0;
  o.pad_id = pad;
  o.progress = false;
  TempDir s1("long1"), s2("long2");
  auto dec = model::Decoder::load(model_dir, at::kFloat, at::kCPU);
  train::StageContext ctx;
  ctx.pad_id = pad;
  ctx.examples = &code;
  auto m1 = train::make_orth_method(cfg, ctx);
  const auto r1 = train::train(dec, *m1, code, o, s1.path, {json::object(), "long", model_dir.string()});
  const auto t0 = std::chrono::steady_clock::now();
  m1->finish_stage(dec, code, s1.path);
  const double basis_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  m1->merge_into_base(dec);
  const double before = train::heldout_loss(dec, heldout, 4, pad).loss;

  ctx.examples = &math;
  ctx.previous = {s1.path};
  auto m2 = train::make_orth_method(cfg, ctx);
  const auto r2 = train::train(dec, *m2, math, o, s2.path, {json::object(), "long", model_dir.string()});
  const double after = train::heldout_loss(dec, heldout, 4, pad).loss;
  const auto bases = train::load_orth_bases(s1.path);
  const double overlap = max_overlap(dec, bases, 7 * dec.config().num_hidden_layers);
  int64_t dims = 0, total_in = 0;
  for (const auto& [m, U] : bases) dims += U.size(1), total_in += U.size(0);
  std::printf("[orth long] stage 1 (code): %.1f tok/s, last loss %.4f; basis pass %.1f s, %lld of %lld input "
              "directions kept\n[orth long] math held-out loss before stage 2 %.4f, after %.4f; stage 2 %.1f tok/s; "
              "max |A U| %.2e\n",
              r1.tokens_per_s, r1.last_loss, basis_s, static_cast<long long>(dims), static_cast<long long>(total_in),
              before, after, r2.tokens_per_s, overlap);
  EXPECT_LE(overlap, 1e-5);
  EXPECT_LT(after, before);
}

