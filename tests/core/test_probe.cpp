// The probe (include/sparsecl/probe/probe.h) against obviously-right recomputations: on the fixture
// models (random weights, {"ids"} records, no tokenizer), mean_abs / freq / per-sequence sums / the
// token reservoir / top-K sets / IoU equal what plain tensor code and std::sort give from the decoder's
// own mlp_act outputs for the same batches; the permutation null behaves (identical domains -> IoU 1 and
// p = 1, separated domains -> small p); gradient overlap equals autograd on the same loss and leaves
// requires_grad as it was; run_probe writes the documented files. The SmolLM2 run on the four real
// domains is opt-in here (SPARSECL_PROBE_SMOLLM2=1) and is tests/python/test_probe_smollm2.py in CI.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "sparsecl/common/error.h"
#include "sparsecl/data/dataset.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/kernels/iou.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/probe/probe.h"

#include "test_support.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using json = nlohmann::json;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA);
const fs::path kRepo = kData.parent_path().parent_path();

using testing_support::TempDir;

// `n` sequences of lengths 5..(5+n) with ids drawn from [lo, hi) (seeded).
std::vector<data::Example> id_examples(int n, int64_t lo, int64_t hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<data::Example> out(n);
  for (int i = 0; i < n; ++i) {
    const int len = 5 + (i * 7) % (n + 1);
    for (int t = 0; t < len; ++t) out[i].ids.push_back(lo + static_cast<int64_t>(rng() % (hi - lo)));
    out[i].loss_mask.assign(len, 1);
  }
  return out;
}

// Reference per-token top-k: indices sorted by (|h| desc, index asc), first k.
std::vector<int64_t> ref_topk(const float* row, int64_t I, int64_t k) {
  std::vector<int64_t> idx(I);
  for (int64_t j = 0; j < I; ++j) idx[j] = j;
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return std::fabs(row[a]) > std::fabs(row[b]); });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<int64_t> ref_top_set(const at::Tensor& score, int64_t K) {
  const at::Tensor s = score.to(at::kFloat).contiguous();
  return ref_topk(s.data_ptr<float>(), s.numel(), K);
}

double ref_iou(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  std::vector<int64_t> inter;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(inter));
  return static_cast<double>(inter.size()) / static_cast<double>(a.size() + b.size() - inter.size());
}

std::vector<int64_t> vec(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

// Per layer: the real tokens' MLP intermediates [N, I] (batch order, row-major) and each token's
// sequence, from ForwardOptions::mlp_act over the same batches the probe makes.
struct Direct {
  std::vector<at::Tensor> h;  // [N, I] per layer, float32
  std::vector<int64_t> seq;   // [N]
};

Direct direct_activations(const model::Decoder& dec, const std::vector<data::Example>& ex, int64_t batch_size) {
  at::NoGradGuard ng;
  Direct d;
  std::vector<std::vector<at::Tensor>> parts(dec.config().num_hidden_layers);
  for (size_t s = 0; s < ex.size(); s += batch_size) {
    const size_t e = std::min(ex.size(), s + batch_size);
    const auto b = data::make_batch(ex, s, e, 0);
    model::ForwardInput in;
    in.input_ids = b.input_ids;
    if (b.num_tokens != b.input_ids.numel()) in.attention_mask = b.attention_mask;
    model::ForwardOptions opt;
    opt.logits = false;
    opt.mlp_act = true;
    const auto out = dec.forward(in, opt);
    const at::Tensor keep = b.attention_mask.reshape({-1}).to(at::kBool);  // [B*T]
    for (size_t l = 0; l < out.mlp_act.size(); ++l) {
      const at::Tensor h = out.mlp_act[l];  // [B, T, I]
      parts[l].push_back(h.reshape({-1, h.size(2)}).index({keep}).to(at::kFloat));
    }
    for (size_t r = 0; r < e - s; ++r)
      for (int64_t t = 0; t < b.lengths[r]; ++t) d.seq.push_back(static_cast<int64_t>(s + r));
  }
  for (auto& p : parts) d.h.push_back(at::cat(p).contiguous());
  return d;
}

probe::Settings small_settings() {
  probe::Settings s;
  s.top_ratio = 0.1;
  s.batch_size = 4;
  s.permutations = 50;
  s.token_pairs = 200;
  s.token_reservoir = 100000;  // larger than the token count: the reservoir holds every token in order
  s.progress = false;
  return s;
}

}  // namespace

class ProbeFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(ProbeFixture, StatisticsMatchDirectComputation) {
  auto dec = model::Decoder::load(kData / "models" / GetParam(), at::kFloat, at::kCPU);
  const int64_t I = dec.config().intermediate_size, L = dec.config().num_hidden_layers;
  const auto settings = small_settings();
  const int64_t k = probe::top_count(settings.top_ratio, I);
  const auto ex_a = id_examples(7, 3, dec.config().vocab_size, 1);
  const auto ex_b = id_examples(6, 3, dec.config().vocab_size, 2);
  std::vector<probe::DomainStats> stats = {probe::collect_domain_stats(dec, ex_a, "a", settings, 0, 11),
                                           probe::collect_domain_stats(dec, ex_b, "b", settings, 0, 12)};
  const Direct da = direct_activations(dec, ex_a, settings.batch_size);
  const Direct db = direct_activations(dec, ex_b, settings.batch_size);
  const json layers = probe::analyze(stats, settings, 5, nullptr, "");
  ASSERT_EQ(static_cast<int64_t>(layers.size()), L);

  for (int64_t l = 0; l < L; ++l) {
    std::vector<std::vector<int64_t>> sets;
    for (int which = 0; which < 2; ++which) {
      const Direct& d = which ? db : da;
      const probe::DomainStats& st = stats[which];
      const at::Tensor h = d.h[l];  // [N, I]
      const int64_t N = h.size(0);
      ASSERT_EQ(st.num_tokens, N);
      // mean_abs: plain mean of |h| (in float64, as the probe accumulates).
      const at::Tensor mean_abs = (h.abs().to(at::kDouble).sum(0) / static_cast<double>(N)).to(at::kFloat);
      EXPECT_TRUE(at::allclose(st.mean_abs(l), mean_abs, 1e-6, 1e-7)) << "layer " << l;
      // freq from per-token top-k by std::sort; the reservoir holds the same top-k sets as bitsets.
      std::vector<int64_t> counts(I, 0);
      std::vector<std::vector<int64_t>> tok_sets;
      for (int64_t t = 0; t < N; ++t) {
        tok_sets.push_back(ref_topk(h[t].contiguous().data_ptr<float>(), I, k));
        for (int64_t j : tok_sets.back()) ++counts[j];
      }
      EXPECT_EQ(vec(st.layers[l].topk_count), counts) << "layer " << l;
      ASSERT_EQ(st.layers[l].reservoir.size(0), N);
      const at::Tensor idx = at::empty({N, k}, at::kLong);
      for (int64_t t = 0; t < N; ++t)
        for (int64_t i = 0; i < k; ++i) idx[t][i] = tok_sets[t][i];
      EXPECT_TRUE(at::equal(st.layers[l].reservoir, kernels::indices_to_bitset(idx, I))) << "layer " << l;
      EXPECT_EQ(st.reservoir_seq, d.seq);
      // Per-sequence sums of |h|.
      const at::Tensor seq_ref = at::zeros({st.num_sequences, I}, at::kFloat);
      seq_ref.index_add_(0, at::tensor(d.seq, at::kLong), h.abs());
      EXPECT_TRUE(at::allclose(st.layers[l].seq_sum, seq_ref, 1e-5, 1e-6));
      // The domain set: K largest mean_abs, ties to the lower index.
      sets.push_back(ref_top_set(mean_abs, probe::top_count(settings.top_ratio, I)));
      EXPECT_EQ(layers[l]["top"][st.name].get<std::vector<int64_t>>(), sets.back()) << "layer " << l;
    }
    const json& pair = layers[l]["pairs"][0];
    EXPECT_DOUBLE_EQ(pair["iou"].get<double>(), ref_iou(sets[0], sets[1]));
    const int64_t K = probe::top_count(settings.top_ratio, I);
    EXPECT_DOUBLE_EQ(pair["iou_random"].get<double>(), static_cast<double>(K) / (2.0 * I - K));
    EXPECT_GE(pair["p_value"].get<double>(), 1.0 / 51);
    EXPECT_LE(pair["p_value"].get<double>(), 1.0);
    EXPECT_GT(layers[l]["token_overlap"]["within"]["a"]["mean"].get<double>(), 0.0);
  }
}

