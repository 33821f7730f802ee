// `sparsecl eval` (src/cli/cmd_eval.cpp) and eval::evaluate_domains (include/sparsecl/eval/evaluate.h):
//   - the library function on the llama3 fixture with its PEFT adapter attached and merged ({"ids"}
//     held-out file; the fixtures have no tokenizer, so tasks are recorded as skipped);
//   - the CLI on the same fixture + adapter (--adapter, --merge) when the binary has `eval`;
//   - end to end on models/smollm2-135m-instruct, 2 samples per task (skipped when the model is absent):
//     the CLI when wired, else the library function; eval.json's schema and every number's range.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "sparsecl/config/schema.h"
#include "sparsecl/eval/evaluate.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/lora.h"
#include "sparsecl/text/tokenizer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace sparsecl;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA);
const fs::path kRepo = kData.parent_path().parent_path();
const fs::path kSmol = kRepo / "models" / "smollm2-135m-instruct";
const fs::path kLlama = kData / "models" / "llama3";

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("sparsecl_evalcli_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() { [[maybe_unused]] int rc = std::system(("rm -rf '" + path.string() + "'").c_str()); }
};

// A held-out file of {"ids"} records (token ids below the fixture's vocabulary).
fs::path write_ids_file(const fs::path& dir, int64_t vocab) {
  std::mt19937_64 rng(3);
  const fs::path f = dir / "ids.jsonl";
  std::ofstream out(f);
  for (int r = 0; r < 4; ++r) {
    json ids = json::array();
    for (int i = 0; i < 6 + 3 * r; ++i) ids.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab)));
    out << json({{"ids", ids}}).dump() << "\n";
  }
  return f;
}

int run_cli(const std::string& args, const fs::path& log) {
  const std::string cmd = "cd '" + kRepo.string() + "' && OMP_NUM_THREADS=1 " + std::string(SPARSECL_BINARY) +
                          " eval --no-progress " + args + " > '" + log.string() + "' 2>&1";
  return std::system(cmd.c_str());
}

std::string slurp(const fs::path& f) {
  std::ifstream in(f);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void expect_heldout(const json& h) {
  ASSERT_TRUE(h.is_object()) << h.dump();
  for (const char* k : {"file", "loss", "perplexity", "examples", "loss_tokens", "method"}) EXPECT_TRUE(h.contains(k)) << k;
  const double loss = h["loss"].get<double>();
  EXPECT_TRUE(std::isfinite(loss) && loss > 0) << loss;
  EXPECT_NEAR(h["perplexity"].get<double>(), std::exp(loss), 1e-6 * std::exp(loss));
  EXPECT_GT(h["examples"].get<int64_t>(), 0);
}

void expect_unit(const json& v, const std::string& what) {
  ASSERT_TRUE(v.is_number()) << what << ": " << v.dump();
  EXPECT_GE(v.get<double>(), 0.0) << what;
  EXPECT_LE(v.get<double>(), 1.0) << what;
}

// The schema of eval.json's "domains" / "general" for the bundled data files, 2 samples per task.
void expect_smol_result(const json& r, bool run_code) {
  ASSERT_TRUE(r.contains("domains") && r.contains("general")) << r.dump().substr(0, 500);
  const json& d = r["domains"];
  for (const char* dom : {"code", "math", "medical", "chat"}) {
    ASSERT_TRUE(d.contains(dom)) << dom;
    expect_heldout(d[dom]["heldout"]);
    EXPECT_TRUE(d[dom]["score"].is_number()) << dom;
    EXPECT_TRUE(d[dom]["score_method"].is_string()) << dom;
  }
  // math: GSM8K exact match is the headline.
  const json& gsm = d["math"]["tasks"]["gsm8k_test"];
  EXPECT_EQ(gsm["schema"], "gen");
  EXPECT_EQ(gsm["n"], 2);
  expect_unit(gsm["exact_match"], "gsm8k");
  EXPECT_EQ(d["math"]["score_metric"], "exact_match");
  EXPECT_DOUBLE_EQ(d["math"]["score"].get<double>(), gsm["exact_match"].get<double>());
  // medical: mean acc; chat: mean acc_norm.
  for (const auto& [dom, metric, a, b] : {std::tuple{"medical", "acc", "pubmedqa_test", "mmlu_medical"},
                                          std::tuple{"chat", "acc_norm", "arc_challenge", "mmlu_general"}}) {
    const json& t = d[dom]["tasks"];
    for (const char* task : {a, b}) {
      ASSERT_TRUE(t.contains(task)) << task;
      EXPECT_EQ(t[task]["schema"], "mc");
      EXPECT_EQ(t[task]["n"], 2);
      expect_unit(t[task]["acc"], task);
      expect_unit(t[task]["acc_norm"], task);
    }
    EXPECT_EQ(d[dom]["score_metric"], metric);
    EXPECT_NEAR(d[dom]["score"].get<double>(), (t[a][metric].get<double>() + t[b][metric].get<double>()) / 2, 1e-12);
  }
  // code: without execution the fallback is named and the score is minus the held-out loss.
  const json& he = d["code"]["tasks"]["humaneval"];
  EXPECT_EQ(he["schema"], "code");
  if (!run_code) {
    EXPECT_NE(he["method"].get<std::string>().find("pass@1 not run"), std::string::npos) << he.dump();
    EXPECT_EQ(d["code"]["score_metric"], "neg_heldout_loss");
    EXPECT_DOUBLE_EQ(d["code"]["score"].get<double>(), -d["code"]["heldout"]["loss"].get<double>());
  }
  const json& g = r["general"];
  EXPECT_EQ(g["name"], "mmlu_probe");
  EXPECT_EQ(g["n"], 2);
  expect_unit(g["acc"], "general acc");
  expect_unit(g["acc_norm"], "general acc_norm");
}

}  // namespace

