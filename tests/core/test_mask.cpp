// The `mask` (activation-mask tuning) and `migu` (MIGU magnitude gating) methods on the llama3 fixture
// model: after training and merging, every weight outside the selected rows / columns is bit for bit
// the base model's and every selected one changed; the deltas file reloads to the same logits; the
// selection is the probe's own top-K set, is disjoint from earlier stages' with exclude_previous, and
// survives a checkpoint + resume without a new probe; heads train only their q rows / o columns; MIGU
// zeroes exactly the gradient rows whose output L1 norm (over real tokens) is below the quantile, and
// those rows do not move in the first step.
// MaskMethodLong / MiguMethodLong (SPARSECL_LONG=1): 20 steps on models/smollm2-135m-instruct with
// data/math, held-out loss before / after and tokens/s.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/config/schema.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/probe/probe.h"
#include "sparsecl/text/tokenizer.h"
#include "sparsecl/train/mask.h"
#include "sparsecl/train/migu.h"
#include "sparsecl/train/trainer.h"

#include "test_support.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using nlohmann::json;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA);
const fs::path kModel = kData / "models" / "llama3";

using testing_support::TempDir;

// Pre-tokenized examples (vocab 512) of varying length with a learnable pattern; the first 2 tokens of
// each are outside the loss, as a prompt would be. `offset` shifts the pattern (another "domain").
std::vector<data::Example> examples_of(int64_t count, uint64_t seed, int64_t offset = 0) {
  std::mt19937_64 rng(seed);
  std::vector<data::Example> out;
  for (int64_t i = 0; i < count; ++i) {
    data::Example e;
    const int64_t len = 6 + static_cast<int64_t>(data::uniform_below(rng, 14));
    for (int64_t t = 0; t < len; ++t) {
      const int64_t prev = t == 0 ? 3 + static_cast<int64_t>(data::uniform_below(rng, 60)) : e.ids.back();
      e.ids.push_back(data::uniform_below(rng, 5) == 0 ? 3 + static_cast<int64_t>(data::uniform_below(rng, 500))
                                                       : (prev * 5 + 11 + offset) % 500 + 3);
      e.loss_mask.push_back(t >= 2 ? 1 : 0);
    }
    out.push_back(std::move(e));
  }
  return out;
}

config::Config mask_config(double ratio) {
  config::Config cfg(config::schema());
  cfg.set("mask.ratio", ratio);
  cfg.set("probe.batch_size", int64_t{5});
  return cfg;
}

train::TrainOptions fixture_options(int64_t steps) {
  train::TrainOptions o;
  o.steps = steps;
  o.batch_size = 3;
  o.grad_accum = 2;
  o.lr = 5e-3;
  o.warmup_steps = 1;
  o.weight_decay = 0.01;
  o.clip = 1.0;
  o.seed = 7;
  o.progress = false;
  return o;
}

train::RunInfo fixture_info() { return {json{{"fixture", true}}, "00000000000000aa", kModel.string()}; }

model::Decoder load_model() { return model::Decoder::load(kModel, at::kFloat, at::kCPU); }

std::map<std::string, at::Tensor> snapshot(model::Decoder& d) {
  std::map<std::string, at::Tensor> m;
  for (auto& [name, p] : d.named_parameters()) m[name] = p->detach().clone();
  return m;
}

// [n] bool with true at `index`.
at::Tensor indicator(const at::Tensor& index, int64_t n) {
  return at::zeros({n}, at::kBool).index_fill_(0, index.to(at::kLong), true);
}

at::Tensor head_rows(const at::Tensor& heads, int64_t D) {
  return (heads.unsqueeze(1) * D + at::arange(D, at::kLong).unsqueeze(0)).reshape({-1});
}

struct MaskRun {
  std::unique_ptr<train::Method> method;
  train::MaskMethod* mask = nullptr;
};

