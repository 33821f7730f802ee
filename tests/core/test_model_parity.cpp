// The decoder against HF transformers 5.17 / PEFT 0.21 reference outputs (tests/data/models, made by
// the fixture generator in fp32 on CPU): logits, hidden states, MLP intermediates, loss, greedy
// generation, full-model gradients, and the same with a PEFT LoRA adapter; for the four families and
// both published config.json forms.
#include <gtest/gtest.h>

#include <map>

#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/generate.h"
#include "sparsecl/model/lora.h"

namespace fs = std::filesystem;
using namespace sparsecl;

namespace {

const fs::path kModels = fs::path(SPARSECL_TEST_DATA) / "models";

// Max |a - b| over positions where mask (if given, [B,T]) is 1; a and b are [.., B, T, ..] with B,T at
// dims (bdim, bdim+1).
double max_abs_diff(const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask = {}, int64_t bdim = 0) {
  EXPECT_EQ(a.sizes(), b.sizes());
  at::Tensor d = (a.to(at::kDouble) - b.to(at::kDouble)).abs();
  if (mask.defined()) {
    std::vector<int64_t> shape(d.dim(), 1);
    shape[bdim] = mask.size(0);
    shape[bdim + 1] = mask.size(1);
    d = d * mask.to(at::kDouble).view(shape);
  }
  return d.max().item<double>();
}

std::string scientific(double v) {
  std::ostringstream s;
  s << std::scientific << std::setprecision(2) << v;
  return s.str();
}

struct Case {
  std::string model;
  std::string config_file;  // "config.json" (hub form) or "config.transformers5.json"
};

std::string case_name(const testing::TestParamInfo<Case>& info) {
  return info.param.model + (info.param.config_file == "config.json" ? "_hub_config" : "_transformers5_config");
}

// A model directory whose config.json is the requested form (links to the fixture's weights).
fs::path model_dir(const Case& c) {
  const fs::path src = kModels / c.model;
  if (c.config_file == "config.json") return src;
  const fs::path dir = fs::temp_directory_path() / ("sparsecl_test_" + c.model + "_tf5");
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(src))
    if (e.path().extension() == ".safetensors" || e.path().filename() == "model.safetensors.index.json")
      fs::create_symlink(e.path(), dir / e.path().filename());
  fs::copy_file(src / c.config_file, dir / "config.json");
  return dir;
}

class ModelParity : public testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    ref = io::load_safetensors(kModels / GetParam().model / "reference.safetensors");
    dir = model_dir(GetParam());
  }
  model::ForwardInput input() {
    model::ForwardInput in;
    in.input_ids = ref.at("input_ids");
    in.attention_mask = ref.at("attention_mask");
    return in;
  }
  std::map<std::string, at::Tensor> ref;
  fs::path dir;
};

TEST_P(ModelParity, LogitsHiddenStatesMlpActAndLoss) {
  auto decoder = model::Decoder::load(dir, at::kFloat, at::kCPU);
  at::NoGradGuard no_grad;
  model::ForwardOptions opt;
  opt.hidden_states = true;
  opt.mlp_act = true;
  auto out = decoder.forward(input(), opt);
  const at::Tensor mask = ref.at("attention_mask");

  const double logit_err = max_abs_diff(out.logits, ref.at("logits"), mask);
  EXPECT_LT(logit_err, 1e-4) << "logits";
  const at::Tensor hs = at::stack(out.hidden_states);
  EXPECT_LT(max_abs_diff(hs, ref.at("hidden_states"), mask, 1), 1e-4) << "hidden_states";
  for (int64_t i = 0; i < decoder.config().num_hidden_layers; ++i)
    EXPECT_LT(max_abs_diff(out.mlp_act[i], ref.at("mlp_act." + std::to_string(i)), mask), 1e-4) << "mlp_act." << i;
  const double loss = model::causal_lm_loss(out.logits, ref.at("labels")).item<double>();
  const double ref_loss = ref.at("loss").item<double>();
  EXPECT_LT(std::abs(loss - ref_loss) / std::abs(ref_loss), 1e-5) << loss << " vs " << ref_loss;
  RecordProperty("max_logit_err", scientific(logit_err));
}

