// The shared trainer (include/sparsecl/train/trainer.h) with the lora and full methods on the llama3
// fixture model: the schedule, PEFT's LoRA init, bit-exact CPU determinism including checkpoint +
// resume (6 steps == 3 steps, checkpoint, resume 3), refusal of mismatched resumes, the PEFT adapter
// round trip and the full-model output directory, and that training lowers the loss.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

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

using testing_support::TempDir;

// Pre-tokenized examples of varying length (vocab 512), with the first few tokens of each masked out
// of the loss, as a prompt would be.
std::vector<data::Example> fixture_examples(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<data::Example> out;
  for (int64_t i = 0; i < count; ++i) {
    data::Example e;
    const int64_t len = 8 + static_cast<int64_t>(data::uniform_below(rng, 16));
    for (int64_t t = 0; t < len; ++t) {
      // A learnable pattern: token t+1 follows from token t most of the time.
      const int64_t prev = t == 0 ? 3 + static_cast<int64_t>(data::uniform_below(rng, 50)) : e.ids.back();
      e.ids.push_back(data::uniform_below(rng, 4) == 0 ? 3 + static_cast<int64_t>(data::uniform_below(rng, 500))
                                                       : (prev * 7 + 1) % 509 + 3);
      e.loss_mask.push_back(t >= 3 ? 1 : 0);
    }
    out.push_back(std::move(e));
  }
  return out;
}

model::LoraConfig fixture_lora(double dropout = 0.1) {
  model::LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.dropout = dropout;
  c.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return c;
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
  o.log_every = 1;
  return o;
}

train::RunInfo fixture_info(const std::string& hash = "0123456789abcdef") {
  return {json{{"fixture", true}}, hash, kModel.string()};
}

// The step log without the wall-clock field (tokens_per_s differs between runs by nature).
std::vector<json> read_log(const fs::path& file) {
  std::vector<json> lines;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line);
    EXPECT_TRUE(j.contains("tokens_per_s"));
    j.erase("tokens_per_s");
    lines.push_back(j);
  }
  return lines;
}

model::Decoder load_model() { return model::Decoder::load(kModel, at::kFloat, at::kCPU); }

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::equal(a, b);
}

}  // namespace

TEST(Train, CosineScheduleWithWarmup) {
  train::TrainOptions o;
  o.lr = 1.0;
  o.steps = 10;
  o.warmup_steps = 2;
  EXPECT_DOUBLE_EQ(train::learning_rate(o, 0), 0.0);
  EXPECT_DOUBLE_EQ(train::learning_rate(o, 1), 0.5);
  EXPECT_DOUBLE_EQ(train::learning_rate(o, 2), 1.0);
  EXPECT_NEAR(train::learning_rate(o, 6), 0.5, 1e-12);  // halfway through the cosine
  EXPECT_NEAR(train::learning_rate(o, 10), 0.0, 1e-12);
  o.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(train::learning_rate(o, 0), 1.0);
}

TEST(Train, EpochOrdersArePermutationsThatDifferPerEpoch) {
  auto a = train::epoch_order(50, 3, 0), b = train::epoch_order(50, 3, 1);
  EXPECT_EQ(a, train::epoch_order(50, 3, 0));
  EXPECT_NE(a, b);
  std::sort(b.begin(), b.end());
  for (int64_t i = 0; i < 50; ++i) EXPECT_EQ(b[static_cast<size_t>(i)], i);
}

TEST(Train, LoraInitFollowsPeft) {
  auto dec = load_model();
  train::LoraMethod method(fixture_lora(), 11);
  auto params = method.setup(dec);
  ASSERT_EQ(params.size(), 3u * 7u * 2u);
  for (const auto& [name, p] : params) {
    EXPECT_EQ(p->scalar_type(), at::kFloat) << name;
    EXPECT_TRUE(p->requires_grad()) << name;
    if (name.find("lora_B") != std::string::npos) {
      EXPECT_EQ(p->abs().max().item<float>(), 0.0f) << name;
    } else {
      const double bound = 1.0 / std::sqrt(static_cast<double>(p->size(1)));
      EXPECT_LE(p->abs().max().item<double>(), bound) << name;
      EXPECT_GT(p->abs().max().item<double>(), 0.5 * bound) << name;
    }
  }
  // Seeded: the same seed gives the same A, another seed another one.
  auto dec2 = load_model(), dec3 = load_model();
  train::LoraMethod same(fixture_lora(), 11), other(fixture_lora(), 12);
  auto p2 = same.setup(dec2);
  auto p3 = other.setup(dec3);
  EXPECT_TRUE(bitwise_equal(*params[0].second, *p2[0].second));
  EXPECT_FALSE(bitwise_equal(*params[0].second, *p3[0].second));
}