TEST_P(ProbeFixture, FreqScoreUsesTopkCounts) {
  auto dec = model::Decoder::load(kData / "models" / GetParam(), at::kFloat, at::kCPU);
  const int64_t I = dec.config().intermediate_size;
  auto settings = small_settings();
  settings.score = probe::Score::Freq;
  settings.token_pairs = 0;
  const auto ex = id_examples(5, 3, dec.config().vocab_size, 3);
  const auto st = probe::collect_domain_stats(dec, ex, "a", settings, 0, 1);
  const Direct d = direct_activations(dec, ex, settings.batch_size);
  const int64_t k = probe::top_count(settings.top_ratio, I);
  // Per-sequence top-k membership counts, summed, are the domain counts.
  const at::Tensor seq_counts = st.layers[0].seq_sum;  // [n, I]
  EXPECT_TRUE(at::equal(seq_counts.sum(0).to(at::kLong), st.layers[0].topk_count));
  EXPECT_EQ(st.layers[0].reservoir.size(0), 0);
  EXPECT_EQ(seq_counts.sum().item<double>(), static_cast<double>(d.h[0].size(0) * k));
  EXPECT_TRUE(at::allclose(st.freq(0), st.layers[0].topk_count.to(at::kFloat) / static_cast<float>(st.num_tokens)));
}

INSTANTIATE_TEST_SUITE_P(Models, ProbeFixture, ::testing::Values("llama3", "qwen2", "mistral", "qwen3"));

