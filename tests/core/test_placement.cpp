// Pipeline placement (model::Placement, parse_device_map, Decoder::load / random with a placement):
// the byte-balanced split (contiguous runs, every device used, embeddings first and head last, the
// largest device total as small as any contiguous split allows), device map parsing and its errors, and
// a model split over several devices computing exactly what the unsplit model computes: logits, hidden
// states, LoRA gradients (with and without activation checkpointing) and KV-cache greedy generation.
// On a CPU the split is {cpu, cpu, cpu}: the placement bookkeeping runs, the copies between devices
// are no-ops. PlacementCuda.* split over two GPUs, and over a GPU and the CPU, where the copies are real;
// they skip themselves on machines with fewer GPUs.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/cuda.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "sparsecl/common/error.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/generate.h"
#include "sparsecl/model/lora.h"

namespace fs = std::filesystem;
using namespace sparsecl;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA);
const fs::path kLlama = kData / "models" / "llama3";  // 3 layers, untied LM head
const fs::path kQwen2 = kData / "models" / "qwen2";   // 2 layers, tied LM head
const fs::path kTiny = kData / ".." / ".." / "configs" / "models" / "tiny.json";  // 4 layers, untied

const at::Device kCpu(at::kCPU);

// cuda:0 .. cuda:n-1 as device objects (no GPU needed: balanced() only plans).
std::vector<at::Device> gpus(int64_t n) {
  std::vector<at::Device> out;
  for (int64_t i = 0; i < n; ++i) out.emplace_back(at::kCUDA, static_cast<c10::DeviceIndex>(i));
  return out;
}

// The message of the sparsecl::Error that `f` throws ("" and a test failure when it throws none).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a sparsecl::Error";
  return "";
}

// The smallest largest-device total over every split of the layers into contiguous runs of at least
// one layer each (devices >= 1, layers >= devices), by enumeration. Bytes of the embeddings on device
// 0, of the head (final norm + untied LM head) on the last device (device 0 when tied), per layer.
int64_t best_max_bytes(int64_t layers, int64_t devices, int64_t embed, int64_t head, int64_t layer, bool tied) {
  int64_t best = -1;
  std::vector<int64_t> count(devices, 1);
  std::function<void(int64_t, int64_t)> place = [&](int64_t device, int64_t left) {
    if (device == devices - 1) {
      count[device] = left;
      int64_t worst = 0;
      for (int64_t i = 0; i < devices; ++i) {
        const int64_t bytes = count[i] * layer + (i == 0 ? embed : 0) + (i == (tied ? 0 : devices - 1) ? head : 0);
        worst = std::max(worst, bytes);
      }
      if (best < 0 || worst < best) best = worst;
      return;
    }
    for (int64_t n = 1; n <= left - (devices - 1 - device); ++n) {
      count[device] = n;
      place(device + 1, left - n);
    }
  };
  place(0, layers);
  return best;
}

// Checks Placement::balanced(config, cuda:0..k-1) against the rule's promises and returns it.
model::Placement check_balanced(const model::ModelConfig& c, int64_t k, at::ScalarType dtype) {
  const std::string what = "layers " + std::to_string(c.num_hidden_layers) + ", devices " + std::to_string(k) +
                           (c.tie_word_embeddings ? ", tied" : "");
  const auto devices = gpus(k);
  const model::Placement p = model::Placement::balanced(c, devices, dtype);
  EXPECT_NO_THROW(p.check(c)) << what;
  EXPECT_EQ(p.embed_device, devices.front()) << what;
  EXPECT_EQ(p.head_device, c.tie_word_embeddings ? devices.front() : devices.back()) << what;
  // contiguous runs in device order
  for (size_t l = 1; l < p.layer_devices.size(); ++l)
    EXPECT_LE(p.layer_devices[l - 1].index(), p.layer_devices[l].index()) << what << ", layer " << l;
  // every device holds a layer when there are enough layers
  if (c.num_hidden_layers >= k) {
    for (const at::Device& d : devices)
      EXPECT_NE(std::find(p.layer_devices.begin(), p.layer_devices.end(), d), p.layer_devices.end()) << what << " " << d;
  }
  // every parameter byte counted once: the bytes add up to the model's
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  int64_t total = 0;
  for (const auto& [device, bytes] : p.bytes_per_device(c, dtype)) total += bytes;
  EXPECT_EQ(total, c.parameter_count() * element) << what;
  // the largest device total is the smallest any contiguous split achieves (enumerated independently,
  // with the byte counts from the config's parameter arithmetic)
  if (c.num_hidden_layers >= k) {
    const int64_t V = c.vocab_size, H = c.hidden_size, L = c.num_hidden_layers;
    const int64_t embed = V * H * element, head = (H + (c.tie_word_embeddings ? 0 : V * H)) * element;
    const int64_t layer = (c.parameter_count() * element - embed - head) / L;
    int64_t largest = 0;
    for (const auto& [device, bytes] : p.bytes_per_device(c, dtype)) largest = std::max(largest, bytes);
    EXPECT_EQ(largest, best_max_bytes(L, k, embed, head, layer, c.tie_word_embeddings)) << what;
  }
  return p;
}

