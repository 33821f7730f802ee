// Decoding steps (model/generate.h): a static decoding step (the fixed-shape step a CUDA graph replays:
// cache write at a device index, attention over the whole capacity under a mask) gives the logits of
// the ordinary step, with and without left padding; fixed and dynamic greedy decoding give the same
// tokens (the HF-reference generation tests in test_model_parity.cpp run both too); decode modes parse
// and resolve; and on a GPU, graph replay gives exactly the tokens of the same steps run eagerly.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

#include "sparsecl/common/error.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/generate.h"

namespace fs = std::filesystem;
using namespace sparsecl;

namespace {

const fs::path kModels = fs::path(SPARSECL_TEST_DATA) / "models";

std::vector<std::vector<int64_t>> random_prompts(int64_t vocab, const std::vector<int64_t>& lengths, uint64_t seed) {
  at::manual_seed(seed);
  std::vector<std::vector<int64_t>> prompts;
  for (int64_t n : lengths) {
    const at::Tensor t = at::randint(vocab, {n}, at::kLong);
    prompts.emplace_back(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
  }
  return prompts;
}

class Generate : public testing::TestWithParam<std::string> {};

// One step after a prefill of T0 tokens: the ordinary step (attention over T0 + 1 keys) against the
// static step (write at index T0, attention over all `capacity` keys, the unwritten ones masked).
TEST_P(Generate, StaticStepMatchesDynamicStep) {
  auto decoder = model::Decoder::load(kModels / GetParam(), at::kFloat, at::kCPU);
  const int64_t B = 3, T0 = 7, capacity = 16;
  const at::Tensor ids = at::randint(decoder.config().vocab_size, {B, T0 + 1}, at::kLong);  // [B, T0 + 1]
  for (bool padded : {false, true}) {
    at::Tensor mask = at::ones({B, T0}, at::kLong);  // [B, T0], row 1 left-padded by 3 when padded
    if (padded) mask[1].narrow(0, 0, 3).zero_();
    model::ForwardInput prefill;
    prefill.input_ids = ids.narrow(1, 0, T0);
    if (padded) {
      prefill.attention_mask = mask;
      prefill.position_ids = (mask.cumsum(1) - 1).clamp_min(0);
    }
    const at::Tensor position = mask.sum(1, /*keepdim=*/true);  // [B, 1]
    model::ForwardInput step;
    step.input_ids = ids.narrow(1, T0, 1);
    step.position_ids = position;

    model::KVCache dyn_cache(decoder.config(), B, capacity, at::kFloat, at::kCPU);
    model::ForwardOptions dyn;
    dyn.cache = &dyn_cache;
    decoder.forward(prefill, dyn);
    model::ForwardInput dyn_step = step;
    if (padded) dyn_step.attention_mask = at::cat({mask, at::ones({B, 1}, at::kLong)}, 1);
    const at::Tensor want = decoder.forward(dyn_step, dyn).logits;  // [B, 1, V]

    model::KVCache cache(decoder.config(), B, capacity, at::kFloat, at::kCPU);
    model::ForwardOptions fo;
    fo.cache = &cache;
    decoder.forward(prefill, fo);
    model::StaticDecodeStep state;
    state.write_index = at::full({1}, T0, at::kLong);
    state.attend = at::zeros({B, capacity}, at::kBool);
    state.attend.narrow(1, 0, T0).copy_(mask.to(at::kBool));
    state.attend.select(1, T0).fill_(true);
    fo.static_step = &state;
    const at::Tensor got = decoder.forward(step, fo).logits;
    EXPECT_EQ(cache.length(), T0) << "a static step leaves the host-side length alone";
    EXPECT_LT((got - want).abs().max().item<double>(), 1e-5) << GetParam() << (padded ? " padded" : "");
    EXPECT_GT(want.abs().max().item<double>(), 1e-2);
  }
}

TEST_P(Generate, FixedStepsGiveTheTokensOfDynamicSteps) {
  auto decoder = model::Decoder::load(kModels / GetParam(), at::kFloat, at::kCPU);
  const auto prompts = random_prompts(decoder.config().vocab_size, {9, 4, 9, 1}, 11);
  model::GenerateOptions opt;
  opt.max_new_tokens = 20;  // past a stop check (every 16 steps)
  opt.mode = model::DecodeMode::dynamic;
  const auto dynamic = model::greedy_generate(decoder, prompts, opt);
  opt.mode = model::DecodeMode::fixed;
  EXPECT_EQ(model::greedy_generate(decoder, prompts, opt), dynamic);
  // With stop ids: rows end at their first stop token in both modes.
  opt.stop_ids = {dynamic[0][2], dynamic[1][5]};
  opt.mode = model::DecodeMode::dynamic;
  const auto dynamic_stop = model::greedy_generate(decoder, prompts, opt);
  opt.mode = model::DecodeMode::fixed;
  EXPECT_EQ(model::greedy_generate(decoder, prompts, opt), dynamic_stop);
  EXPECT_LE(dynamic_stop[0].size(), 3u);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Generate, testing::Values("llama3", "qwen2", "mistral", "qwen3"));

TEST(GenerateModes, ParseAndResolve) {
  EXPECT_EQ(model::parse_decode_mode("fixed"), model::DecodeMode::fixed);
  EXPECT_EQ(model::parse_decode_mode("auto"), model::DecodeMode::automatic);
  try {
    model::parse_decode_mode("eager");
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("eager"), std::string::npos);
  }
  auto decoder = model::Decoder::load(kModels / "llama3", at::kFloat, at::kCPU);
  ::unsetenv("SPARSECL_DECODE");
  EXPECT_EQ(model::resolve_decode_mode(decoder, model::DecodeMode::automatic), model::DecodeMode::dynamic);
  EXPECT_EQ(model::resolve_decode_mode(decoder, model::DecodeMode::graph), model::DecodeMode::fixed);  // no GPU
  ::setenv("SPARSECL_DECODE", "fixed", 1);
  EXPECT_EQ(model::resolve_decode_mode(decoder, model::DecodeMode::automatic), model::DecodeMode::fixed);
  EXPECT_EQ(model::resolve_decode_mode(decoder, model::DecodeMode::dynamic), model::DecodeMode::dynamic);
  ::unsetenv("SPARSECL_DECODE");
}

// On a GPU: the captured graph replays exactly the kernels of the eager fixed steps (same tokens, bf16),
// with padding and a stop check inside the run.
TEST(GenerateCuda, GraphReplayMatchesEagerFixedSteps) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device: CUDA case compiled, not run";
  for (const std::string name : {"llama3", "qwen3"}) {
    auto decoder = model::Decoder::load(kModels / name, at::kBFloat16, at::Device(at::kCUDA, 0));
    ASSERT_EQ(model::resolve_decode_mode(decoder, model::DecodeMode::graph), model::DecodeMode::graph);
    const auto prompts = random_prompts(decoder.config().vocab_size, {12, 5, 12}, 3);
    model::GenerateOptions opt;
    opt.max_new_tokens = 40;
    opt.stop_ids = {0};
    opt.mode = model::DecodeMode::fixed;
    const auto eager = model::greedy_generate(decoder, prompts, opt);
    opt.mode = model::DecodeMode::graph;
    EXPECT_EQ(model::greedy_generate(decoder, prompts, opt), eager) << name;
    opt.mode = model::DecodeMode::dynamic;  // other kernels (growing attention): report, do not require
    const auto dynamic = model::greedy_generate(decoder, prompts, opt);
    int64_t same = 0, total = 0;
    for (size_t i = 0; i < eager.size(); ++i)
      for (size_t j = 0; j < std::min(eager[i].size(), dynamic[i].size()); ++j, ++total) same += eager[i][j] == dynamic[i][j];
    RecordProperty(name + "_fixed_vs_dynamic_same_tokens", std::to_string(same) + "/" + std::to_string(total));
  }
}

}  // namespace