// Trains `decoder` in place (a Decoder is not moved: its parameter table points into itself).
MaskRun train_mask(const config::Config& cfg, const train::StageContext& ctx, const std::vector<data::Example>& examples,
                   const fs::path& out, int64_t steps, model::Decoder& decoder) {
  MaskRun r{train::make_mask_method(cfg, ctx), nullptr};
  r.mask = dynamic_cast<train::MaskMethod*>(r.method.get());
  EXPECT_NE(r.mask, nullptr);
  EXPECT_EQ(r.method->name(), "mask");
  EXPECT_TRUE(r.method->dense());
  train::train(decoder, *r.method, examples, fixture_options(steps), out, fixture_info());
  return r;
}

// Checks that after merging, `linear`'s weight differs from `before` in exactly the `rows` (or columns).
void expect_changed_exactly(const std::string& name, const at::Tensor& after, const at::Tensor& before,
                            const at::Tensor& index, bool columns) {
  const at::Tensor diff = after.ne(before);                     // [out, in]
  const at::Tensor changed = diff.any(columns ? 0 : 1);          // [in] or [out]
  const at::Tensor want = indicator(index, after.size(columns ? 1 : 0));
  EXPECT_TRUE(at::equal(changed, want)) << name << ": " << changed.sum().item<int64_t>() << " "
                                         << (columns ? "columns" : "rows") << " changed, selection has "
                                         << index.numel() << ", overlap "
                                         << changed.logical_and(want).sum().item<int64_t>();
}

}  // namespace

// ---- mask ------------------------------------------------------------------------------------------------

TEST(MaskMethod, OnlySelectedRowsAndColumnsChange) {
  TempDir dir("rows");
  const auto examples = examples_of(24, 1);
  train::StageContext ctx;
  ctx.stage = "fixture";
  ctx.examples = &examples;
  ctx.seed = 7;
  model::Decoder decoder = load_model();
  const auto original = snapshot(decoder);
  MaskRun r = train_mask(mask_config(0.1), ctx, examples, dir.path, 4, decoder);
  ASSERT_NE(r.mask, nullptr);
  const int64_t K = probe::top_count(0.1, decoder.config().intermediate_size);
  EXPECT_EQ(K, 18);
  r.method->merge_into_base(decoder);
  for (auto& [name, lin] : decoder.named_linears()) EXPECT_TRUE(lin->indexed.empty()) << name;

  const auto& sel = r.mask->selection();
  ASSERT_EQ(sel.neurons.size(), 3u);
  int64_t checked = 0;
  for (auto& [name, p] : decoder.named_parameters()) {
    const at::Tensor& before = original.at(name);
    const int64_t l = name.rfind("model.layers.", 0) == 0 ? std::stoll(name.substr(13)) : -1;
    if (name.find("mlp.gate_proj.weight") != std::string::npos || name.find("mlp.up_proj.weight") != std::string::npos) {
      ASSERT_EQ(sel.neurons[l].numel(), K);
      expect_changed_exactly(name, *p, before, sel.neurons[l], false);
      ++checked;
    } else if (name.find("mlp.down_proj.weight") != std::string::npos) {
      expect_changed_exactly(name, *p, before, sel.neurons[l], true);
      ++checked;
    } else {
      EXPECT_TRUE(at::equal(*p, before)) << name << " changed but is not trained by mask";
    }
  }
  EXPECT_EQ(checked, 9);
}

