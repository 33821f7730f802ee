// Activation checkpointing (model::ForwardOptions::checkpoint_layers, train.activation_checkpointing) on
// the llama3 fixture model, fp32 CPU: the loss and every trainable gradient equal those without
// checkpointing within 1e-6 (LoRA with dropout, whose masks the recomputation must replay; full
// fine-tuning, where the layer inputs require grad too), the generators end where they would without it,
// a hook sees each layer once, the autograd graph keeps one Node per layer instead of every
// intermediate, and the trainer with checkpointing (and packing) matches and resumes bit for bit.
// Checkpointing.MeasureSmolLM2 (SPARSECL_LONG=1) measures step time and peak RSS on SmolLM2-135M.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <malloc.h>
#include <torch/csrc/autograd/function.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "sparsecl/common/error.h"
#include "sparsecl/model/lora.h"
#include "sparsecl/train/methods.h"
#include "sparsecl/train/trainer.h"

#include "test_support.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using nlohmann::json;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA);
const fs::path kModel = kData / "models" / "llama3";
const fs::path kSmol = kData.parent_path().parent_path() / "models" / "smollm2-135m-instruct";

using testing_support::TempDir;

std::vector<data::Example> examples(int64_t count, uint64_t seed, int64_t vocab = 512, int64_t min_len = 6,
                                    int64_t spread = 14) {
  std::mt19937_64 rng(seed);
  std::vector<data::Example> out;
  for (int64_t i = 0; i < count; ++i) {
    data::Example e;
    const int64_t len = min_len + static_cast<int64_t>(data::uniform_below(rng, static_cast<uint64_t>(spread)));
    for (int64_t t = 0; t < len; ++t) {
      e.ids.push_back(3 + static_cast<int64_t>(data::uniform_below(rng, static_cast<uint64_t>(vocab - 3))));
      e.loss_mask.push_back(t >= 2 ? 1 : 0);
    }
    out.push_back(std::move(e));
  }
  return out;
}

// A trainable LoRA adapter (fp32 leaves) with B != 0, so that A receives gradient too.
std::vector<std::pair<std::string, at::Tensor*>> attach_trainable_lora(model::Decoder& dec, double dropout,
                                                                       int64_t r = 4) {
  model::LoraAdapter adapter;
  adapter.config.r = r;
  adapter.config.alpha = 2.0 * static_cast<double>(r);
  adapter.config.dropout = dropout;
  adapter.config.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  for (auto& [name, lin] : dec.named_linears())
    adapter.weights[name] = {at::randn({r, lin->weight.size(1)}, gen) * 0.1, at::randn({lin->weight.size(0), r}, gen) * 0.1};
  model::attach_lora(dec, adapter, /*trainable=*/true);
  return model::lora_parameters(dec);
}

model::ForwardInput input_of(const data::Batch& b) {
  model::ForwardInput in;
  in.input_ids = b.input_ids;            // [B, T]
  in.attention_mask = b.attention_mask;  // [B, T]
  in.segment_ids = b.segment_ids;        // [B, T] for packed batches, else undefined
  return in;
}

struct Result {
  double loss = 0.0;
  std::vector<at::Tensor> grads;
  at::Tensor rng_after;  // the CPU generator state after forward + backward
};

// One training forward + backward of the batch; `seed` seeds the dropout masks.
Result step(model::Decoder& dec, const std::vector<std::pair<std::string, at::Tensor*>>& params, const data::Batch& b,
            bool checkpoint, const model::ActivationHook* hook = nullptr, int64_t checkpoint_count = -1) {
  for (auto& [name, p] : params) p->mutable_grad() = at::Tensor();
  at::manual_seed(1234);
  const model::ForwardInput in = input_of(b);
  model::ForwardOptions fo;
  fo.training = true;
  fo.checkpoint_layers = checkpoint;
  fo.checkpoint_layer_count = checkpoint_count;
  fo.hook = hook;
  at::Tensor loss = model::causal_lm_loss(dec.forward(in, fo).logits, b.labels);
  (void)at::rand({16});  // the generator moves on between forward and backward: the recomputation must not
  loss.backward();
  Result r;
  r.loss = loss.item<double>();
  for (auto& [name, p] : params) {
    EXPECT_TRUE(p->grad().defined()) << name << (checkpoint ? " (checkpointing)" : "");
    r.grads.push_back(p->grad().defined() ? p->grad().clone() : at::zeros_like(*p));
  }
  r.rng_after = at::globalContext().defaultGenerator(at::kCPU).get_state();
  return r;
}