TEST(Train, TargetModulesMatchAtDotBoundaries) {
  EXPECT_TRUE(train::module_targeted("model.layers.0.self_attn.q_proj", {"q_proj"}));
  EXPECT_TRUE(train::module_targeted("model.layers.0.self_attn.q_proj", {"self_attn.q_proj"}));
  EXPECT_FALSE(train::module_targeted("model.layers.0.self_attn.xq_proj", {"q_proj"}));
  EXPECT_FALSE(train::module_targeted("model.layers.0.mlp.up_proj", {"q_proj", "down_proj"}));
}

// 6 steps in one go == 3 steps, checkpoint, resume for 3 more: the same step log (loss, lr, tokens,
// grad_norm) bit for bit, and the same adapter. LoRA dropout is on, so the RNG state must be restored too.
TEST(Train, LoraResumeReproducesTheRunBitForBit) {
  const auto examples = fixture_examples(10, 1);  // 10 examples, 6 per step: crosses epochs
  TempDir full("full"), split("split");
  {
    auto dec = load_model();
    train::LoraMethod method(fixture_lora(), 3);
    auto r = train::train(dec, method, examples, fixture_options(6), full.path, fixture_info());
    EXPECT_TRUE(r.finished);
    EXPECT_EQ(r.steps_done, 6);
  }
  {
    auto dec = load_model();
    train::LoraMethod method(fixture_lora(), 3);
    auto o = fixture_options(6);
    o.stop_after = 3;
    auto r = train::train(dec, method, examples, o, split.path, fixture_info());
    EXPECT_FALSE(r.finished);
    EXPECT_EQ(r.steps_done, 3);
    EXPECT_TRUE(fs::exists(split.path / "checkpoints" / "step-00000003" / "optimizer.safetensors"));
    EXPECT_FALSE(fs::exists(split.path / "adapter_model.safetensors"));
  }
  {
    auto dec = load_model();  // a fresh process would start like this
    train::LoraMethod method(fixture_lora(), 3);
    auto o = fixture_options(6);
    o.resume = true;
    auto r = train::train(dec, method, examples, o, split.path, fixture_info());
    EXPECT_TRUE(r.finished);
    EXPECT_EQ(r.steps_done, 6);
  }
  const auto a = read_log(full.path / "train_log.jsonl"), b = read_log(split.path / "train_log.jsonl");
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].dump(), b[i].dump()) << "step " << i + 1;
  EXPECT_LT(a.back()["loss"].get<double>(), a.front()["loss"].get<double>());

  const auto wa = model::LoraAdapter::load(full.path), wb = model::LoraAdapter::load(split.path);
  ASSERT_EQ(wa.weights.size(), 21u);
  for (const auto& [m, ab] : wa.weights) {
    EXPECT_TRUE(bitwise_equal(ab.first, wb.weights.at(m).first)) << m;
    EXPECT_TRUE(bitwise_equal(ab.second, wb.weights.at(m).second)) << m;
    EXPECT_GT(ab.second.abs().max().item<float>(), 0.0f) << m;  // B has moved off zero
  }
  const json manifest = json::parse(std::ifstream(full.path / "manifest.json"));
  EXPECT_EQ(manifest["status"], "finished");
  EXPECT_EQ(manifest["config_hash"], "0123456789abcdef");
  EXPECT_EQ(manifest["seed"], 7);
  EXPECT_TRUE(manifest["versions"].contains("libtorch"));
  EXPECT_EQ(manifest["base_model"], kModel.string());
}