TEST(MaskMethod, DeltasFileReloadsToTheSameLogits) {
  TempDir dir("reload");
  const auto examples = examples_of(20, 2);
  train::StageContext ctx;
  ctx.examples = &examples;
  ctx.seed = 3;
  model::Decoder decoder = load_model();
  MaskRun r = train_mask(mask_config(0.05), ctx, examples, dir.path, 3, decoder);
  r.method->merge_into_base(decoder);

  // The product is compact: per layer K-row / K-column deltas and their indices.
  const int64_t K = probe::top_count(0.05, 176), H = 64;
  const auto tensors = io::load_safetensors(dir.path / "mask_deltas.safetensors");
  EXPECT_EQ(tensors.size(), 3u * 3u * 2u);
  EXPECT_EQ(tensors.at("model.layers.1.mlp.gate_proj.delta").sizes(), (std::vector<int64_t>{K, H}));
  EXPECT_EQ(tensors.at("model.layers.1.mlp.down_proj.delta").sizes(), (std::vector<int64_t>{H, K}));
  EXPECT_TRUE(at::equal(tensors.at("model.layers.2.mlp.up_proj.index"), r.mask->selection().neurons[2]));
  const json mj = read_json_file(dir.path / "mask.json");
  EXPECT_EQ(mj["ratio"].get<double>(), 0.05);
  EXPECT_EQ(mj["score"], "mean_abs");
  EXPECT_EQ(mj["layers"][1]["k"].get<int64_t>(), K);
  EXPECT_EQ(mj["modules"]["model.layers.0.mlp.down_proj"]["kind"], "columns");
  EXPECT_EQ(mj["probe"]["examples"].get<int64_t>(), 20);

  model::Decoder fresh = load_model();
  train::apply_mask_output(fresh, dir.path);
  for (auto& [name, lin] : fresh.named_linears()) EXPECT_TRUE(lin->indexed.empty()) << name;
  const data::Batch batch = data::make_batch(examples, 0, 6, 0);
  model::ForwardInput in;
  in.input_ids = batch.input_ids;
  in.attention_mask = batch.attention_mask;
  at::NoGradGuard no_grad;
  const at::Tensor a = decoder.forward(in).logits, b = fresh.forward(in).logits;
  EXPECT_LE((a - b).abs().max().item<double>(), 1e-6);
  // And the trained model is not the base model.
  const at::Tensor base_logits = load_model().forward(in).logits;
  EXPECT_GT((a - base_logits).abs().max().item<double>(), 1e-4);
}

TEST(MaskMethod, ApplyRejectsABadDeltasFileAndLeavesTheModel) {
  TempDir dir("bad");
  const auto examples = examples_of(10, 3);
  train::StageContext ctx;
  ctx.examples = &examples;
  model::Decoder trained = load_model();
  train_mask(mask_config(0.05), ctx, examples, dir.path, 1, trained);
  // Replace one delta by a wrongly shaped tensor.
  auto tensors = io::load_safetensors(dir.path / "mask_deltas.safetensors");
  tensors["model.layers.1.mlp.up_proj.delta"] = at::zeros({3, 64});
  std::vector<std::pair<std::string, at::Tensor>> list(tensors.begin(), tensors.end());
  io::save_safetensors(dir.path / "mask_deltas.safetensors", list);
  model::Decoder fresh = load_model();
  const auto before = snapshot(fresh);
  try {
    train::apply_mask_output(fresh, dir.path);
    FAIL() << "a wrongly shaped delta was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.up_proj.delta"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("mask_deltas.safetensors"), std::string::npos) << e.what();
  }
  for (auto& [name, p] : fresh.named_parameters()) EXPECT_TRUE(at::equal(*p, before.at(name))) << name;
  EXPECT_THROW(train::apply_mask_output(fresh, dir.path / "missing"), Error);
}

