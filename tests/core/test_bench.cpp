// `sparsecl bench model` pieces (include/sparsecl/bench/workloads.h): Decoder::random against the
// tensors Decoder::load makes from the same config (names, shapes, dtypes), its seeding, the FLOP model
// against ModelConfig::parameter_count and a brute-force sum, the workloads on configs/models/tiny.json
// (token counts, finite rates, the LoRA adapters removed afterwards, a loss near ln V), the
// device-vs-CPU check run on the CPU itself, and the CLI's JSON.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "sparsecl/bench/workloads.h"
#include "sparsecl/common/error.h"
#include "sparsecl/model/decoder.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using nlohmann::json;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA);
const fs::path kRepo = fs::weakly_canonical(kData / ".." / "..");
const fs::path kTiny = kRepo / "configs" / "models" / "tiny.json";

bench::ModelBenchOptions tiny_options() {
  bench::ModelBenchOptions o;
  o.model_config = kTiny;
  o.device = "cpu";
  o.dtype = "float32";
  o.batch = 2;
  o.seq = 24;
  o.warmup = 1;
  o.iters = 2;
  o.gen_batch = 3;
  o.prompt_len = 5;
  o.new_tokens = 4;
  o.lora_r = 4;
  o.lora_alpha = 8;
  return o;
}

void expect_rates(const bench::WorkloadResult& r, int64_t tokens) {
  EXPECT_EQ(r.tokens, tokens) << r.name;
  EXPECT_GT(r.seconds, 0.0) << r.name;
  EXPECT_TRUE(std::isfinite(r.tokens_per_s) && r.tokens_per_s > 0) << r.name;
  EXPECT_TRUE(std::isfinite(r.tflops_per_s) && r.tflops_per_s > 0) << r.name;
  EXPECT_NEAR(r.tokens_per_s, static_cast<double>(r.tokens) / r.seconds, 1e-9 * r.tokens_per_s) << r.name;
  EXPECT_EQ(r.peak_allocated_bytes, -1) << r.name;  // CPU: no allocator peaks
  EXPECT_GT(r.peak_rss_bytes, 0) << r.name;
}

}  // namespace

TEST(BenchDecoderRandom, SameTensorsAsLoadForEveryFamily) {
  for (const std::string family : {"llama3", "qwen2", "qwen3", "mistral"}) {
    const fs::path dir = kData / "models" / family;
    auto loaded = model::Decoder::load(dir, at::kFloat, at::kCPU);
    auto random = model::Decoder::random(loaded.config(), at::kBFloat16, at::kCPU, 5);
    const auto want = loaded.named_parameters(), got = random.named_parameters();
    ASSERT_EQ(got.size(), want.size()) << family;
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].first, want[i].first) << family;
      EXPECT_EQ(got[i].second->sizes(), want[i].second->sizes()) << family << " " << got[i].first;
      EXPECT_EQ(got[i].second->scalar_type(), at::kBFloat16) << got[i].first;
    }
    EXPECT_EQ(random.named_linears().size(), loaded.named_linears().size());
  }
}

TEST(BenchDecoderRandom, InitAndSeeding) {
  const auto config = model::ModelConfig::load(kTiny);
  auto a = model::Decoder::random(config, at::kFloat, at::kCPU, 1);
  auto b = model::Decoder::random(config, at::kFloat, at::kCPU, 1);
  auto c = model::Decoder::random(config, at::kFloat, at::kCPU, 2);
  const auto pa = a.named_parameters(), pb = b.named_parameters(), pc = c.named_parameters();
  int64_t differing = 0;
  for (size_t i = 0; i < pa.size(); ++i) {
    const at::Tensor& t = *pa[i].second;
    EXPECT_TRUE(at::equal(t, *pb[i].second)) << pa[i].first;  // same seed, same weights
    if (!at::equal(t, *pc[i].second)) ++differing;
    if (pa[i].first.find("norm") != std::string::npos) {
      EXPECT_TRUE(at::equal(t, at::ones_like(t))) << pa[i].first;
    } else {
      EXPECT_NEAR(t.std().item<double>(), 0.02, 0.002) << pa[i].first;
      EXPECT_NEAR(t.mean().item<double>(), 0.0, 0.002) << pa[i].first;
    }
  }
  EXPECT_EQ(differing, 2 + 7 * config.num_hidden_layers);  // embeddings, LM head, every projection
  // the global generator is left alone
  at::manual_seed(3);
  const at::Tensor before = at::randn({4});
  at::manual_seed(3);
  model::Decoder::random(config, at::kFloat, at::kCPU, 9);
  EXPECT_TRUE(at::equal(at::randn({4}), before));
  // and the model runs: near-uniform next-token distribution from 0.02-scale weights
  at::NoGradGuard no_grad;
  model::ForwardInput in;
  in.input_ids = at::randint(config.vocab_size, {2, 16}, at::kLong);
  const at::Tensor logits = a.forward(in).logits;  // [2, 16, V]
  ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{2, 16, config.vocab_size}));
  EXPECT_NEAR(model::causal_lm_loss(logits, in.input_ids).item<double>(), std::log(config.vocab_size), 0.5);
}