TEST(Probe, TopSetTiesGoToTheLowerIndex) {
  const at::Tensor s = at::tensor({1.0f, 3.0f, 2.0f, 3.0f, 2.0f, 0.5f});
  EXPECT_EQ(vec(probe::top_set(s, 3)), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(vec(probe::top_set(s, 1)), (std::vector<int64_t>{1}));
  EXPECT_DOUBLE_EQ(probe::set_iou(at::tensor({0, 1, 2}, at::kLong), at::tensor({2, 3, 4}, at::kLong), 8), 1.0 / 5);
  EXPECT_EQ(probe::top_count(0.05, 1536), 77);
  EXPECT_EQ(probe::top_count(1e-9, 10), 1);
  EXPECT_DOUBLE_EQ(probe::random_iou(77, 1536), 77.0 / (3072 - 77));
}

TEST(Probe, IdenticalDomainsOverlapFullyWithPValueOne) {
  auto dec = model::Decoder::load(kData / "models" / "llama3", at::kFloat, at::kCPU);
  auto settings = small_settings();
  settings.permutations = 100;
  const auto ex = id_examples(10, 3, 512, 9);
  std::vector<probe::DomainStats> stats = {probe::collect_domain_stats(dec, ex, "a", settings, 0, 1),
                                           probe::collect_domain_stats(dec, ex, "b", settings, 0, 1)};
  const json layers = probe::analyze(stats, settings, 3, nullptr, "");
  for (const auto& layer : layers) {
    const json& p = layer["pairs"][0];
    EXPECT_DOUBLE_EQ(p["iou"].get<double>(), 1.0);
    EXPECT_DOUBLE_EQ(p["p_value"].get<double>(), 1.0);  // no split can overlap more than fully
    EXPECT_LT(p["perm_mean"].get<double>(), 1.0);  // random halves of the same sequences differ
    EXPECT_GT(p["perm_mean"].get<double>(), p["iou_random"].get<double>());
  }
}

TEST(Probe, PermutationNullOnHandBuiltSequenceSums) {
  // Per-sequence sums over 10 tokens: uniform noise on every neuron, plus a domain effect of the same
  // size as the noise's spread on neurons 0..7 (domain A) or 8..15 (domain B). The observed top-8 sets
  // are disjoint; a random split mixes the domains, and its groups' top sets share neurons -> p small.
  // (With an effect far above the noise, every slightly unbalanced split would reproduce disjoint sets
  // and the test would lose power: see docs/probe.md.)
  const int64_t n = 30, I = 64, K = 8, P = 200;
  at::manual_seed(0);
  at::Tensor a = at::rand({n, I}), b = at::rand({n, I});  // [n, I]
  a.narrow(1, 0, K).add_(0.5);
  b.narrow(1, K, K).add_(0.5);
  const at::Tensor tok = at::full({n}, 10.0f);
  const auto r = probe::permutation_test(a, tok, b, tok, K, P, 42);
  EXPECT_DOUBLE_EQ(r.observed, 0.0);
  EXPECT_LT(r.p_value, 0.02);
  EXPECT_GT(r.mean, 0.1);
  EXPECT_EQ(r.permutations, P);
  std::cout << "  disjoint: perm " << r.mean << " +- " << r.std << " p " << r.p_value << "\n";
  // Same sums on both sides: the observed overlap is total, no split exceeds it.
  const auto same = probe::permutation_test(a, tok, a, tok, K, P, 42);
  EXPECT_DOUBLE_EQ(same.observed, 1.0);
  EXPECT_DOUBLE_EQ(same.p_value, 1.0);
  // Two samples of one distribution (H0, noise only): p is not small.
  const auto h0 = probe::permutation_test(at::rand({n, I}), tok, at::rand({n, I}), tok, K, P, 42);
  std::cout << "  same distribution: iou " << h0.observed << " perm " << h0.mean << " p " << h0.p_value << "\n";
  EXPECT_GT(h0.p_value, 0.05);
  // Seeded: the same seed gives the same null.
  const auto again = probe::permutation_test(a, tok, b, tok, K, P, 42);
  EXPECT_DOUBLE_EQ(again.mean, r.mean);
  EXPECT_DOUBLE_EQ(again.std, r.std);
}

TEST(Probe, DisjointVocabulariesGiveSmallPValues) {
  // Two synthetic domains from disjoint halves of the fixture vocabulary: the random model's MLP
  // responds to different tokens with different neurons, at least in the first layer.
  auto dec = model::Decoder::load(kData / "models" / "llama3", at::kFloat, at::kCPU);
  auto settings = small_settings();
  settings.permutations = 200;
  settings.token_pairs = 500;
  const auto ex_a = id_examples(24, 3, 256, 5), ex_b = id_examples(24, 256, 512, 6);
  std::vector<probe::DomainStats> stats = {probe::collect_domain_stats(dec, ex_a, "low", settings, 0, 1),
                                           probe::collect_domain_stats(dec, ex_b, "high", settings, 0, 2)};
  const json layers = probe::analyze(stats, settings, 3, nullptr, "");
  double min_p = 1;
  for (const auto& layer : layers) {
    const json& p = layer["pairs"][0];
    std::cout << "  layer " << layer["layer"] << ": iou " << p["iou"] << " random " << p["iou_random"] << " perm "
              << p["perm_mean"] << " +- " << p["perm_std"] << " p " << p["p_value"] << "\n";
    min_p = std::min(min_p, p["p_value"].get<double>());
  }
  EXPECT_LT(min_p, 0.05);
}

TEST(Probe, TokenOverlapOfKnownBitsets) {
  // Rows 0/1: {0..3} and {2..5} -> IoU 2/6; identical rows -> 1.
  const at::Tensor idx = at::tensor({0, 1, 2, 3, 2, 3, 4, 5}, at::kLong).view({2, 4});
  const at::Tensor bits = kernels::indices_to_bitset(idx, 64);  // [2, 1]
  const auto within = probe::token_overlap(bits, {0, 1}, bits, {0, 1}, true, 50, 1);
  EXPECT_NEAR(within.mean, 2.0 / 6, 1e-6);  // always the two different rows
  EXPECT_EQ(within.pairs, 50);
  const auto across = probe::token_overlap(bits.narrow(0, 0, 1), {0}, bits.narrow(0, 0, 1), {0}, false, 10, 1);
  EXPECT_NEAR(across.mean, 1.0, 1e-6);
}

TEST(Probe, GradientOverlapMatchesAutograd) {
  auto dec = model::Decoder::load(kData / "models" / "llama3", at::kFloat, at::kCPU);
  auto settings = small_settings();
  settings.gradient_overlap = true;
  settings.permutations = 0;
  settings.token_pairs = 0;
  auto ex = id_examples(6, 3, 512, 4);
  for (auto& e : ex) e.loss_mask[0] = 0;  // a prompt token, as in chat records
  const auto st = probe::collect_domain_stats(dec, ex, "a", settings, 0, 1);
  for (auto& [name, p] : dec.named_parameters()) EXPECT_FALSE(p->requires_grad()) << name << " left requiring grad";
  for (auto& layer : dec.layers()) EXPECT_FALSE(layer.down_proj.weight.grad().defined());

  // Reference: the mean loss over every loss token of the domain, by autograd on the same batches.
  const int64_t L = dec.config().num_hidden_layers;
  for (auto& layer : dec.layers()) layer.down_proj.weight.set_requires_grad(true);
  int64_t total = 0;
  at::Tensor loss_sum = at::zeros({}, at::kDouble);
  for (size_t s = 0; s < ex.size(); s += settings.batch_size) {
    const auto b = data::make_batch(ex, s, std::min(ex.size(), s + settings.batch_size), 0);
    model::ForwardInput in{b.input_ids, b.attention_mask, {}};
    const auto out = dec.forward(in);
    at::Tensor loss = model::causal_lm_loss(out.logits, b.labels) * static_cast<double>(b.num_label_tokens);
    loss.backward();
    loss_sum += loss.detach().to(at::kDouble);
    total += b.num_label_tokens;
  }
  EXPECT_EQ(st.loss_tokens, total);
  EXPECT_NEAR(st.loss, loss_sum.item<double>() / total, 1e-5);
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor& w = dec.layers()[l].down_proj.weight;
    const at::Tensor ref = w.grad() / static_cast<double>(total);  // [H, I]
    EXPECT_TRUE(at::allclose(st.layers[l].grad, ref, 1e-4, 1e-7)) << "layer " << l;
    EXPECT_TRUE(at::allclose(st.grad_mass(l), ref.norm(2, {0}), 1e-4, 1e-7));
    w.mutable_grad().reset();
    w.set_requires_grad(false);
  }
  // Identical domains: cosine 1, gradient-set IoU 1.
  std::vector<probe::DomainStats> two = {st, st};
  two[1].name = "b";
  const json layers = probe::analyze(two, settings, 1, nullptr, "");
  EXPECT_NEAR(layers[0]["gradient"]["pairs"][0]["cosine"].get<double>(), 1.0, 1e-9);
  EXPECT_DOUBLE_EQ(layers[0]["gradient"]["pairs"][0]["iou"].get<double>(), 1.0);
}