TEST(MaskMethod, SelectionIsTheProbesTopSet) {
  model::Decoder decoder = load_model();
  const auto examples = examples_of(30, 4);
  for (const std::string score : {"mean_abs", "freq"}) {
    config::Config cfg = mask_config(0.2);
    cfg.set("probe.score", score);
    train::StageContext ctx;
    ctx.examples = &examples;
    ctx.seed = 11;
    train::MaskMethod method(train::MaskOptions::from_config(cfg), ctx);
    method.select(decoder);
    EXPECT_TRUE(method.probed());

    // The probe, run independently with the same settings.
    probe::Settings s = probe::Settings::from_config(cfg);
    s.top_ratio = 0.2;
    s.token_pairs = 0;
    s.progress = false;
    const probe::DomainStats stats = probe::collect_domain_stats(decoder, examples, "independent", s, 0, 99);
    const int64_t K = probe::top_count(0.2, 176);
    for (int64_t l = 0; l < 3; ++l) {
      const at::Tensor want = probe::top_set(stats.score(l, probe::parse_score(score)), K).to(at::kCPU);
      EXPECT_TRUE(at::equal(method.selection().neurons[l], want)) << score << " layer " << l;
    }
  }
  // More examples than probe.max_samples: a seeded subsample of that many, truncated to probe.max_length.
  probe::Settings s;
  s.max_samples = 7;
  s.max_length = 9;
  const auto sub = train::mask_probe_examples(examples, s, 5);
  ASSERT_EQ(sub.size(), 7u);
  const auto again = train::mask_probe_examples(examples, s, 5);
  for (size_t i = 0; i < sub.size(); ++i) {
    EXPECT_LE(sub[i].ids.size(), 9u);
    EXPECT_EQ(sub[i].ids, again[i].ids);
  }
  EXPECT_EQ(train::mask_probe_examples(examples, probe::Settings{}, 5).size(), examples.size());
}

TEST(MaskMethod, ExcludePreviousChoosesDisjointNeurons) {
  TempDir first("stage1"), second("stage2");
  const auto examples_a = examples_of(16, 5), examples_b = examples_of(16, 6, 97);
  config::Config cfg = mask_config(0.25);
  cfg.set("mask.exclude_previous", true);
  train::StageContext ctx_a;
  ctx_a.stage = "a";
  ctx_a.examples = &examples_a;
  model::Decoder decoder = load_model();
  MaskRun a = train_mask(cfg, ctx_a, examples_a, first.path, 2, decoder);
  a.method->merge_into_base(decoder);

  // Without exclusion, stage b's top set overlaps stage a's (so the exclusion below has work to do).
  train::StageContext ctx_b;
  ctx_b.stage = "b";
  ctx_b.examples = &examples_b;
  ctx_b.previous = {first.path};
  config::Config plain = mask_config(0.25);
  train::MaskMethod unconstrained(train::MaskOptions::from_config(plain), ctx_b);
  unconstrained.select(decoder);
  int64_t overlap = 0;
  for (int64_t l = 0; l < 3; ++l)
    overlap += indicator(unconstrained.selection().neurons[l], 176)
                   .logical_and(indicator(a.mask->selection().neurons[l], 176))
                   .sum()
                   .item<int64_t>();
  EXPECT_GT(overlap, 0);

  MaskRun b = train_mask(cfg, ctx_b, examples_b, second.path, 2, decoder);
  const int64_t K = probe::top_count(0.25, 176);
  for (int64_t l = 0; l < 3; ++l) {
    const at::Tensor nb = b.mask->selection().neurons[l];
    ASSERT_EQ(nb.numel(), K);
    const at::Tensor both = indicator(nb, 176).logical_and(indicator(a.mask->selection().neurons[l], 176));
    EXPECT_EQ(both.sum().item<int64_t>(), 0) << "layer " << l;
  }
  const json mj = read_json_file(second.path / "mask.json");
  EXPECT_EQ(mj["excluded_stages"].size(), 1u);

  // A fourth of the neurons per stage: a fifth stage has none left, which is a clear error.
  train::StageContext ctx_c = ctx_b;
  ctx_c.previous = {first.path, second.path, second.path, first.path};
  config::Config big = mask_config(0.6);
  big.set("mask.exclude_previous", true);
  train::MaskMethod starved(train::MaskOptions::from_config(big), ctx_c);
  EXPECT_THROW(starved.select(decoder), Error);
}