TEST(BenchFlops, ModelCountsAgreeWithTheParameterCount) {
  const auto c = model::ModelConfig::load(kRepo / "configs" / "models" / "llama-3-8b.json");
  EXPECT_EQ(c.parameter_count(), 8030261248);  // Meta-Llama-3-8B
  const int64_t norms = (2 * c.num_hidden_layers + 1) * c.hidden_size;
  EXPECT_EQ(bench::layer_matmul_parameters(c) + 2 * bench::lm_head_parameters(c) + norms, c.parameter_count());
  // r=16 on all 7 projections of Llama-3-8B: 41,943,040 adapter parameters (PEFT prints the same)
  EXPECT_EQ(bench::lora_parameters(c, 16), 41943040);
  const double N = static_cast<double>(bench::layer_matmul_parameters(c) + bench::lm_head_parameters(c));
  EXPECT_DOUBLE_EQ(bench::lora_step_flops_per_token(c, 2048, 16),
                   4 * N + 6 * 41943040.0 + 12.0 * 32 * 2048 * 4096);
  EXPECT_DOUBLE_EQ(bench::probe_forward_flops_per_token(c, 2048),
                   2.0 * bench::layer_matmul_parameters(c) + 4.0 * 32 * 2048 * 4096);
  // generate: closed form against the step-by-step sum
  const int64_t B = 3, P = 7, n = 5;
  const double Nl = static_cast<double>(bench::layer_matmul_parameters(c)), Nh = static_cast<double>(bench::lm_head_parameters(c));
  const double attn = 4.0 * 32 * 4096;
  double sum = P * (2 * Nl + attn * P);
  for (int64_t i = 1; i <= n; ++i) {
    sum += 2 * Nh;
    if (i >= 2) sum += 2 * Nl + attn * static_cast<double>(P + i - 1);
  }
  EXPECT_NEAR(bench::generate_flops(c, B, P, n), B * sum, 1e-9 * B * sum);
}

TEST(BenchWorkloads, TinyConfigOnCpu) {
  const auto o = tiny_options();
  const auto config = model::ModelConfig::load(kTiny);
  auto decoder = model::Decoder::random(config, at::kFloat, at::kCPU, o.seed);

  for (bool ckpt : {false, true}) {
    const auto r = bench::run_lora_step(decoder, o, ckpt);
    EXPECT_EQ(r.name, ckpt ? "lora-step-ckpt" : "lora-step");
    expect_rates(r, o.iters * o.batch * o.seq);
    EXPECT_DOUBLE_EQ(r.flops, bench::lora_step_flops_per_token(config, o.seq, o.lora_r) * static_cast<double>(r.tokens));
    EXPECT_NEAR(r.details["loss"].get<double>(), std::log(config.vocab_size), 0.5);
    for (auto& [name, lin] : decoder.named_linears()) EXPECT_TRUE(lin->lora.empty()) << name;  // adapters removed
  }
  const auto p = bench::run_probe_forward(decoder, o);
  expect_rates(p, o.iters * o.batch * o.seq);
  EXPECT_EQ(p.details["k"].get<int64_t>(), 35);  // round(0.05 * 704)
  const auto g = bench::run_generate(decoder, o);
  expect_rates(g, o.gen_iters * o.gen_batch * o.new_tokens);
  EXPECT_DOUBLE_EQ(g.flops, bench::generate_flops(config, o.gen_batch, o.prompt_len, o.new_tokens));
}

