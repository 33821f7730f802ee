// Packing (train.packing): data::pack_first_fit / data::make_packed_batch and the decoder's segment_ids on
// the llama3 fixture model (fp32 CPU). A packed batch must compute exactly what the same examples compute
// right-padded: the same loss and gradients (within 1e-5), each segment's logits equal to the example run
// alone; and the trainer with packing must stay bit-exact across checkpoint + resume.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "sparsecl/common/error.h"
#include "sparsecl/config/schema.h"
#include "sparsecl/model/lora.h"
#include "sparsecl/train/methods.h"
#include "sparsecl/train/trainer.h"

#include "test_support.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using nlohmann::json;

namespace {

const fs::path kModel = fs::path(SPARSECL_TEST_DATA) / "models" / "llama3";

using testing_support::TempDir;

// Pre-tokenized examples of 5..20 tokens (vocab 512), the first two tokens of each outside the loss.
std::vector<data::Example> examples(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<data::Example> out;
  for (int64_t i = 0; i < count; ++i) {
    data::Example e;
    const int64_t len = 5 + static_cast<int64_t>(data::uniform_below(rng, 16));
    for (int64_t t = 0; t < len; ++t) {
      e.ids.push_back(3 + static_cast<int64_t>(data::uniform_below(rng, 500)));
      e.loss_mask.push_back(t >= 2 ? 1 : 0);
    }
    out.push_back(std::move(e));
  }
  return out;
}

model::Decoder load_model() { return model::Decoder::load(kModel, at::kFloat, at::kCPU); }

// Every base weight trainable plus a LoRA adapter with B != 0 on every projection: gradients reach all
// kinds of tensors the trainer trains.
std::vector<std::pair<std::string, at::Tensor*>> make_trainable(model::Decoder& dec) {
  model::LoraAdapter adapter;
  adapter.config.r = 2;
  adapter.config.alpha = 4;
  adapter.config.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  at::manual_seed(5);
  for (auto& [name, lin] : dec.named_linears())
    adapter.weights[name] = {at::randn({2, lin->weight.size(1)}) * 0.1, at::randn({lin->weight.size(0), 2}) * 0.1};
  model::attach_lora(dec, adapter, /*trainable=*/true);
  auto params = model::lora_parameters(dec);
  for (auto& [name, p] : dec.named_parameters()) {
    p->requires_grad_(true);
    params.push_back({name, p});
  }
  return params;
}

std::vector<std::vector<const data::Example*>> as_rows(const std::vector<data::Example>& ex,
                                                       const std::vector<std::vector<size_t>>& rows) {
  std::vector<std::vector<const data::Example*>> out;
  for (const auto& r : rows) {
    out.emplace_back();
    for (size_t i : r) out.back().push_back(&ex[i]);
  }
  return out;
}

model::LoraConfig lora() {
  model::LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.dropout = 0.1;
  c.target_modules = {"q_proj", "v_proj", "down_proj"};
  return c;
}

train::TrainOptions packed_options(int64_t steps) {
  train::TrainOptions o;
  o.steps = steps;
  o.batch_size = 2;
  o.grad_accum = 2;
  o.lr = 5e-3;
  o.warmup_steps = 1;
  o.seed = 9;
  o.progress = false;
  o.packing = true;
  o.max_length = 40;
  return o;
}


}  // namespace

TEST(Packing, FirstFitTakesAPrefixOfTheOrder) {
  // rows of 8: 5 -> row 0; 3 -> row 0 (8); 4 -> row 1; 2 -> row 1 (6); 6 fits nowhere: stop there,
  // even though the 1 after it would fit.
  const auto rows = data::pack_first_fit({5, 3, 4, 2, 6, 1}, 2, 8);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0], (std::vector<size_t>{0, 1}));
  EXPECT_EQ(rows[1], (std::vector<size_t>{2, 3}));
  // First fit, not next fit: a later short example goes back into an earlier row with room.
  const auto back = data::pack_first_fit({6, 5, 2, 3}, 3, 8);
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[0], (std::vector<size_t>{0, 2}));
  EXPECT_EQ(back[1], (std::vector<size_t>{1, 3}));
  EXPECT_THROW(data::pack_first_fit({3, 9}, 2, 8), Error);
}