TEST(MaskMethod, ResumeRestoresTheSelectionWithoutAProbe) {
  TempDir straight("straight"), cut("cut");
  const auto examples = examples_of(18, 8);
  train::StageContext ctx;
  ctx.examples = &examples;
  ctx.seed = 1;
  const config::Config cfg = mask_config(0.1);
  model::Decoder whole_model = load_model();
  MaskRun whole = train_mask(cfg, ctx, examples, straight.path, 4, whole_model);

  train::TrainOptions o = fixture_options(4);
  o.stop_after = 2;
  {
    model::Decoder d = load_model();
    auto m = train::make_mask_method(cfg, ctx);
    EXPECT_FALSE(train::train(d, *m, examples, o, cut.path, fixture_info()).finished);
  }
  o.stop_after = 0;
  o.resume = true;
  model::Decoder d = load_model();
  auto m = train::make_mask_method(cfg, ctx);
  auto* mask = dynamic_cast<train::MaskMethod*>(m.get());
  EXPECT_TRUE(train::train(d, *m, examples, o, cut.path, fixture_info()).finished);
  EXPECT_FALSE(mask->probed());
  for (int64_t l = 0; l < 3; ++l) EXPECT_TRUE(at::equal(mask->selection().neurons[l], whole.mask->selection().neurons[l]));
  const auto x = io::load_safetensors(straight.path / "mask_deltas.safetensors");
  const auto y = io::load_safetensors(cut.path / "mask_deltas.safetensors");
  ASSERT_EQ(x.size(), y.size());
  for (const auto& [name, t] : x) EXPECT_TRUE(at::equal(t, y.at(name))) << name;
}