void expect_same(const Result& a, const Result& b, const std::vector<std::pair<std::string, at::Tensor*>>& params) {
  EXPECT_NEAR(a.loss, b.loss, 1e-6);
  ASSERT_EQ(a.grads.size(), b.grads.size());
  double largest = 0.0;
  for (size_t i = 0; i < a.grads.size(); ++i) {
    EXPECT_LT((a.grads[i] - b.grads[i]).abs().max().item<double>(), 1e-6) << params[i].first;
    largest = std::max(largest, b.grads[i].abs().max().item<double>());
  }
  EXPECT_GT(largest, 1e-3);  // real gradients, not zeros
  EXPECT_TRUE(at::equal(a.rng_after, b.rng_after)) << "checkpointing moved the generator";
}

// Distinct autograd nodes reachable from `t`, by name, without the leaves' AccumulateGrad.
std::map<std::string, int> graph_nodes(const at::Tensor& t) {
  std::map<std::string, int> names;
  std::set<torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> unvisited{t.grad_fn().get()};
  while (!unvisited.empty()) {
    auto* n = unvisited.back();
    unvisited.pop_back();
    if (!n || !seen.insert(n).second) continue;
    if (n->name() != "torch::autograd::AccumulateGrad") ++names[n->name()];
    for (const auto& e : n->next_edges()) unvisited.push_back(e.function.get());
  }
  return names;
}

int total(const std::map<std::string, int>& m) {
  int s = 0;
  for (const auto& [k, v] : m) s += v;
  return s;
}

}  // namespace

// LoRA with dropout 0.3: the recomputation must replay the dropout masks of the first pass.
TEST(Checkpointing, LoraWithDropoutMatchesWithoutCheckpointing) {
  auto dec = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  auto params = attach_trainable_lora(dec, 0.3);
  const auto ex = examples(3, 1);
  const data::Batch b = data::make_batch(ex, 0, ex.size(), 0);
  const Result plain = step(dec, params, b, false), ckpt = step(dec, params, b, true);
  expect_same(ckpt, plain, params);
  // Dropout is really on: another seed gives another loss (so a recomputation with other masks would
  // have given other gradients).
  at::manual_seed(99);
  model::ForwardOptions fo;
  fo.training = true;
  at::NoGradGuard no_grad;
  const double other = model::causal_lm_loss(dec.forward(input_of(b), fo).logits, b.labels)
                           .item<double>();
  EXPECT_GT(std::abs(other - plain.loss), 1e-4);
}

// Checkpointing only the first N layers (train.checkpoint_layers): one Node per checkpointed layer, the
// other layers' insides in the graph as usual, and the same gradients (dropout on).
TEST(Checkpointing, FirstLayersOnlyMatchesWithoutCheckpointing) {
  auto dec = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  const int64_t L = dec.config().num_hidden_layers;
  ASSERT_GE(L, 2);
  auto params = attach_trainable_lora(dec, 0.3);
  const auto ex = examples(3, 1);
  const data::Batch b = data::make_batch(ex, 0, ex.size(), 0);
  const Result plain = step(dec, params, b, false);
  for (int64_t n : {int64_t{0}, int64_t{1}, L - 1, L + 3}) {
    SCOPED_TRACE("checkpoint_layer_count " + std::to_string(n));
    expect_same(step(dec, params, b, true, nullptr, n), plain, params);
    model::ForwardOptions fo;
    fo.training = true;
    fo.checkpoint_layers = true;
    fo.checkpoint_layer_count = n;
    const auto nodes = graph_nodes(dec.forward(input_of(b), fo).logits);
    const auto it = nodes.find("sparsecl::LayerCheckpointBackward");
    EXPECT_EQ(it == nodes.end() ? 0 : it->second, std::min(n, L));
    EXPECT_EQ(nodes.count("TransposeBackward0") > 0, n < L);  // some layer's insides are in the graph
  }
}