TEST(EvalCli, LibraryOnFixtureWithAdapter) {
  TempDir tmp;
  auto base = model::Decoder::load(kLlama, at::kFloat, at::kCPU);
  const fs::path ids = write_ids_file(tmp.path, base.config().vocab_size);
  config::Config cfg(config::schema());
  cfg.set("data.code.heldout", ids.string());
  cfg.set("data.code.tasks", config::StringList{(kRepo / "data" / "code" / "humaneval.jsonl").string()});
  eval::EvaluateSettings s;
  s.domains = {"code"};
  s.general = false;

  const json rb = eval::evaluate_domains(base, nullptr, cfg, s);
  auto adapted = model::Decoder::load(kLlama, at::kFloat, at::kCPU);
  model::attach_lora(adapted, model::LoraAdapter::load(kLlama / "lora_adapter"));
  const json ra = eval::evaluate_domains(adapted, nullptr, cfg, s);
  model::merge_lora(adapted);
  const json rm = eval::evaluate_domains(adapted, nullptr, cfg, s);

  for (const json* r : {&rb, &ra, &rm}) {
    const json& c = (*r)["domains"]["code"];
    expect_heldout(c["heldout"]);
    EXPECT_EQ(c["heldout"]["examples"], 4);
    EXPECT_EQ(c["tasks"]["humaneval"]["skipped"], "no tokenizer");
    EXPECT_EQ(c["score_metric"], "neg_heldout_loss");
    EXPECT_DOUBLE_EQ(c["score"].get<double>(), -c["heldout"]["loss"].get<double>());
    EXPECT_TRUE((*r)["general"].empty());
  }
  const double lb = rb["domains"]["code"]["heldout"]["loss"], la = ra["domains"]["code"]["heldout"]["loss"],
               lm = rm["domains"]["code"]["heldout"]["loss"];
  EXPECT_GT(std::abs(la - lb), 1e-6) << "the adapter changes nothing";
  EXPECT_NEAR(la, lm, 1e-4 * std::max(1.0, la)) << "attached and merged adapters disagree";
}

TEST(EvalCli, CliOnFixtureWithAdapter) {
  TempDir tmp;
  const fs::path ids = write_ids_file(tmp.path, 512);
  const std::string common = "--model '" + kLlama.string() + "' --adapter '" + (kLlama / "lora_adapter").string() +
                             "' --domains math data.math.heldout='" + ids.string() +
                             "' 'data.math.tasks=[]' data.general.probe=''";
  double losses[2];
  for (int merge = 0; merge < 2; ++merge) {
    const fs::path out = tmp.path / ("out" + std::to_string(merge));
    const int rc = run_cli(common + (merge ? " --merge" : "") + " --output '" + out.string() + "'", tmp.path / "log");
    ASSERT_EQ(rc, 0) << slurp(tmp.path / "log");
    const json r = json::parse(slurp(out / "eval.json"));
    expect_heldout(r["domains"]["math"]["heldout"]);
    losses[merge] = r["domains"]["math"]["heldout"]["loss"];
    const json& p = r["provenance"];
    EXPECT_EQ(p["model"], kLlama.string());
    EXPECT_EQ(p["adapter"], (kLlama / "lora_adapter").string());
    EXPECT_EQ(p["merged"], merge == 1);
    EXPECT_EQ(p["config_hash"].get<std::string>().size(), 16u);
    EXPECT_TRUE(p["versions"].contains("libtorch"));
    EXPECT_EQ(p["config"]["eval_cli"]["domains"], json::array({"math"}));
    EXPECT_FALSE(fs::exists(out / "eval.json.tmp"));
  }
  EXPECT_NEAR(losses[0], losses[1], 1e-4 * std::max(1.0, losses[0]));
}

TEST(EvalCli, SmolLM2EndToEnd) {
  if (!fs::exists(kSmol / "model.safetensors")) GTEST_SKIP() << "models/smollm2-135m-instruct not present";
  TempDir tmp;
  const int rc = run_cli("--model '" + kSmol.string() + "' --output '" + tmp.path.string() +
                             "' --max-samples 2 --heldout-samples 2 --batch-size 4 eval.max_new_tokens=48 seeds=[5]",
                         tmp.path / "log");
  ASSERT_EQ(rc, 0) << slurp(tmp.path / "log");
  const json r = json::parse(slurp(tmp.path / "eval.json"));
  expect_smol_result(r, false);
  const json& p = r["provenance"];
  EXPECT_EQ(p["seed"], 5);
  EXPECT_EQ(p["adapter"], nullptr);
  EXPECT_EQ(p["config"]["eval"]["max_samples"], 2);
  EXPECT_EQ(p["config_hash"].get<std::string>().size(), 16u);
  EXPECT_TRUE(p["versions"].is_object());
}