TEST(MaskMethod, HeadsTrainOnlyTheirQueryRowsAndOutputColumns) {
  TempDir dir("heads");
  const auto examples = examples_of(20, 9);
  config::Config cfg = mask_config(0.1);
  cfg.set("mask.heads", true);
  cfg.set("mask.head_ratio", 0.5);
  train::StageContext ctx;
  ctx.examples = &examples;
  model::Decoder base = load_model();
  const auto original = snapshot(base);
  const int64_t nh = base.config().num_attention_heads, D = base.config().head_dim;

  // Head norms computed independently: one example at a time (no padding), per-token L2 norms summed.
  std::vector<at::Tensor> ref(3);
  for (auto& r : ref) r = at::zeros({nh}, at::kDouble);
  int64_t tokens = 0;
  for (size_t i = 0; i < examples.size(); ++i) {
    model::ActivationHook hook = [&](model::HookPoint point, int64_t l, const at::Tensor& x) {
      if (point != model::HookPoint::AttnOutput) return;
      ref[l] += x.detach().reshape({-1, nh, D}).to(at::kDouble).pow(2).sum(-1).sqrt().sum(0);
    };
    model::ForwardInput in;
    in.input_ids = at::tensor(examples[i].ids, at::kLong).unsqueeze(0);
    model::ForwardOptions fo;
    fo.hook = &hook;
    at::NoGradGuard no_grad;
    base.forward(in, fo);
    tokens += static_cast<int64_t>(examples[i].ids.size());
  }
  const auto norms = train::attention_head_norms(base, examples, 5, 0);

  MaskRun r = train_mask(cfg, ctx, examples, dir.path, 3, base);
  r.method->merge_into_base(base);
  const auto& sel = r.mask->selection();
  ASSERT_EQ(sel.heads.size(), 3u);
  for (int64_t l = 0; l < 3; ++l) {
    EXPECT_TRUE(at::allclose(norms[l].to(at::kDouble), ref[l] / static_cast<double>(tokens), 1e-5, 1e-6)) << l;
    EXPECT_TRUE(at::equal(sel.heads[l], probe::top_set(ref[l].to(at::kFloat), 2).to(at::kCPU))) << "layer " << l;
    auto& L = base.layers()[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    expect_changed_exactly(p + "q_proj", L.q_proj.weight, original.at(p + "self_attn.q_proj.weight"), head_rows(sel.heads[l], D), false);
    expect_changed_exactly(p + "o_proj", L.o_proj.weight, original.at(p + "self_attn.o_proj.weight"), head_rows(sel.heads[l], D), true);
    EXPECT_TRUE(at::equal(L.k_proj.weight, original.at(p + "self_attn.k_proj.weight")));
    EXPECT_TRUE(at::equal(L.v_proj.weight, original.at(p + "self_attn.v_proj.weight")));
    expect_changed_exactly(p + "gate_proj", L.gate_proj.weight, original.at(p + "mlp.gate_proj.weight"), sel.neurons[l], false);
  }
  // The heads travel in the product: a fresh model gets the same weights.
  model::Decoder fresh = load_model();
  train::apply_mask_output(fresh, dir.path);
  for (auto& [name, p] : fresh.named_parameters()) {
    at::Tensor* q = nullptr;
    for (auto& [n2, p2] : base.named_parameters())
      if (n2 == name) q = p2;
    ASSERT_NE(q, nullptr);
    EXPECT_TRUE(at::equal(*p, *q)) << name;
  }
}

// ---- migu ------------------------------------------------------------------------------------------------

TEST(MiguMethod, ZeroesTheGradientRowsBelowTheQuantileOfTheOutputL1Norm) {
  model::Decoder decoder = load_model();
  const double q = 0.5;
  train::MiguMethod migu(q);
  EXPECT_EQ(migu.name(), "migu");
  EXPECT_TRUE(migu.dense());
  migu.setup(decoder);
  // Two rows of different length: the shorter one is padded, and padding must not count.
  auto examples = examples_of(2, 10);
  examples[0].ids.resize(7);
  examples[0].loss_mask.resize(7);
  examples[1].ids.resize(15, 5);
  examples[1].loss_mask.resize(15, 1);
  const data::Batch batch = data::make_batch(examples, 0, 2, 0);
  ASSERT_LT(batch.num_tokens, batch.input_ids.numel());
  model::ForwardInput in;
  in.input_ids = batch.input_ids;
  in.attention_mask = batch.attention_mask;

  // The projections' inputs, recorded by a separate no-grad forward.
  std::map<std::pair<int, int64_t>, at::Tensor> inputs;
  {
    model::ActivationHook record = [&](model::HookPoint point, int64_t l, const at::Tensor& x) {
      inputs[{static_cast<int>(point), l}] = x.detach().clone();
    };
    model::ForwardOptions fo;
    fo.hook = &record;
    fo.logits = false;
    at::NoGradGuard no_grad;
    decoder.forward(in, fo);
  }

  migu.before_forward(batch);
  model::ForwardOptions fo;
  fo.training = true;
  fo.hook = migu.activation_hook();
  model::causal_lm_loss(decoder.forward(in, fo).logits, batch.labels).backward();
  const auto& names = train::MiguMethod::projections();
  std::map<std::pair<int64_t, size_t>, at::Tensor> grads, norms;
  auto linear = [&](int64_t l, size_t p) -> model::Linear& {
    auto& L = decoder.layers()[l];
    model::Linear* all[] = {&L.q_proj, &L.k_proj, &L.v_proj, &L.o_proj, &L.gate_proj, &L.up_proj, &L.down_proj};
    return *all[p];
  };
  for (int64_t l = 0; l < 3; ++l)
    for (size_t p = 0; p < 7; ++p) {
      grads[{l, p}] = linear(l, p).weight.grad().clone();
      norms[{l, p}] = migu.output_norms(l, static_cast<int64_t>(p)).clone();
    }
  migu.before_optimizer_step(decoder, 0);

  int64_t gated_total = 0, rows_total = 0;
  for (int64_t l = 0; l < 3; ++l) {
    for (size_t p = 0; p < 7; ++p) {
      const model::Linear& lin = linear(l, p);
      const at::Tensor x = inputs.at({static_cast<int>(model::input_hook_point(names[p])), l});  // [B, T, in]
      // Real tokens only, row by row; output norms in float64.
      std::vector<at::Tensor> rows;
      for (int64_t b = 0; b < 2; ++b) rows.push_back(x[b].narrow(0, 0, batch.lengths[b]));
      const at::Tensor y = at::cat(rows).to(at::kDouble).matmul(lin.weight.detach().to(at::kDouble).t());  // [N, out]
      const at::Tensor ref = y.abs().sum(0);                                                                // [out]
      EXPECT_TRUE(at::allclose(norms.at({l, p}).to(at::kDouble), ref, 1e-4, 1e-5)) << l << " " << names[p];
      // torch.quantile's linear interpolation, by hand.
      std::vector<double> sorted(ref.data_ptr<double>(), ref.data_ptr<double>() + ref.numel());
      std::sort(sorted.begin(), sorted.end());
      const double pos = q * static_cast<double>(sorted.size() - 1);
      const size_t lo = static_cast<size_t>(std::floor(pos)), hi = static_cast<size_t>(std::ceil(pos));
      const double threshold = sorted[lo] + (pos - static_cast<double>(lo)) * (sorted[hi] - sorted[lo]);
      const at::Tensor grad_after = lin.weight.grad();
      const at::Tensor gated = migu.gated(l, static_cast<int64_t>(p));
      for (int64_t i = 0; i < ref.numel(); ++i) {
        const double v = ref[i].item<double>();
        if (std::abs(v - threshold) <= 1e-5 * threshold) continue;  // too close to call in fp32
        const bool below = v < threshold;
        EXPECT_EQ(gated[i].item<bool>(), below) << l << " " << names[p] << " row " << i;
        if (below)
          EXPECT_EQ(grad_after[i].abs().max().item<float>(), 0.0f) << l << " " << names[p] << " row " << i;
        else
          EXPECT_TRUE(at::equal(grad_after[i], grads.at({l, p})[i])) << l << " " << names[p] << " row " << i;
      }
      gated_total += gated.sum().item<int64_t>();
      rows_total += gated.numel();
      // The accumulators start over for the next step.
      EXPECT_EQ(migu.output_norms(l, static_cast<int64_t>(p)).abs().sum().item<double>(), 0.0);
    }
  }
  EXPECT_NEAR(static_cast<double>(gated_total) / static_cast<double>(rows_total), q, 0.02);
  // Parameters outside the linears are not gated.
  EXPECT_GT(decoder.named_parameters()[0].second->grad().abs().sum().item<double>(), 0.0);
}

TEST(MiguMethod, GatedRowsDoNotMoveInTheFirstStep) {
  TempDir dir("migu");
  model::Decoder decoder = load_model();
  const auto original = snapshot(decoder);
  const auto examples = examples_of(12, 12);
  config::Config cfg(config::schema());
  cfg.set("migu.quantile", 0.7);
  auto method = train::make_migu_method(cfg, {});
  auto* migu = dynamic_cast<train::MiguMethod*>(method.get());
  ASSERT_NE(migu, nullptr);
  train::TrainOptions o = fixture_options(1);
  o.weight_decay = 0.0;
  o.warmup_steps = 0;
  train::train(decoder, *method, examples, o, dir.path, fixture_info());
  EXPECT_TRUE(fs::exists(dir.path / "model.safetensors"));  // FullMethod's product

  const auto& names = train::MiguMethod::projections();
  int64_t gated_total = 0, rows_total = 0;
  for (int64_t l = 0; l < 3; ++l) {
    auto& L = decoder.layers()[l];
    model::Linear* all[] = {&L.q_proj, &L.k_proj, &L.v_proj, &L.o_proj, &L.gate_proj, &L.up_proj, &L.down_proj};
    for (size_t p = 0; p < 7; ++p) {
      const std::string key = "model.layers." + std::to_string(l) + (p < 4 ? ".self_attn." : ".mlp.") + names[p] + ".weight";
      const at::Tensor gated = migu->gated(l, static_cast<int64_t>(p));
      const at::Tensor changed = all[p]->weight.detach().ne(original.at(key)).any(1);  // [out]
      // Gated rows are bit for bit the base model's; every other row moved.
      EXPECT_TRUE(at::equal(changed, gated.logical_not())) << key << ": " << changed.sum().item<int64_t>()
                                                            << " rows changed, " << gated.sum().item<int64_t>() << " gated";
      gated_total += gated.sum().item<int64_t>();
      rows_total += gated.numel();
    }
  }
  EXPECT_NEAR(static_cast<double>(gated_total) / static_cast<double>(rows_total), 0.7, 0.02);
  EXPECT_FALSE(at::equal(*decoder.named_parameters()[0].second, original.at("model.embed_tokens.weight")));
}

// ---- long runs on the default model (SPARSECL_LONG=1) -----------------------------------------------------

namespace {

void long_run(const std::string& method_name, double lr) {
  const char* flag = std::getenv("SPARSECL_LONG");
  if (!flag || std::string(flag) != "1") GTEST_SKIP() << "set SPARSECL_LONG=1 (trains models/smollm2-135m-instruct)";
  const fs::path repo = fs::path(SPARSECL_TEST_DATA).parent_path().parent_path();
  const fs::path model_dir = repo / "models" / "smollm2-135m-instruct";
  if (!fs::exists(model_dir / "config.json")) GTEST_SKIP() << model_dir << " is not present";
  const std::string device = std::getenv("SPARSECL_DEVICE") ? std::getenv("SPARSECL_DEVICE") : "cpu";
  auto tokenizer = text::Tokenizer::load_if_present(model_dir);
  ASSERT_TRUE(tokenizer);
  data::LoadOptions lo;
  lo.max_length = 256;
  lo.shuffle = false;
  const auto examples = data::load_jsonl(repo / "data" / "math" / "train.jsonl", tokenizer.get(), lo);
  lo.max_samples = 32;
  const auto heldout = data::load_jsonl(repo / "data" / "math" / "heldout.jsonl", tokenizer.get(), lo);
  const int64_t pad = data::pad_id_for(tokenizer.get());
  model::Decoder decoder = model::Decoder::load(model_dir, at::kFloat, model::parse_device(device));

  config::Config cfg(config::schema());
  cfg.set("probe.max_samples", int64_t{64});
  cfg.set("probe.max_length", int64_t{256});
  train::StageContext ctx;
  ctx.stage = "math";
  ctx.examples = &examples;
  ctx.pad_id = pad;
  auto method = method_name == "mask" ? train::make_mask_method(cfg, ctx) : train::make_migu_method(cfg, ctx);
  train::TrainOptions o;
  o.steps = 20;
  o.batch_size = 2;
  o.lr = lr;
  o.warmup_steps = 2;
  o.pad_id = pad;
  o.progress = false;
  TempDir dir("long_" + method_name);
  const double before = train::heldout_loss(decoder, heldout, 8, pad).loss;
  const auto t0 = std::chrono::steady_clock::now();
  const auto result = train::train(decoder, *method, examples, o, dir.path, fixture_info());
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  method->merge_into_base(decoder);
  const double after = train::heldout_loss(decoder, heldout, 8, pad).loss;
  std::printf("[%s on %s] held-out loss %.4f -> %.4f, train %.1f tokens/s (%lld tokens in %.1f s of steps; %.1f s "
              "with setup), last loss %.4f\n",
              method_name.c_str(), device.c_str(), before, after, result.tokens_per_s,
              static_cast<long long>(result.tokens), result.seconds, total_s, result.last_loss);
  ::testing::Test::RecordProperty("heldout_before", std::to_string(before));
  ::testing::Test::RecordProperty("heldout_after", std::to_string(after));
  ::testing::Test::RecordProperty("tokens_per_s", std::to_string(result.tokens_per_s));
  EXPECT_TRUE(std::isfinite(after));
  EXPECT_LT(after, before);
}

}  // namespace

TEST(MaskMethodLong, SmolLM2MathTwentySteps) { long_run("mask", 1e-4); }
TEST(MiguMethodLong, SmolLM2MathTwentySteps) { long_run("migu", 2e-5); }