// Full fine-tuning: every base weight (embeddings included, so the layer inputs require grad) trains.
TEST(Checkpointing, FullFineTuningMatchesWithoutCheckpointing) {
  auto dec = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  std::vector<std::pair<std::string, at::Tensor*>> params;
  for (auto& [name, p] : dec.named_parameters()) {
    p->requires_grad_(true);
    params.push_back({name, p});
  }
  const auto ex = examples(3, 2);
  const data::Batch b = data::make_batch(ex, 0, ex.size(), 0);
  expect_same(step(dec, params, b, true), step(dec, params, b, false), params);
}

// Indexed (neuron) deltas of the mask method: rows of gate_proj / up_proj, columns of down_proj.
TEST(Checkpointing, IndexedDeltasMatchWithoutCheckpointing) {
  auto dec = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  std::vector<std::pair<std::string, at::Tensor*>> params;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor index = at::tensor(std::vector<int64_t>{1, 7, 40}, at::kLong);
  for (auto& [name, lin] : dec.named_linears()) {
    const bool rows = name.find("gate_proj") != std::string::npos || name.find("up_proj") != std::string::npos;
    const bool columns = name.find("down_proj") != std::string::npos;
    if (!rows && !columns) continue;
    model::IndexedDelta d;
    d.index = index;
    d.columns = columns;
    d.delta = (at::randn(columns ? std::vector<int64_t>{lin->weight.size(0), 3} : std::vector<int64_t>{3, lin->weight.size(1)},
                         gen) * 0.05).requires_grad_(true);
    lin->indexed.push_back(d);
    params.push_back({name, &lin->indexed.back().delta});
  }
  const auto ex = examples(3, 8);
  const data::Batch b = data::make_batch(ex, 0, ex.size(), 0);
  expect_same(step(dec, params, b, true), step(dec, params, b, false), params);
}

// Packed rows (segment_ids) and LoRA with dropout together.
TEST(Checkpointing, PackedBatchMatchesWithoutCheckpointing) {
  auto dec = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  auto params = attach_trainable_lora(dec, 0.1);
  const auto ex = examples(6, 3);
  std::vector<std::vector<const data::Example*>> rows = {{&ex[0], &ex[1], &ex[2]}, {&ex[3], &ex[4], &ex[5]}};
  const data::Batch b = data::make_packed_batch(rows, 0);
  expect_same(step(dec, params, b, true), step(dec, params, b, false), params);
}

// The hook runs once per layer and point in the first pass, not again in the recomputation; mlp_act
// and hidden_states are still returned.
TEST(Checkpointing, HookSeesEachLayerOnce) {
  auto dec = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  auto params = attach_trainable_lora(dec, 0.1);
  const auto ex = examples(2, 4);
  const data::Batch b = data::make_batch(ex, 0, ex.size(), 0);
  std::map<std::pair<int, int64_t>, int> calls;
  bool saw_grad = false;
  model::ActivationHook hook = [&](model::HookPoint p, int64_t l, const at::Tensor& t) {
    ++calls[{static_cast<int>(p), l}];
    saw_grad = saw_grad || t.requires_grad();
  };
  step(dec, params, b, true, &hook);
  const int64_t L = dec.config().num_hidden_layers;
  EXPECT_EQ(static_cast<int64_t>(calls.size()), 5 * L);
  for (const auto& [key, n] : calls) EXPECT_EQ(n, 1) << "point " << key.first << " layer " << key.second;
  EXPECT_FALSE(saw_grad);  // the first pass runs without autograd

  model::ForwardOptions fo;
  fo.training = true;
  fo.checkpoint_layers = true;
  fo.mlp_act = true;
  fo.hidden_states = true;
  auto out = dec.forward(input_of(b), fo);
  EXPECT_EQ(static_cast<int64_t>(out.mlp_act.size()), L);
  EXPECT_EQ(static_cast<int64_t>(out.hidden_states.size()), L + 1);
}