TEST(Packing, PackedBatchKeepsExamplesApart) {
  const auto ex = examples(5, 1);
  const auto rows = data::pack_first_fit({static_cast<int64_t>(ex[0].ids.size()), static_cast<int64_t>(ex[1].ids.size()),
                                          static_cast<int64_t>(ex[2].ids.size())},
                                         1, 64);
  ASSERT_EQ(rows.size(), 1u);
  ASSERT_EQ(rows[0].size(), 3u);
  const data::Batch packed = data::make_packed_batch(as_rows(ex, rows), 0);
  const data::Batch padded = data::make_batch(ex, 0, 3, 0);
  EXPECT_EQ(packed.num_label_tokens, padded.num_label_tokens);
  EXPECT_EQ(packed.num_tokens, padded.num_tokens);
  ASSERT_TRUE(packed.segment_ids.defined());
  auto seg = packed.segment_ids.accessor<int64_t, 2>();
  auto labels = packed.labels.accessor<int64_t, 2>();
  auto ids = packed.input_ids.accessor<int64_t, 2>();
  int64_t pos = 0;
  for (int64_t s = 0; s < 3; ++s) {
    for (size_t t = 0; t < ex[s].ids.size(); ++t, ++pos) {
      EXPECT_EQ(seg[0][pos], s + 1);
      EXPECT_EQ(ids[0][pos], ex[s].ids[t]);
      // The first token of every segment is no target (nothing predicts across the boundary).
      EXPECT_EQ(labels[0][pos], t >= 2 ? ex[s].ids[t] : -100) << "segment " << s << " token " << t;
    }
  }
  EXPECT_EQ(packed.lengths[0], pos);
}

// The same examples packed (2 rows) and right-padded (one per row): equal loss and gradients of every
// trainable tensor (base weights and LoRA A / B) within 1e-5.
TEST(Packing, PackedLossAndGradientsEqualUnpadded) {
  const auto ex = examples(7, 2);
  std::vector<int64_t> lengths;
  for (const auto& e : ex) lengths.push_back(static_cast<int64_t>(e.ids.size()));
  const auto rows = data::pack_first_fit(lengths, 2, 64);
  size_t packed_count = 0;
  for (const auto& r : rows) packed_count += r.size();
  ASSERT_EQ(packed_count, ex.size()) << "the fixture should fit in two rows of 64";
  const data::Batch packed = data::make_packed_batch(as_rows(ex, rows), 0);
  const data::Batch padded = data::make_batch(ex, 0, ex.size(), 0);
  ASSERT_EQ(packed.num_label_tokens, padded.num_label_tokens);

  auto run = [&](const data::Batch& b, bool use_segments) {
    auto dec = load_model();
    auto params = make_trainable(dec);
    model::ForwardInput in;
    in.input_ids = b.input_ids;
    in.attention_mask = b.attention_mask;
    if (use_segments) in.segment_ids = b.segment_ids;
    model::ForwardOptions fo;
    fo.training = true;
    at::Tensor loss = model::causal_lm_loss(dec.forward(in, fo).logits, b.labels);
    loss.backward();
    std::vector<at::Tensor> grads;
    for (auto& [name, p] : params) {
      EXPECT_TRUE(p->grad().defined()) << name;
      grads.push_back(p->grad().clone());
    }
    return std::make_pair(loss.item<double>(), grads);
  };
  const auto [loss_packed, grads_packed] = run(packed, true);
  const auto [loss_padded, grads_padded] = run(padded, false);
  EXPECT_NEAR(loss_packed, loss_padded, 1e-5);
  ASSERT_EQ(grads_packed.size(), grads_padded.size());
  double max_diff = 0.0, max_grad = 0.0;
  for (size_t i = 0; i < grads_packed.size(); ++i) {
    max_diff = std::max(max_diff, (grads_packed[i] - grads_padded[i]).abs().max().item<double>());
    max_grad = std::max(max_grad, grads_padded[i].abs().max().item<double>());
  }
  EXPECT_LT(max_diff, 1e-5);
  EXPECT_GT(max_grad, 1e-3);  // the comparison is not between zeros

  // Without segment_ids the same packed rows attend across examples: the loss differs (the test can fail).
  const auto [loss_mixed, grads_mixed] = run(packed, false);
  EXPECT_GT(std::abs(loss_mixed - loss_padded), 1e-3);
}

// Each segment of a packed row gives the logits of its example run alone (positions restart at 0 per
// segment as HF does; RoPE being relative, a shifted start would differ only by rounding).
TEST(Packing, SegmentLogitsEqualTheExampleAlone) {
  const auto ex = examples(6, 3);
  const std::vector<std::vector<size_t>> rows = {{0, 1, 2}, {3, 4, 5}};
  const data::Batch packed = data::make_packed_batch(as_rows(ex, rows), 0);
  auto dec = load_model();
  at::NoGradGuard no_grad;
  model::ForwardInput in;
  in.input_ids = packed.input_ids;
  in.segment_ids = packed.segment_ids;
  const at::Tensor logits = dec.forward(in).logits;  // [2, T, V]
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t start = 0;
    for (size_t i : rows[r]) {
      const int64_t n = static_cast<int64_t>(ex[i].ids.size());
      model::ForwardInput alone;
      alone.input_ids = at::tensor(ex[i].ids, at::kLong).unsqueeze(0);  // [1, n]
      const at::Tensor want = dec.forward(alone).logits[0];                // [n, V]
      const at::Tensor got = logits[static_cast<int64_t>(r)].narrow(0, start, n);
      EXPECT_LT((got - want).abs().max().item<double>(), 1e-5) << "row " << r << " example " << i;
      start += n;
    }
  }
  // Without segment_ids the later examples of a row see the earlier ones: the comparison can fail.
  model::ForwardInput mixed;
  mixed.input_ids = packed.input_ids;
  mixed.attention_mask = packed.attention_mask;
  const at::Tensor other = dec.forward(mixed).logits;
  const int64_t second = static_cast<int64_t>(ex[0].ids.size());
  EXPECT_GT((other[0].narrow(0, second, 2) - logits[0].narrow(0, second, 2)).abs().max().item<double>(), 1e-3);
}