TEST(Probe, RunProbeWritesDocumentedFiles) {
  TempDir tmp("run");
  auto write = [&](const std::string& name, int64_t lo, int64_t hi, uint64_t seed) {
    const fs::path f = tmp.path / (name + ".jsonl");
    std::ofstream out(f);
    for (const auto& e : id_examples(9, lo, hi, seed)) out << json{{"ids", e.ids}, {"id", name}}.dump() << "\n";
    return f;
  };
  const std::vector<probe::Domain> domains = {{"code", write("code", 3, 200, 1)},
                                              {"math", write("math", 200, 400, 2)},
                                              {"chat", write("chat", 3, 400, 3)}};
  auto settings = small_settings();
  settings.permutations = 20;
  settings.token_pairs = 30;
  settings.token_reservoir = 40;
  settings.gradient_overlap = true;
  const fs::path out = tmp.path / "out";
  const json doc = probe::run_probe({kData / "models" / "llama3", kData / "models" / "qwen2"}, domains, settings, out);

  const json disk = json::parse(std::ifstream(out / "probe.json"));
  EXPECT_EQ(disk, doc);
  ASSERT_EQ(doc["models"].size(), 2u);
  EXPECT_EQ(doc["layers"], doc["models"][0]["layers"]);
  const json& l0 = doc["layers"][0];
  EXPECT_EQ(l0["layer"], 0);
  EXPECT_EQ(l0["top"].size(), 3u);
  EXPECT_EQ(l0["pairs"].size(), 3u);
  for (const char* key : {"a", "b", "iou", "iou_random", "ratio", "perm_mean", "perm_std", "p_value"})
    EXPECT_TRUE(l0["pairs"][0].contains(key)) << key;
  EXPECT_EQ(l0["token_overlap"]["within"].size(), 3u);
  EXPECT_EQ(l0["token_overlap"]["across"].size(), 3u);
  EXPECT_EQ(l0["gradient"]["pairs"].size(), 3u);
  for (const char* key : {"hidden_size", "intermediate_size", "params", "mean_ratio", "domains"})
    EXPECT_TRUE(doc["models"][1].contains(key)) << key;
  EXPECT_EQ(doc["models"][1]["hidden_size"], model::ModelConfig::load(kData / "models" / "qwen2").hidden_size);
  const json& prov = doc["provenance"];
  EXPECT_EQ(prov["config_hash"].get<std::string>().size(), 16u);
  EXPECT_EQ(prov["versions"]["libtorch"].get<std::string>().substr(0, 2), "2.");
  EXPECT_EQ(prov["seed"], 0);
  EXPECT_EQ(doc["settings"]["top_ratio"], 0.1);

  const auto raw = io::load_safetensors(out / "probe_stats.safetensors");
  const int64_t I0 = doc["models"][0]["intermediate_size"];
  for (const char* name : {"0.code.layer0.mean_abs", "0.code.layer0.freq", "0.code.layer0.grad_mass",
                           "1.chat.layer1.mean_abs", "0.math.tokens", "1.math.seq_tokens"})
    EXPECT_TRUE(raw.count(name)) << name;
  EXPECT_EQ(raw.at("0.code.layer0.mean_abs").numel(), I0);
  EXPECT_EQ(raw.at("0.math.seq_tokens").numel(), 9);
  // The top set in the JSON is the top of the stored mean_abs.
  EXPECT_EQ(l0["top"]["code"].get<std::vector<int64_t>>(),
            ref_top_set(raw.at("0.code.layer0.mean_abs"), doc["models"][0]["K"].get<int64_t>()));
  // Same seed, same numbers (timings aside).
  const json again = probe::run_probe({kData / "models" / "llama3"}, domains, settings, tmp.path / "out2");
  EXPECT_EQ(again["layers"], doc["layers"]);
}