// What checkpointing saves: the graph holds one LayerCheckpointBackward per layer and no node of the
// layers' insides; without checkpointing every intermediate op of every layer is in it.
TEST(Checkpointing, GraphKeepsOneNodePerLayer) {
  auto dec = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  auto params = attach_trainable_lora(dec, 0.0);
  const auto ex = examples(2, 5);
  const data::Batch b = data::make_batch(ex, 0, ex.size(), 0);
  model::ForwardOptions fo;
  fo.training = true;
  const at::Tensor plain = dec.forward(input_of(b), fo).logits;
  fo.checkpoint_layers = true;
  const at::Tensor ckpt = dec.forward(input_of(b), fo).logits;
  EXPECT_LT((plain - ckpt).abs().max().item<double>(), 1e-6);
  const auto a = graph_nodes(plain), c = graph_nodes(ckpt);
  const int64_t L = dec.config().num_hidden_layers;
  EXPECT_EQ(c.count("sparsecl::LayerCheckpointBackward") ? c.at("sparsecl::LayerCheckpointBackward") : 0, L);
  EXPECT_EQ(a.count("sparsecl::LayerCheckpointBackward"), 0u);
  EXPECT_GT(a.count("TransposeBackward0"), 0u);  // the attention's head transposes, inside every layer
  EXPECT_EQ(c.count("TransposeBackward0"), 0u);
  EXPECT_LT(total(c) * 5, total(a));
  // Without grad mode the option changes nothing (no Node, no recomputation).
  at::NoGradGuard no_grad;
  const at::Tensor inference = dec.forward(input_of(b), fo).logits;
  EXPECT_FALSE(inference.requires_grad());
  EXPECT_LT((inference - ckpt.detach()).abs().max().item<double>(), 1e-6);
}

TEST(Checkpointing, RejectsKVCache) {
  auto dec = model::Decoder::load(kModel, at::kFloat, at::kCPU);
  model::KVCache cache(dec.config(), 1, 8, at::kFloat, at::kCPU);
  model::ForwardOptions fo;
  fo.cache = &cache;
  fo.checkpoint_layers = true;
  model::ForwardInput in;
  in.input_ids = at::ones({1, 3}, at::kLong);
  EXPECT_THROW(dec.forward(in, fo), Error);
}