TEST_P(ModelParity, GreedyGenerationIdentical) {
  auto decoder = model::Decoder::load(dir, at::kFloat, at::kCPU);
  const at::Tensor prompt = ref.at("generate_prompt");  // [1, 10]
  const at::Tensor expected = ref.at("generate_out");   // [1, 22] prompt + 12 new tokens
  std::vector<int64_t> p(prompt.data_ptr<int64_t>(), prompt.data_ptr<int64_t>() + prompt.numel());
  std::vector<int64_t> want(expected.data_ptr<int64_t>() + prompt.size(1), expected.data_ptr<int64_t>() + expected.numel());
  // Both ways of running the steps on the CPU: growing attention, and the fixed steps a CUDA graph replays.
  for (auto mode : {model::DecodeMode::dynamic, model::DecodeMode::fixed}) {
    model::GenerateOptions opt;
    opt.max_new_tokens = expected.size(1) - prompt.size(1);
    opt.mode = mode;
    EXPECT_EQ(model::greedy_generate(decoder, {p}, opt)[0], want) << "mode " << static_cast<int>(mode);
  }
}

TEST_P(ModelParity, BatchedGenerationMatchesSingle) {
  // Prompts of different lengths in one batch (left-padded internally) give the same tokens as alone.
  auto decoder = model::Decoder::load(dir, at::kFloat, at::kCPU);
  const at::Tensor prompt = ref.at("generate_prompt");
  std::vector<int64_t> p(prompt.data_ptr<int64_t>(), prompt.data_ptr<int64_t>() + prompt.numel());
  std::vector<int64_t> shorter(p.begin() + 3, p.end());
  for (auto mode : {model::DecodeMode::dynamic, model::DecodeMode::fixed}) {
    model::GenerateOptions opt;
    opt.max_new_tokens = 8;
    opt.mode = mode;
    auto batch = model::greedy_generate(decoder, {p, shorter}, opt);
    EXPECT_EQ(batch[0], model::greedy_generate(decoder, {p}, opt)[0]) << "mode " << static_cast<int>(mode);
    EXPECT_EQ(batch[1], model::greedy_generate(decoder, {shorter}, opt)[0]) << "mode " << static_cast<int>(mode);
  }
}

TEST_P(ModelParity, FullModelGradients) {
  auto decoder = model::Decoder::load(dir, at::kFloat, at::kCPU);
  for (auto& [name, p] : decoder.named_parameters()) p->requires_grad_(true);
  model::ForwardOptions opt;
  opt.training = true;
  auto out = decoder.forward(input(), opt);
  model::causal_lm_loss(out.logits, ref.at("labels")).backward();
  int compared = 0;
  double worst = 0;
  for (auto& [name, p] : decoder.named_parameters()) {
    auto it = ref.find("grad." + name);
    if (it == ref.end()) continue;
    ASSERT_TRUE(p->grad().defined()) << name;
    const double err = max_abs_diff(p->grad(), it->second);
    EXPECT_LT(err, 1e-4) << name;
    worst = std::max(worst, err);
    ++compared;
  }
  RecordProperty("max_grad_err", scientific(worst));
  int expected = 0;
  for (auto& [k, v] : ref) expected += k.rfind("grad.", 0) == 0;
  EXPECT_EQ(compared, expected) << "every reference gradient has a parameter of the same name";
  EXPECT_GT(compared, 5);
}