// ---- comparing a split model with an unsplit one ----------------------------------------------------

// |a - b| <= tol everywhere (tol 0: bit for bit), compared on the CPU.
void expect_same(const at::Tensor& a, const at::Tensor& b, double tol, const std::string& what) {
  ASSERT_TRUE(a.defined() && b.defined()) << what;
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const at::Tensor x = a.detach().cpu(), y = b.detach().cpu();
  if (tol == 0.0)
    EXPECT_TRUE(at::equal(x, y)) << what << ": max |diff| " << (x.to(at::kDouble) - y.to(at::kDouble)).abs().max().item<double>();
  else
    EXPECT_LE((x.to(at::kDouble) - y.to(at::kDouble)).abs().max().item<double>(), tol) << what;
}

// A batch of two rows, the second left-padded by 3, with labels (-100 on padding). All on the CPU:
// forward() moves the ids and mask to the input device, causal_lm_loss the labels to the logits'.
struct Batch {
  model::ForwardInput in;
  at::Tensor labels;  // [B, T]
};

Batch make_batch(int64_t vocab) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  Batch b;
  b.in.input_ids = at::randint(3, vocab, {2, 12}, gen, at::kLong);  // [2, 12]
  b.in.attention_mask = at::ones({2, 12}, at::kLong);                // [2, 12]
  b.in.attention_mask[1].narrow(0, 0, 3).zero_();
  b.labels = b.in.input_ids.masked_fill(b.in.attention_mask == 0, -100);
  return b;
}

void expect_same_inference(const model::Decoder& ref, const model::Decoder& split, const Batch& b, double tol) {
  at::NoGradGuard no_grad;
  model::ForwardOptions fo;
  fo.hidden_states = true;
  fo.mlp_act = true;
  const model::ForwardOutput want = ref.forward(b.in, fo), got = split.forward(b.in, fo);
  EXPECT_EQ(got.logits.device(), split.output_device());
  expect_same(got.logits, want.logits, tol, "logits");
  expect_same(got.last_hidden, want.last_hidden, tol, "last_hidden");
  ASSERT_EQ(got.hidden_states.size(), want.hidden_states.size());
  for (size_t i = 0; i < got.hidden_states.size(); ++i)
    expect_same(got.hidden_states[i], want.hidden_states[i], tol, "hidden_states[" + std::to_string(i) + "]");
  ASSERT_EQ(got.mlp_act.size(), want.mlp_act.size());
  for (size_t l = 0; l < got.mlp_act.size(); ++l) {
    EXPECT_EQ(got.mlp_act[l].device(), split.layer_device(static_cast<int64_t>(l)));
    expect_same(got.mlp_act[l], want.mlp_act[l], tol, "mlp_act[" + std::to_string(l) + "]");
  }
  // unpadded rows take SDPA's plain causal path instead of the explicit mask
  model::ForwardInput plain;
  plain.input_ids = b.in.input_ids;
  expect_same(split.forward(plain).logits, ref.forward(plain).logits, tol, "logits without a mask");
}