TEST(Probe, BadSettingsAndDomainsAreErrors) {
  TempDir tmp("bad");
  auto s = small_settings();
  s.top_ratio = 0;
  EXPECT_THROW(s.validate(), Error);
  const fs::path f = tmp.path / "a.jsonl";
  std::ofstream(f) << "{\"ids\": [1, 2, 3]}\n";
  const fs::path model = kData / "models" / "llama3";
  try {
    probe::run_probe({model}, {{"a.b", f}}, small_settings(), tmp.path / "o");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("a.b"), std::string::npos);
  }
  EXPECT_THROW(probe::run_probe({model}, {{"a", f}, {"a", f}}, small_settings(), tmp.path / "o"), Error);
  EXPECT_THROW(probe::run_probe({model}, {{"a", tmp.path / "nope.jsonl"}}, small_settings(), tmp.path / "o"), Error);
  EXPECT_THROW(probe::parse_score("max"), Error);
}

// The probe on CUDA (the kernels' device paths, index_add_, the permutation matmuls) against the CPU
// run of the same inputs; bf16 runs. Skipped without a CUDA device.
TEST(ProbeCuda, MatchesCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const fs::path dir = kData / "models" / "llama3";
  auto cpu = model::Decoder::load(dir, at::kFloat, at::kCPU);
  auto gpu = model::Decoder::load(dir, at::kFloat, at::Device(at::kCUDA, 0));
  auto settings = small_settings();
  settings.permutations = 100;
  settings.gradient_overlap = true;
  const auto ex_a = id_examples(9, 3, 256, 5), ex_b = id_examples(8, 256, 512, 6);
  std::vector<probe::DomainStats> sc = {probe::collect_domain_stats(cpu, ex_a, "a", settings, 0, 1),
                                        probe::collect_domain_stats(cpu, ex_b, "b", settings, 0, 2)};
  std::vector<probe::DomainStats> sg = {probe::collect_domain_stats(gpu, ex_a, "a", settings, 0, 1),
                                        probe::collect_domain_stats(gpu, ex_b, "b", settings, 0, 2)};
  ASSERT_TRUE(sg[0].layers[0].sum_abs.is_cuda());
  const json jc = probe::analyze(sc, settings, 3, nullptr, ""), jg = probe::analyze(sg, settings, 3, nullptr, "");
  for (size_t d = 0; d < 2; ++d) {
    for (size_t l = 0; l < sc[d].layers.size(); ++l) {
      EXPECT_TRUE(at::allclose(sc[d].mean_abs(l), sg[d].mean_abs(l).cpu(), 1e-4, 1e-6)) << d << " " << l;
      // Per-token top-k may flip a near-tie between devices: allow a few membership changes.
      const int64_t flips = (sc[d].layers[l].topk_count - sg[d].layers[l].topk_count.cpu()).abs().sum().item<int64_t>();
      EXPECT_LE(flips, 4) << d << " " << l;
      EXPECT_TRUE(at::allclose(sc[d].layers[l].seq_sum, sg[d].layers[l].seq_sum.cpu(), 1e-4, 1e-5));
      EXPECT_TRUE(at::allclose(sc[d].layers[l].grad, sg[d].layers[l].grad.cpu(), 1e-3, 1e-6));
      const std::string name = d ? "b" : "a";
      const auto top_c = jc[l]["top"][name].get<std::vector<int64_t>>(), top_g = jg[l]["top"][name].get<std::vector<int64_t>>();
      EXPECT_GE(ref_iou(top_c, top_g), 0.8) << d << " " << l;
    }
  }
  for (size_t l = 0; l < jc.size(); ++l) {
    std::cout << "  layer " << l << ": cpu iou " << jc[l]["pairs"][0]["iou"] << " p " << jc[l]["pairs"][0]["p_value"]
              << " | cuda iou " << jg[l]["pairs"][0]["iou"] << " p " << jg[l]["pairs"][0]["p_value"] << "\n";
    EXPECT_NEAR(jc[l]["pairs"][0]["iou"].get<double>(), jg[l]["pairs"][0]["iou"].get<double>(), 0.15);
    EXPECT_NEAR(jc[l]["gradient"]["pairs"][0]["cosine"].get<double>(),
                jg[l]["gradient"]["pairs"][0]["cosine"].get<double>(), 1e-3);
  }
  // bf16 on the GPU: runs, and its statistics are close to fp32's.
  auto bf = model::Decoder::load(dir, at::kBFloat16, at::Device(at::kCUDA, 0));
  const auto sb = probe::collect_domain_stats(bf, ex_a, "a", settings, 0, 1);
  EXPECT_TRUE(at::allclose(sb.mean_abs(0).cpu(), sc[0].mean_abs(0), 5e-2, 1e-3));
}