// Under a pipeline placement (--device-map; "cpu,cpu" splits the layers on the CPU) the workloads run
// and report the placement in the JSON's options.
TEST(BenchWorkloads, DeviceMapSplitsTheDecoder) {
  auto o = tiny_options();
  o.device_map = "cpu,cpu";
  o.workloads = {"probe-forward", "generate"};
  const json doc = bench::run_model_bench(o, "test");
  EXPECT_EQ(doc["options"]["device_map"], "cpu,cpu");
  ASSERT_EQ(doc["workloads"].size(), 2u);
  EXPECT_EQ(doc["workloads"][1]["tokens"].get<int64_t>(), o.gen_batch * o.new_tokens);
}

TEST(BenchWorkloads, OptionsAreValidated) {
  auto o = tiny_options();
  o.workloads = {"probe-forward-ckpt"};
  EXPECT_THROW(o.validate(), Error);
  o = tiny_options();
  o.iters = 0;
  EXPECT_THROW(o.validate(), Error);
  o = tiny_options();
  o.model_config.clear();
  EXPECT_THROW(o.validate(), Error);
  EXPECT_NO_THROW(tiny_options().validate());
}

TEST(BenchCheck, CpuAgainstItself) {
  const auto config = model::ModelConfig::load(kData / "models" / "llama3");  // smaller than tiny.json: faster
  // float32 on the CPU against float32 on the CPU: the same computation, errors ~0
  const json exact = bench::check_against_cpu(config, at::kCPU, at::kFloat, 3);
  EXPECT_TRUE(exact["passed"].get<bool>()) << exact.dump(2);
  ASSERT_EQ(exact["checks"].size(), 9u);
  for (const auto& c : exact["checks"]) EXPECT_LT(c["rel_err"].get<double>(), 1e-5) << c.dump();
  // bfloat16 on the CPU: within the bf16 tolerances, but visibly not exact
  const json bf16 = bench::check_against_cpu(config, at::kCPU, at::kBFloat16, 3);
  EXPECT_TRUE(bf16["passed"].get<bool>()) << bf16.dump(2);
  EXPECT_GT(bf16["checks"][0]["rel_err"].get<double>(), 1e-4) << bf16.dump(2);
}

TEST(BenchCli, ModelWritesJson) {
  const fs::path out = fs::temp_directory_path() / ("sparsecl_bench_cli_" + std::to_string(::getpid()) + ".json");
  const fs::path log = out.string() + ".log";
  const std::string cmd = "OMP_NUM_THREADS=1 " + std::string(SPARSECL_BINARY) + " bench model --model-config '" +
                          kTiny.string() + "' --device cpu --batch 1 --seq 16 --iters 1 --gen-batch 2 --prompt-len 4 " +
                          "--new-tokens 3 --lora-r 2 --json '" + out.string() + "' > '" + log.string() + "' 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream in(out);
  const json doc = json::parse(in);
  EXPECT_EQ(doc["tool"], "sparsecl");
  EXPECT_EQ(doc["dtype"], "float32");  // the CPU default
  EXPECT_NE(doc["command"].get<std::string>().find("bench model"), std::string::npos);
  EXPECT_TRUE(doc["versions"].contains("libtorch"));
  ASSERT_EQ(doc["workloads"].size(), 4u);
  const std::vector<std::string> names = {"lora-step", "lora-step-ckpt", "probe-forward", "generate"};
  const std::vector<int64_t> tokens = {16, 16, 16, 6};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(doc["workloads"][i]["name"], names[i]);
    EXPECT_EQ(doc["workloads"][i]["tokens"].get<int64_t>(), tokens[i]);
    EXPECT_GT(doc["workloads"][i]["tokens_per_s"].get<double>(), 0.0);
  }
  // an unknown workload is an error naming it
  const std::string bad = std::string(SPARSECL_BINARY) + " bench model --model-config '" + kTiny.string() +
                          "' --device cpu --workload probe-forward-ckpt > '" + log.string() + "' 2>&1";
  EXPECT_NE(std::system(bad.c_str()), 0);
  std::ifstream lin(log);
  const std::string text((std::istreambuf_iterator<char>(lin)), {});
  EXPECT_NE(text.find("unknown workload 'probe-forward-ckpt'"), std::string::npos) << text;
  fs::remove(out);
  fs::remove(log);
}