// A trainable LoRA adapter on every projection, B != 0 so that A gets gradient too; the same weights
// for every model of `config`'s shapes.
void attach_trainable_lora(model::Decoder& dec, double dropout) {
  model::LoraAdapter adapter;
  adapter.config.r = 4;
  adapter.config.alpha = 8.0;
  adapter.config.dropout = dropout;
  adapter.config.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  for (auto& [name, lin] : dec.named_linears())
    adapter.weights[name] = {at::randn({4, lin->weight.size(1)}, gen) * 0.1, at::randn({lin->weight.size(0), 4}, gen) * 0.1};
  model::attach_lora(dec, adapter, /*trainable=*/true);
  for (auto& [name, lin] : dec.named_linears()) {  // each adapter on its projection's device
    EXPECT_EQ(lin->lora.back().A.device(), lin->weight.device()) << name;
    EXPECT_EQ(lin->lora.back().B.device(), lin->weight.device()) << name;
  }
}

// Loss and LoRA gradients (on the CPU, in lora_parameters order) of one training step; dropout masks
// seeded by at::manual_seed.
std::vector<at::Tensor> lora_step(model::Decoder& dec, const Batch& b, bool checkpoint) {
  const auto params = model::lora_parameters(dec);
  for (auto& [name, p] : params) p->mutable_grad() = at::Tensor();
  at::manual_seed(1234);
  model::ForwardOptions fo;
  fo.training = true;
  fo.checkpoint_layers = checkpoint;
  at::Tensor loss = model::causal_lm_loss(dec.forward(b.in, fo).logits, b.labels);
  loss.backward();
  std::vector<at::Tensor> out{loss.detach().cpu()};
  for (auto& [name, p] : params) {
    EXPECT_TRUE(p->grad().defined()) << name;
    out.push_back(p->grad().defined() ? p->grad().cpu() : at::Tensor());
  }
  return out;
}

void expect_same_steps(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& want, double tol,
                       const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  expect_same(got[0], want[0], tol, what + ": loss");
  for (size_t i = 1; i < got.size(); ++i) expect_same(got[i], want[i], tol, what + ": LoRA gradient " + std::to_string(i));
}

void expect_same_generation(const model::Decoder& ref, const model::Decoder& split) {
  // prompts of different lengths: the left-padded prefill, then one token per step through the cache
  const std::vector<std::vector<int64_t>> prompts{{5, 9, 14, 3, 22, 7, 8}, {11, 4, 6}};
  model::GenerateOptions opt;
  opt.max_new_tokens = 10;
  EXPECT_EQ(model::greedy_generate(split, prompts, opt), model::greedy_generate(ref, prompts, opt));
}

// Everything a split model must reproduce: inference outputs, LoRA training (with a dropout-free adapter,
// whose gradients do not depend on which generator serves which layer, unless `dropout` is given) and
// generation. The models are the same weights placed differently; the adapters are attached here.
void expect_split_matches(model::Decoder& ref, model::Decoder& split, double tol, double dropout) {
  const Batch b = make_batch(ref.config().vocab_size);
  expect_same_inference(ref, split, b, tol);
  expect_same_generation(ref, split);
  attach_trainable_lora(ref, dropout);
  attach_trainable_lora(split, dropout);
  expect_same_steps(lora_step(split, b, false), lora_step(ref, b, false), tol, "LoRA step");
  expect_same_steps(lora_step(split, b, true), lora_step(ref, b, true), tol, "LoRA step, checkpointed layers");
  expect_same_generation(ref, split);  // with the adapters attached
}

// Activation checkpointing on a split model replays each layer's own device's generator: with LoRA
// dropout the checkpointed step equals the plain one (the masks of the recomputation are the first
// pass's).
void expect_checkpointing_replays_dropout(model::Decoder& split) {
  for (auto& [name, lin] : split.named_linears()) lin->lora.back().dropout = 0.1;
  const Batch b = make_batch(split.config().vocab_size);
  expect_same_steps(lora_step(split, b, true), lora_step(split, b, false), 1e-6, "checkpointed vs plain, dropout 0.1");
}

}  // namespace

// ---- planning ----------------------------------------------------------------------------------------