// The default model on the four bundled domains: the first real answer to H1 at 135M. Opt-in here
// (minutes on a CPU); tests/python/test_probe_smollm2.py runs it through the binary in CI.
TEST(ProbeSmolLM2, FourDomains) {
  if (!std::getenv("SPARSECL_PROBE_SMOLLM2")) GTEST_SKIP() << "set SPARSECL_PROBE_SMOLLM2=1 (minutes on a CPU)";
  const fs::path model = kRepo / "models" / "smollm2-135m-instruct";
  if (!fs::exists(model / "model.safetensors")) GTEST_SKIP() << "needs " << model;
  std::vector<probe::Domain> domains;
  for (const char* d : {"code", "math", "medical", "chat"}) domains.push_back({d, kRepo / "data" / d / "train.jsonl"});
  probe::Settings s;
  s.max_samples = std::getenv("SPARSECL_PROBE_SAMPLES") ? std::atoi(std::getenv("SPARSECL_PROBE_SAMPLES")) : 32;
  s.max_length = 128;
  s.batch_size = 8;
  s.permutations = 200;
  s.token_pairs = 2000;
  const fs::path out = std::getenv("SPARSECL_PROBE_OUT") ? fs::path(std::getenv("SPARSECL_PROBE_OUT"))
                                                          : fs::temp_directory_path() / "sparsecl_probe_smollm2";
  const json doc = probe::run_probe({model}, domains, s, out);
  std::cout << std::fixed << std::setprecision(3);
  for (const auto& layer : doc["layers"]) {
    std::cout << "layer " << std::setw(2) << layer["layer"].get<int>();
    for (const auto& p : layer["pairs"])
      std::cout << "  " << p["a"].get<std::string>().substr(0, 2) << "-" << p["b"].get<std::string>().substr(0, 2)
                << " " << p["iou"].get<double>() << "/" << p["ratio"].get<double>() << "x p" << p["p_value"].get<double>();
    std::cout << "\n";
  }
  EXPECT_EQ(doc["layers"].size(), 30u);
}