// The saved adapter, loaded and attached to a fresh model, gives the trained model's logits.
TEST(Train, SavedAdapterReproducesTheTrainedModel) {
  const auto examples = fixture_examples(6, 2);
  TempDir out("adapter");
  auto dec = load_model();
  train::LoraMethod method(fixture_lora(0.0), 5);
  auto o = fixture_options(3);
  train::train(dec, method, examples, o, out.path, fixture_info());
  const json cfg = json::parse(std::ifstream(out.path / "adapter_config.json"));
  EXPECT_EQ(cfg["r"], 4);
  EXPECT_EQ(cfg["peft_type"], "LORA");

  auto fresh = load_model();
  model::attach_lora(fresh, model::LoraAdapter::load(out.path));
  data::Batch batch = data::make_batch(examples, 0, examples.size(), 0);
  at::NoGradGuard no_grad;
  model::ForwardInput in{batch.input_ids, batch.attention_mask, {}};
  const at::Tensor want = dec.forward(in).logits, got = fresh.forward(in).logits;  // [B, T, V]
  EXPECT_LT((want - got).abs().max().item<double>(), 1e-5);
  // heldout_loss agrees with the trained decoder and with the reloaded adapter.
  EXPECT_NEAR(train::heldout_loss(dec, examples, 4, 0).loss, train::heldout_loss(fresh, examples, 2, 0).loss, 1e-5);
  // merge_lora (the driver's stage transition) keeps the function.
  model::merge_lora(fresh);
  EXPECT_LT((fresh.forward(in).logits - want).abs().max().item<double>(), 1e-4);
}

TEST(Train, FullResumeReproducesTheRunAndWritesAModelDirectory) {
  const auto examples = fixture_examples(8, 3);
  TempDir full("full_ft"), split("full_split");
  auto o = fixture_options(4);
  o.lr = 1e-3;
  {
    auto dec = load_model();
    train::FullMethod method;
    train::train(dec, method, examples, o, full.path, fixture_info());
  }
  {
    auto dec = load_model();
    train::FullMethod method;
    auto o2 = o;
    o2.stop_after = 2;
    train::train(dec, method, examples, o2, split.path, fixture_info());
  }
  {
    auto dec = load_model();
    train::FullMethod method;
    auto o3 = o;
    o3.resume = true;
    train::train(dec, method, examples, o3, split.path, fixture_info());
  }
  const auto a = read_log(full.path / "train_log.jsonl"), b = read_log(split.path / "train_log.jsonl");
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].dump(), b[i].dump()) << "step " << i + 1;
  EXPECT_LT(a.back()["loss"].get<double>(), a.front()["loss"].get<double>());
  // The output is a model directory: it loads, and differs from the base.
  auto trained = model::Decoder::load(full.path, at::kFloat, at::kCPU);
  auto base = load_model();
  EXPECT_GT(train::heldout_loss(base, examples, 4, 0).loss, train::heldout_loss(trained, examples, 4, 0).loss);
}

TEST(Train, RefusesMismatchedOrClobberingRuns) {
  const auto examples = fixture_examples(6, 4);
  TempDir out("refuse");
  auto o = fixture_options(2);
  o.stop_after = 1;
  {
    auto dec = load_model();
    train::LoraMethod method(fixture_lora(), 1);
    train::train(dec, method, examples, o, out.path, fixture_info());
  }
  {  // same directory without --resume: refused
    auto dec = load_model();
    train::LoraMethod method(fixture_lora(), 1);
    EXPECT_THROW(train::train(dec, method, examples, fixture_options(2), out.path, fixture_info()), Error);
  }
  {  // resume with another config: refused, naming the checkpoint state
    auto dec = load_model();
    train::LoraMethod method(fixture_lora(), 1);
    auto o2 = fixture_options(2);
    o2.resume = true;
    try {
      train::train(dec, method, examples, o2, out.path, fixture_info("ffffffffffffffff"));
      FAIL() << "expected an error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("state.json"), std::string::npos) << e.what();
    }
  }
  {  // resume with another method: refused
    auto dec = load_model();
    train::FullMethod method;
    auto o2 = fixture_options(2);
    o2.resume = true;
    EXPECT_THROW(train::train(dec, method, examples, o2, out.path, fixture_info()), Error);
  }
  {  // full fine-tuning of a bf16 model: refused with a message naming dtype
    auto dec = model::Decoder::load(kModel, at::kBFloat16, at::kCPU);
    train::FullMethod method;
    try {
      method.setup(dec);
      FAIL() << "expected an error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("dtype"), std::string::npos) << e.what();
    }
  }
}