TEST(Placement, SingleDevice) {
  const auto c = model::ModelConfig::load(kTiny);
  const model::Placement p = model::Placement::single(kCpu, c.num_hidden_layers);
  EXPECT_TRUE(p.is_single());
  EXPECT_EQ(p.layer_devices, std::vector<at::Device>(4, kCpu));
  EXPECT_EQ(p.describe(), "cpu [embed_tokens, layers 0-3, norm, lm_head]");
  EXPECT_EQ(p.device_of("model.layers.3.mlp.down_proj.weight"), kCpu);
  EXPECT_NE(error_of([&] { p.device_of("model.layers.4.mlp.down_proj.weight"); }).find("model.layers.4"),
            std::string::npos);
  const auto bytes = p.bytes_per_device(c, at::kBFloat16);
  ASSERT_EQ(bytes.size(), 1u);
  EXPECT_EQ(bytes[0].second, 2 * c.parameter_count());
  // a single-device placement is what balanced() gives for one device
  const model::Placement one = model::Placement::balanced(c, {kCpu}, at::kFloat);
  EXPECT_EQ(one.layer_devices, p.layer_devices);
  EXPECT_TRUE(one.is_single());
}

TEST(Placement, BalancedHandDerivedSplit) {
  // tiny.json in fp32: embeddings 2048 x 256 = 524288 params, head 256 + 524288, a layer 705024. With
  // one layer each, cuda:1 (no embeddings, no head) is the lightest, so the fourth layer goes there.
  const auto c = model::ModelConfig::load(kTiny);
  const model::Placement p = check_balanced(c, 3, at::kFloat);
  EXPECT_EQ(p.layer_devices, (std::vector<at::Device>{gpus(3)[0], gpus(3)[1], gpus(3)[1], gpus(3)[2]}));
  EXPECT_FALSE(p.is_single());
  EXPECT_EQ(p.describe(), "cuda:0 [embed_tokens, layer 0]; cuda:1 [layers 1-2]; cuda:2 [layer 3, norm, lm_head]");
  const auto bytes = p.bytes_per_device(c, at::kFloat);
  ASSERT_EQ(bytes.size(), 3u);
  EXPECT_EQ(bytes[0].second, 4 * (524288 + 705024));
  EXPECT_EQ(bytes[1].second, 4 * 2 * 705024);
  EXPECT_EQ(bytes[2].second, 4 * (705024 + 524544));
}

TEST(Placement, BalancedShapes) {
  const auto tiny = model::ModelConfig::load(kTiny);
  for (const bool tied : {false, true}) {
    for (const int64_t vocab : {int64_t{2048}, int64_t{16384}}) {  // embeddings below / above a layer's bytes
      for (const int64_t layers : {1, 3, 4, 5, 7, 9, 12}) {
        for (const int64_t devices : {1, 2, 3, 4}) {
          model::ModelConfig c = tiny;
          c.tie_word_embeddings = tied;
          c.vocab_size = vocab;
          c.num_hidden_layers = layers;
          const model::Placement p = check_balanced(c, devices, at::kBFloat16);
          ASSERT_EQ(static_cast<int64_t>(p.layer_devices.size()), layers);
        }
      }
    }
  }
  // a real shape: Llama-3-8B over 4 and 8 GPUs
  const auto llama8b = model::ModelConfig::load(kData / ".." / ".." / "configs" / "models" / "llama-3-8b.json");
  check_balanced(llama8b, 4, at::kBFloat16);
  const model::Placement eight = check_balanced(llama8b, 8, at::kBFloat16);
  // more layers on the middle devices, which carry neither the embeddings nor the head
  const auto count = [&](int64_t i) { return std::count(eight.layer_devices.begin(), eight.layer_devices.end(), gpus(8)[i]); };
  EXPECT_LT(count(0), count(3));
  EXPECT_LT(count(7), count(3));
}