TEST(Packing, SegmentIdsAreValidated) {
  auto dec = load_model();
  at::NoGradGuard no_grad;
  model::ForwardInput in;
  in.input_ids = at::ones({2, 5}, at::kLong);
  in.segment_ids = at::ones({2, 4}, at::kLong);
  EXPECT_THROW(dec.forward(in), Error);
  in.segment_ids = at::full({2, 5}, -1, at::kLong);
  EXPECT_THROW(dec.forward(in), Error);
}

// With packing the trainer still resumes bit for bit: 5 steps in one go == 2 steps, checkpoint, resume
// 3 (the data cursor counts examples; a packed micro-batch is a function of the cursor).
TEST(Packing, TrainerResumeIsBitExactWithPacking) {
  const auto ex = examples(11, 4);
  TempDir full("full"), split("split");
  {
    auto dec = load_model();
    train::LoraMethod method(lora(), 3);
    train::train(dec, method, ex, packed_options(5), full.path, {json{{"t", 1}}, "h", kModel.string()});
  }
  {
    auto dec = load_model();
    train::LoraMethod method(lora(), 3);
    auto o = packed_options(5);
    o.stop_after = 2;
    train::train(dec, method, ex, o, split.path, {json{{"t", 1}}, "h", kModel.string()});
    const json state = json::parse(std::ifstream(split.path / "checkpoints" / "step-00000002" / "state.json"));
    // 2 steps x 2 micro-batches x 2 rows of 40 tokens hold more than one example per row.
    EXPECT_GT(state["samples_seen"].get<int64_t>(), 2 * 2 * 2);
    EXPECT_TRUE(state["options"]["packing"].get<bool>());
  }
  {
    auto dec = load_model();
    train::LoraMethod method(lora(), 3);
    auto o = packed_options(5);
    o.resume = true;
    train::train(dec, method, ex, o, split.path, {json{{"t", 1}}, "h", kModel.string()});
  }
  const auto a = testing_support::read_step_log(full.path / "train_log.jsonl"),
             b = testing_support::read_step_log(split.path / "train_log.jsonl");
  ASSERT_EQ(a.size(), 5u);
  ASSERT_EQ(b.size(), 5u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].dump(), b[i].dump()) << "step " << i + 1;
  const auto wa = model::LoraAdapter::load(full.path), wb = model::LoraAdapter::load(split.path);
  for (const auto& [m, ab] : wa.weights) EXPECT_TRUE(at::equal(ab.second, wb.weights.at(m).second)) << m;
}

// train.epochs with packing: the steps follow from the packed micro-batches of an epoch.
TEST(Packing, EpochsCountPackedMicroBatches) {
  config::Config cfg(config::schema());
  cfg.apply_overrides({"train.packing=true", "train.epochs=2", "train.batch_size=2", "train.grad_accum=1",
                       "train.max_length=40", "train.warmup_ratio=0.5", "train.activation_checkpointing=true"});
  auto o = train::TrainOptions::from_config(cfg, false, 11);
  EXPECT_TRUE(o.packing);
  EXPECT_TRUE(o.activation_checkpointing);
  EXPECT_EQ(o.max_length, 40);
  EXPECT_DOUBLE_EQ(o.packed_epochs, 2.0);
  o.progress = false;
  o.stop_after = 1;
  const auto ex = examples(11, 4);
  // The packed micro-batches that consume epoch 0 (the trainer's own order and packer).
  auto slot_length = [&](int64_t s) {
    return static_cast<int64_t>(ex[static_cast<size_t>(train::epoch_order(11, o.seed, s / 11)[s % 11])].ids.size());
  };
  int64_t micro = 0;
  for (int64_t cursor = 0; cursor < 11; ++micro) {
    std::vector<int64_t> lengths;  // 20 examples of >= 5 tokens: more than 2 rows of 40 hold
    for (int64_t s = cursor; s < cursor + 20; ++s) lengths.push_back(slot_length(s));
    for (const auto& r : data::pack_first_fit(lengths, 2, 40)) cursor += static_cast<int64_t>(r.size());
  }
  TempDir out("epochs");
  auto dec = load_model();
  train::LoraMethod method(lora(), 1);
  train::train(dec, method, ex, o, out.path, {json{{"t", 1}}, "h", kModel.string()});
  const json manifest = json::parse(std::ifstream(out.path / "manifest.json"));
  EXPECT_EQ(manifest["train"]["steps"].get<int64_t>(), 2 * micro);
  EXPECT_EQ(manifest["train"]["warmup_steps"].get<int64_t>(), micro);  // ceil(0.5 * steps)
  EXPECT_LT(micro, 11 / 2);  // fewer micro-batches than without packing (11 examples, 2 rows each)
}