TEST_P(ModelParity, LoraAdapterLogitsLossAndGradients) {
  const fs::path adapter_dir = kModels / GetParam().model / "lora_adapter";
  auto lref = io::load_safetensors(adapter_dir / "reference.safetensors");
  auto decoder = model::Decoder::load(dir, at::kFloat, at::kCPU);
  model::attach_lora(decoder, model::LoraAdapter::load(adapter_dir), /*trainable=*/true);
  model::ForwardOptions opt;
  opt.training = true;
  auto out = decoder.forward(input(), opt);
  EXPECT_LT(max_abs_diff(out.logits, lref.at("logits"), ref.at("attention_mask")), 1e-4);
  at::Tensor loss = model::causal_lm_loss(out.logits, ref.at("labels"));
  const double ref_loss = lref.at("loss").item<double>();
  EXPECT_LT(std::abs(loss.item<double>() - ref_loss) / std::abs(ref_loss), 1e-5);
  loss.backward();
  int compared = 0;
  double worst = 0;
  for (auto& [key, t] : model::lora_parameters(decoder)) {
    auto it = lref.find("grad." + key);
    ASSERT_NE(it, lref.end()) << "no reference gradient for " << key;
    ASSERT_TRUE(t->grad().defined()) << key;
    const double err = max_abs_diff(t->grad(), it->second);
    EXPECT_LT(err, 1e-4) << key;
    worst = std::max(worst, err);
    ++compared;
  }
  RecordProperty("max_lora_grad_err", scientific(worst));
  int expected = 0;
  for (auto& [k, v] : lref) expected += k.rfind("grad.", 0) == 0;
  EXPECT_EQ(compared, expected);
}

TEST_P(ModelParity, MergedLoraEqualsAttachedLora) {
  const fs::path adapter_dir = kModels / GetParam().model / "lora_adapter";
  auto lref = io::load_safetensors(adapter_dir / "reference.safetensors");
  auto decoder = model::Decoder::load(dir, at::kFloat, at::kCPU);
  model::attach_lora(decoder, model::LoraAdapter::load(adapter_dir));
  model::merge_lora(decoder);
  at::NoGradGuard no_grad;
  auto out = decoder.forward(input());
  EXPECT_LT(max_abs_diff(out.logits, lref.at("logits"), ref.at("attention_mask")), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelParity,
                         testing::Values(Case{"llama3", "config.json"}, Case{"llama3", "config.transformers5.json"},
                                         Case{"qwen2", "config.json"}, Case{"qwen2", "config.transformers5.json"},
                                         Case{"mistral", "config.json"}, Case{"mistral", "config.transformers5.json"},
                                         Case{"qwen3", "config.json"}, Case{"qwen3", "config.transformers5.json"}),
                         case_name);

TEST(ModelOptions, ActivationHookSeesMlpIntermediateAndResidual) {
  auto decoder = model::Decoder::load(kModels / "llama3", at::kFloat, at::kCPU);
  auto ref = io::load_safetensors(kModels / "llama3" / "reference.safetensors");
  std::vector<at::Tensor> mlp, residual;
  std::map<model::HookPoint, int> calls;
  model::ActivationHook hook = [&](model::HookPoint point, int64_t, const at::Tensor& t) {
    ++calls[point];
    if (point == model::HookPoint::MlpIntermediate) mlp.push_back(t.detach().clone());
    if (point == model::HookPoint::Residual) residual.push_back(t.detach().clone());
  };
  model::ForwardOptions opt;
  opt.hook = &hook;
  opt.logits = false;
  at::NoGradGuard no_grad;
  model::ForwardInput in;
  in.input_ids = ref.at("input_ids");
  in.attention_mask = ref.at("attention_mask");
  decoder.forward(in, opt);
  ASSERT_EQ(mlp.size(), 3u);
  ASSERT_EQ(residual.size(), 3u);
  // Every projection's input is seen once per layer too.
  for (auto p : {model::HookPoint::AttnInput, model::HookPoint::AttnOutput, model::HookPoint::MlpInput})
    EXPECT_EQ(calls[p], 3);
  for (int i = 0; i < 3; ++i)
    EXPECT_LT(max_abs_diff(mlp[i], ref.at("mlp_act." + std::to_string(i)), in.attention_mask), 1e-4);
  // Residual after layer 0 is hidden_states[1] in HF's convention.
  EXPECT_LT(max_abs_diff(residual[0], ref.at("hidden_states").select(0, 1), in.attention_mask), 1e-4);
}

}  // namespace