TEST(Placement, Errors) {
  const auto c = model::ModelConfig::load(kTiny);
  EXPECT_NE(error_of([&] { model::Placement::balanced(c, {}, at::kFloat); }).find("no devices"), std::string::npos);
  // one device per layer
  model::Placement short_of_layers = model::Placement::single(kCpu, 3);
  EXPECT_NE(error_of([&] { short_of_layers.check(c); }).find("3 layer devices for a model of 4 layers"), std::string::npos);
  EXPECT_NE(error_of([&] { model::Decoder::random(c, at::kFloat, short_of_layers, 1); }).find("layer devices"),
            std::string::npos);
  EXPECT_NE(error_of([&] { model::Decoder::load(kLlama, at::kFloat, model::Placement::single(kCpu, 2)); }).find("2 layer devices"),
            std::string::npos);
  // a tied head stays with the embeddings
  const auto qwen2 = model::ModelConfig::load(kQwen2);
  ASSERT_TRUE(qwen2.tie_word_embeddings);
  model::Placement tied = model::Placement::balanced(qwen2, gpus(2), at::kFloat);
  EXPECT_EQ(tied.head_device, gpus(2)[0]);
  EXPECT_EQ(tied.layer_devices, (std::vector<at::Device>{gpus(2)[0], gpus(2)[1]}));
  tied.head_device = gpus(2)[1];
  EXPECT_NE(error_of([&] { tied.check(qwen2); }).find("ties its LM head"), std::string::npos);
  // rejected before any tensor is converted (no GPU is touched)
  EXPECT_NE(error_of([&] { model::Decoder::load(kQwen2, at::kFloat, tied); }).find("ties its LM head"), std::string::npos);
}

TEST(Placement, ParseDeviceMap) {
  EXPECT_TRUE(model::parse_device_map("").empty());
  EXPECT_TRUE(model::parse_device_map("none").empty());
  EXPECT_EQ(model::parse_device_map("cpu,cpu"), std::vector<at::Device>(2, kCpu));
  EXPECT_EQ(model::parse_device_map(" cpu , cpu,cpu "), std::vector<at::Device>(3, kCpu));
  for (const std::string bad : {"gpu0", "cpu,,cpu", "cpu,", "cuda:x", "cpu;cpu", "Auto"})
    EXPECT_NE(error_of([&] { model::parse_device_map(bad); }).find("device_map '" + bad + "'"), std::string::npos) << bad;
  const int64_t visible = torch::cuda::device_count();
  const std::string beyond = "cuda:" + std::to_string(visible);
  EXPECT_NE(error_of([&] { model::parse_device_map(beyond); }).find("not visible"), std::string::npos);
  if (visible == 0) {
    EXPECT_NE(error_of([] { model::parse_device_map("auto"); }).find("device_map 'auto': no CUDA device"), std::string::npos);
  } else {
    EXPECT_EQ(model::parse_device_map("auto"), gpus(visible));
    EXPECT_EQ(model::parse_device_map("cuda"), gpus(1));
  }
  // resolve_placement: what the config / CLI wiring calls
  const auto c = model::ModelConfig::load(kTiny);
  EXPECT_TRUE(model::resolve_placement(c, "none", kCpu, at::kFloat).is_single());
  EXPECT_EQ(model::resolve_placement(c, "", kCpu, at::kFloat).layer_devices, std::vector<at::Device>(4, kCpu));
  const model::Placement split = model::resolve_placement(c, "cpu,cpu", kCpu, at::kFloat);
  EXPECT_EQ(split.layer_devices.size(), 4u);
  EXPECT_NE(error_of([&] { model::resolve_placement(c, "cpu,tpu", kCpu, at::kFloat); }).find("unknown device 'tpu'"),
            std::string::npos);
}

// ---- a split model computes what the unsplit one does -------------------------------------------------

TEST(Placement, LoadPutsEveryTensorOnItsDevice) {
  const auto c = model::ModelConfig::load(kLlama);
  const model::Placement p = model::Placement::balanced(c, {kCpu, kCpu, kCpu}, at::kFloat);
  auto split = model::Decoder::load(kLlama, at::kFloat, p);
  auto ref = model::Decoder::load(kLlama, at::kFloat, kCpu);
  EXPECT_EQ(split.placement().layer_devices, p.layer_devices);
  EXPECT_EQ(split.device(), kCpu);
  EXPECT_EQ(split.output_device(), kCpu);
  const auto got = split.named_parameters(), want = ref.named_parameters();
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].second->device(), p.device_of(got[i].first)) << got[i].first;
    EXPECT_TRUE(at::equal(*got[i].second, *want[i].second)) << got[i].first;
  }
}