// The trainer with train.activation_checkpointing: the same step log as without (within 1e-6), and a
// checkpointed + packed run resumes bit for bit.
TEST(Checkpointing, TrainerMatchesAndResumes) {
  const auto ex = examples(9, 6);
  auto options = [](bool ckpt) {
    train::TrainOptions o;
    o.steps = 4;
    o.batch_size = 2;
    o.grad_accum = 2;
    o.lr = 5e-3;
    o.warmup_steps = 1;
    o.seed = 5;
    o.progress = false;
    o.packing = true;
    o.max_length = 32;
    o.activation_checkpointing = ckpt;
    return o;
  };
  model::LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8;
  lc.dropout = 0.2;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  const train::RunInfo info{json{{"t", 1}}, "h", kModel.string()};
  TempDir plain("plain"), ckpt("ckpt"), split("split");
  auto run = [&](const fs::path& dir, train::TrainOptions o) {
    auto dec = model::Decoder::load(kModel, at::kFloat, at::kCPU);
    train::LoraMethod method(lc, 3);
    train::train(dec, method, ex, o, dir, info);
  };
  run(plain.path, options(false));
  run(ckpt.path, options(true));
  auto o = options(true);
  o.stop_after = 2;
  run(split.path, o);
  o.stop_after = 0;
  o.resume = true;
  run(split.path, o);
  const auto read = testing_support::read_step_log;
  const auto a = read(plain.path / "train_log.jsonl"), c = read(ckpt.path / "train_log.jsonl"),
             s = read(split.path / "train_log.jsonl");
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(c.size(), 4u);
  ASSERT_EQ(s.size(), 4u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_NEAR(a[i]["loss"].get<double>(), c[i]["loss"].get<double>(), 1e-6) << "step " << i + 1;
    EXPECT_NEAR(a[i]["grad_norm"].get<double>(), c[i]["grad_norm"].get<double>(), 1e-6) << "step " << i + 1;
    EXPECT_EQ(a[i]["tokens"], c[i]["tokens"]);
    EXPECT_EQ(c[i].dump(), s[i].dump()) << "step " << i + 1;
  }
  const json manifest = json::parse(std::ifstream(ckpt.path / "manifest.json"));
  EXPECT_TRUE(manifest["train"]["activation_checkpointing"].get<bool>());
}

namespace {

int64_t proc_status_kb(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::stoll(line.substr(std::string(key).size()));
  return -1;
}

}  // namespace

// SmolLM2-135M, fp32 CPU, LoRA r=8 on every projection, batch 2 x 256 tokens: time per training step
// (forward + backward) and the peak resident memory above the state before the step, with and without
// checkpointing. Long (tens of seconds): only with SPARSECL_LONG=1.
TEST(Checkpointing, MeasureSmolLM2) {
  if (!std::getenv("SPARSECL_LONG")) GTEST_SKIP() << "set SPARSECL_LONG=1 to measure on SmolLM2-135M";
  if (!fs::exists(kSmol / "model.safetensors")) GTEST_SKIP() << kSmol << " not present";
  auto dec = model::Decoder::load(kSmol, at::kFloat, at::kCPU);
  auto params = attach_trainable_lora(dec, 0.05, 8);
  const auto ex = examples(2, 7, dec.config().vocab_size, 256, 1);
  const data::Batch b = data::make_batch(ex, 0, ex.size(), 0);  // [2, 256]
  const char* only = std::getenv("SPARSECL_CKPT_MODE");        // "on" / "off": measure one mode only
  std::map<bool, Result> results;
  for (bool ckpt : {false, true, false, true}) {
    if (only && std::string(only) != (ckpt ? "on" : "off")) continue;
    ::malloc_trim(0);
    { std::ofstream("/proc/self/clear_refs") << "5"; }  // resets VmHWM to the current RSS
    const int64_t base = proc_status_kb("VmRSS:");
    const auto t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    Result r = step(dec, params, b, ckpt);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double cpu = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;  // all threads: robust to a loaded box
    const int64_t peak = proc_status_kb("VmHWM:");
    std::printf("[measure] checkpointing %-3s  step %.2f s wall, %.2f s CPU  peak RSS %.0f MiB (+%.0f MiB over %.0f MiB "
                "before the step)\n",
                ckpt ? "on" : "off", s, cpu, peak / 1024.0, (peak - base) / 1024.0, base / 1024.0);
    results[ckpt] = std::move(r);
  }
  if (results.size() == 2) {
    EXPECT_NEAR(results[true].loss, results[false].loss, 1e-5);
    double diff = 0.0, largest = 0.0;
    for (size_t i = 0; i < params.size(); ++i) {
      diff = std::max(diff, (results[true].grads[i] - results[false].grads[i]).abs().max().item<double>());
      largest = std::max(largest, results[false].grads[i].abs().max().item<double>());
    }
    std::printf("[measure] max |grad difference| %.3g (largest gradient %.3g)\n", diff, largest);
    EXPECT_LT(diff, 1e-5 * std::max(1.0, largest));
  }
}