TEST(Placement, CpuSplitMatchesUnsplitFixture) {
  // llama3 fixture: one layer per device; LoRA dropout on (all layers share the CPU generator)
  const auto c = model::ModelConfig::load(kLlama);
  auto ref = model::Decoder::load(kLlama, at::kFloat, kCpu);
  auto split = model::Decoder::load(kLlama, at::kFloat, model::Placement::balanced(c, {kCpu, kCpu, kCpu}, at::kFloat));
  expect_split_matches(ref, split, 0.0, /*dropout=*/0.1);
}

TEST(Placement, CpuSplitMatchesUnsplitTiedAndRandom) {
  // tied LM head (qwen2 fixture): the head runs back on the embedding device
  const auto qwen2 = model::ModelConfig::load(kQwen2);
  auto ref = model::Decoder::load(kQwen2, at::kFloat, kCpu);
  auto split = model::Decoder::load(kQwen2, at::kFloat, model::Placement::balanced(qwen2, {kCpu, kCpu}, at::kFloat));
  expect_split_matches(ref, split, 0.0, /*dropout=*/0.1);
  // Decoder::random with a placement draws the same weights as without
  const auto tiny = model::ModelConfig::load(kTiny);
  auto random_ref = model::Decoder::random(tiny, at::kFloat, kCpu, 7);
  auto random_split = model::Decoder::random(tiny, at::kFloat, model::Placement::balanced(tiny, {kCpu, kCpu, kCpu}, at::kFloat), 7);
  const auto got = random_split.named_parameters(), want = random_ref.named_parameters();
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(at::equal(*got[i].second, *want[i].second)) << got[i].first;
  expect_same_inference(random_ref, random_split, make_batch(tiny.vocab_size), 0.0);
}

TEST(PlacementCuda, TwoGpuSplitMatchesOneGpu) {
  if (torch::cuda::device_count() < 2) GTEST_SKIP() << "needs two CUDA devices";
  const at::Device gpu0(at::kCUDA, 0), gpu1(at::kCUDA, 1);
  const auto c = model::ModelConfig::load(kLlama);
  auto ref = model::Decoder::load(kLlama, at::kFloat, gpu0);
  const model::Placement p = model::resolve_placement(c, "cuda:0,cuda:1", gpu0, at::kFloat);
  auto split = model::Decoder::load(kLlama, at::kFloat, p);
  EXPECT_EQ(split.device(), gpu0);
  EXPECT_EQ(split.output_device(), gpu1);
  EXPECT_EQ(split.layer_device(0), gpu0);
  EXPECT_EQ(split.layer_device(c.num_hidden_layers - 1), gpu1);
  // Same kernels on the same weights; the tolerance only allows for two GPUs of different models. The
  // adapters are dropout-free: with dropout, layers on cuda:1 draw from cuda:1's generator.
  expect_split_matches(ref, split, 1e-5, /*dropout=*/0.0);
  expect_checkpointing_replays_dropout(split);
}

TEST(PlacementCuda, GpuAndCpuSplitMatchesCpu) {
  // One GPU suffices for real copies between devices: the first layers on cuda:0, the rest on the CPU.
  if (torch::cuda::device_count() < 1) GTEST_SKIP() << "needs a CUDA device";
  const auto c = model::ModelConfig::load(kLlama);
  auto ref = model::Decoder::load(kLlama, at::kFloat, kCpu);
  auto split = model::Decoder::load(kLlama, at::kFloat, model::resolve_placement(c, "cuda:0,cpu", kCpu, at::kFloat));
  EXPECT_TRUE(split.device().is_cuda());
  EXPECT_TRUE(split.output_device().is_cpu());
  expect_split_matches(ref, split, 1e-4, /*dropout=*/0.0);  // GPU vs CPU kernels: fp32 rounding differs
  expect_checkpointing_replays_dropout(split);
}
