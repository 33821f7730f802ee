// The configuration system: every YAML in configs/ loads against the schema (globbed, so a new config is
// tested without touching this file) and opens with the command that runs it; smoke.yaml's paths exist;
// unknown keys, wrong types and failed checks give errors naming the source, line, key and value; the
// `key=value` override syntax; the resolved config survives a YAML round trip with the same hash; the
// help table lists every option.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "sparsecl/common/error.h"
#include "sparsecl/config/schema.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using namespace sparsecl::config;

namespace {

const fs::path kRepo = fs::weakly_canonical(fs::path(SPARSECL_TEST_DATA) / ".." / "..");

std::vector<fs::path> repo_configs() {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(kRepo / "configs"))
    if (e.path().extension() == ".yaml" || e.path().extension() == ".yml") out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

// Runs fn, expects sparsecl::Error whose message contains every needle.
template <typename Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& needles) {
  try {
    fn();
    FAIL() << "expected an error containing '" << needles.front() << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "message lacks '" << n << "': " << msg;
  }
}

Config from_yaml(const std::string& text) {
  Config cfg(schema());
  cfg.merge_yaml(text, "test.yaml");
  return cfg;
}

}  // namespace

TEST(Configs, EveryRepoConfigLoadsAndOpensWithItsCommand) {
  const auto files = repo_configs();
  ASSERT_GE(files.size(), 3u) << "configs/ should hold smoke.yaml, seq4.yaml and probe-scale.yaml";
  for (const auto& file : files) {
    SCOPED_TRACE(file.string());
    std::ifstream in(file);
    std::string first;
    std::getline(in, first);
    EXPECT_EQ(first.rfind("# sparsecl ", 0), 0u) << "first line must be the command that runs it: " << first;
    EXPECT_NE(first.find("configs/" + file.filename().string()), std::string::npos) << first;
    Config cfg = load(file);
    // Data files named by a repo-relative path must exist (models may live elsewhere or be fetched later).
    for (const auto& m : missing_paths(cfg, kRepo))
      if (m.kind == PathKind::File && fs::path(m.path).is_relative())
        ADD_FAILURE() << m.key << ": " << m.path << " does not exist under " << kRepo;
  }
}

TEST(Configs, SmokePathsAllExist) {
  const Config cfg = load(kRepo / "configs" / "smoke.yaml");
  EXPECT_EQ(cfg.get<StringList>("methods"), (StringList{"full", "lora", "mask", "orth", "migu"}));
  const auto missing = missing_paths(cfg, kRepo);
  if (missing.size() == 1 && missing[0].key == "model" && !fs::exists(kRepo / "models"))
    GTEST_SKIP() << "the default model is not fetched yet (scripts/setup.sh): " << missing[0].path;
  EXPECT_NO_THROW(validate_paths(cfg, kRepo));
}

TEST(Configs, ValidatePathsReportsEveryMissingPath) {
  Config cfg(schema());
  cfg.apply_overrides({"data.code.train=nope/a.jsonl", "data.math.tasks=[data/math/gsm8k_test.jsonl, nope/b.jsonl]",
                       "data.medical.heldout=nope/unused.jsonl", "stages=code,math", "probe.domains=code"});
  expect_error([&] { validate_paths(cfg, kRepo); },
               {"2 path(s)", "data.code.train: nope/a.jsonl", "data.math.tasks: nope/b.jsonl"});
  const auto missing = missing_paths(cfg, kRepo);
  for (const auto& m : missing) EXPECT_NE(m.key, "data.medical.heldout") << "medical is not a stage here";
}

TEST(Configs, UnknownKeyNamesLineAndSuggestion) {
  expect_error([] { from_yaml("train:\n  lr: 0.001\n  lrr: 2\n"); },
               {"test.yaml:3", "unknown key 'train.lrr'", "did you mean 'train.lr'?"});
  expect_error([] { from_yaml("seeds: [1]\ntrian:\n  steps: 3\n"); }, {"test.yaml:3", "trian.steps", "'train.steps'"});
  expect_error([] { from_yaml("lr: 0.1\n"); }, {"test.yaml:1", "did you mean 'train.lr'?"});
  expect_error([] { from_yaml("train:\n  lr: 1\ntrain.lr: 2\n"); }, {"test.yaml:3", "set twice", "line 2"});
  expect_error([] { from_yaml("train: [\n"); }, {"test.yaml", "YAML syntax error"});
  expect_error([] { from_yaml("- a\n- b\n"); }, {"test.yaml", "top level must be a map"});
}

TEST(Configs, WrongTypeNamesKeyValueAndType) {
  expect_error([] { from_yaml("train:\n  lr: fast\n"); }, {"test.yaml:2", "train.lr", "expected double", "'fast'"});
  expect_error([] { from_yaml("train:\n  steps: 2.5\n"); }, {"train.steps", "expected int", "'2.5'"});
  expect_error([] { from_yaml("seeds: [0, one]\n"); }, {"seeds", "expected list<int>", "'one'"});
  expect_error([] { from_yaml("eval:\n  run_code: maybe\n"); }, {"eval.run_code", "expected bool", "'maybe'"});
  expect_error([] { from_yaml("model:\n  path: x\n"); }, {"model", "expected string", "a map"});
  expect_error([] { from_yaml("train:\n  lr: [1, 2]\n"); }, {"train.lr", "a list"});
  expect_error([] { from_yaml("output:\n"); }, {"output", "no value"});
}

TEST(Configs, ChecksRejectOutOfRangeAndUnknownChoices) {
  expect_error([] { from_yaml("probe:\n  top_ratio: 1.5\n"); }, {"test.yaml:2", "probe.top_ratio = 1.5", "(0, 1]"});
  expect_error([] { from_yaml("methods: [lora, sft]\n"); }, {"methods", "'sft' is not one of full|lora|mask|orth|migu"});
  expect_error([] { from_yaml("train:\n  lr: 0\n"); }, {"train.lr = 0", "> 0"});
  expect_error([] { from_yaml("seeds: [1, -2]\n"); }, {"seeds", ">= 0"});
}

TEST(Configs, OverridesParseScalarsListsAndBools) {
  Config cfg(schema());
  cfg.apply_overrides({"train.lr=1e-3", "train.steps=7", "eval.run_code=yes", "train.packing=0", "methods=lora, orth",
                       "stages=[math, code]", "seeds=1,2,3", "models=", "output=runs/x=y", "lora.alpha=8"});
  EXPECT_DOUBLE_EQ(cfg.get<double>("train.lr"), 1e-3);
  EXPECT_EQ(cfg.get<int>("train.steps"), 7);
  EXPECT_EQ(cfg.get<int64_t>("train.steps"), 7);
  EXPECT_TRUE(cfg.get<bool>("eval.run_code"));
  EXPECT_FALSE(cfg.get<bool>("train.packing"));
  EXPECT_EQ(cfg.get<StringList>("methods"), (StringList{"lora", "orth"}));
  EXPECT_EQ(cfg.get<StringList>("stages"), (StringList{"math", "code"}));
  EXPECT_EQ(cfg.get<std::vector<int>>("seeds"), (std::vector<int>{1, 2, 3}));
  EXPECT_TRUE(cfg.get<StringList>("models").empty());
  EXPECT_EQ(cfg.get<std::string>("output"), "runs/x=y");
  EXPECT_DOUBLE_EQ(cfg.get<double>("lora.alpha"), 8.0);  // an int literal for a double option
  EXPECT_EQ(cfg.origin("train.lr"), "override");
  EXPECT_EQ(cfg.origin("train.clip"), "default");
  // A YAML scalar for a list is split like an override.
  EXPECT_EQ(from_yaml("methods: mask,migu\n").get<StringList>("methods"), (StringList{"mask", "migu"}));
  EXPECT_EQ(from_yaml("methods: mask\n").origin("methods"), "test.yaml:1");

  expect_error([&] { cfg.apply_override("train.lrr=1"); }, {"override 'train.lrr=1'", "did you mean 'train.lr'?"});
  expect_error([&] { cfg.apply_override("train.lr"); }, {"override 'train.lr'", "key=value"});
  expect_error([&] { cfg.apply_override("train.steps=abc"); }, {"train.steps", "expected int", "'abc'"});
  expect_error([&] { cfg.apply_override("seeds=[1, x]"); }, {"seeds", "'x'"});
  expect_error([&] { cfg.apply_override("mask.ratio=2"); }, {"mask.ratio = 2", "(0, 1]"});
}

TEST(Configs, TypedAccessorsRejectProgrammingErrors) {
  const Config cfg(schema());
  EXPECT_EQ(cfg.get<std::string>("model"), "models/smollm2-135m-instruct");
  expect_error([&] { cfg.get<double>("train.learning_rate"); }, {"train.learning_rate", "not declared", "programming error"});
  expect_error([&] { cfg.get<int>("train.lr"); }, {"train.lr", "double", "programming error"});
  Config c2(schema());
  c2.set("train.seed", int64_t{3}, "sweep");
  c2.set("train.lr", int64_t{1});  // an integer for a double option is promoted
  EXPECT_EQ(c2.get<int>("train.seed"), 3);
  EXPECT_EQ(c2.origin("train.seed"), "sweep");
  expect_error([&] { c2.set("train.seed", std::string("x")); }, {"train.seed", "programming error"});
  expect_error([&] { c2.set("train.seed", int64_t{-1}); }, {"train.seed = -1", ">= 0"});
}

TEST(Configs, ResolvedConfigRoundTripsWithTheSameHash) {
  for (const auto& file : repo_configs()) {
    SCOPED_TRACE(file.string());
    Config cfg = load(file, {"train.lr=3.3e-5", "eval.max_samples=11", "stages=[chat, code]"});
    const std::string yaml = cfg.to_yaml();
    EXPECT_NE(yaml.find(cfg.hash()), std::string::npos);
    Config again(schema());
    again.merge_yaml(yaml, "resolved.yaml");
    EXPECT_EQ(again.to_json(), cfg.to_json());
    EXPECT_EQ(again.hash(), cfg.hash());
    // The JSON dump parses back to the same document too.
    EXPECT_EQ(nlohmann::json::parse(cfg.to_json().dump(2)), cfg.to_json());
  }
  const Config base(schema());
  ASSERT_EQ(base.hash().size(), 16u);
  Config moved = base;
  moved.apply_override("output=/elsewhere");
  EXPECT_EQ(moved.hash(), base.hash()) << "the output directory is not part of the hash";
  EXPECT_FALSE(moved.to_json(true).contains("output"));
  EXPECT_EQ(moved.to_json()["output"], "/elsewhere");
  Config changed = base;
  changed.apply_override("train.lr=1e-5");
  EXPECT_NE(changed.hash(), base.hash());
  EXPECT_EQ(changed.to_json()["train"]["lr"], 1e-5);
}

TEST(Configs, HashIsFnv1a64OfCanonicalJson) {
  EXPECT_EQ(fnv1a64_hex(""), "cbf29ce484222325");
  EXPECT_EQ(fnv1a64_hex("a"), "af63dc4c8601ec8c");
  const Config cfg(schema());
  EXPECT_EQ(cfg.hash(), fnv1a64_hex(cfg.to_json(true).dump()));
}

TEST(Configs, HelpListsEveryOption) {
  const std::string help = schema().help();
  for (const auto& o : schema().all()) {
    EXPECT_NE(help.find(o.key + " "), std::string::npos) << o.key;
    EXPECT_NE(help.find(o.help), std::string::npos) << o.key;
  }
  EXPECT_NE(help.find("; one of mean_abs|freq"), std::string::npos);
  EXPECT_NE(help.find("; in (0, 1]"), std::string::npos);
  const std::string train = schema().help({"train"});
  EXPECT_NE(train.find("train.lr "), std::string::npos);
  EXPECT_EQ(train.find("lora.r "), std::string::npos);
}

TEST(Configs, RegistryRejectsBadDeclarations) {
  Options o;
  o.add({"a.b", Type::Int, int64_t{1}, "x"});
  expect_error([&] { o.add({"a.b", Type::Int, int64_t{1}, "again"}); }, {"'a.b'", "declared twice"});
  expect_error([&] { o.add({"a", Type::Int, int64_t{1}, "section clash"}); }, {"'a'", "'a.b'"});
  expect_error([&] { o.add({"c", Type::Int, 1.5, "wrong default type"}); }, {"'c'", "not of type int"});
  expect_error([&] { o.add({"d", Type::Double, 2.0, "bad default", range(0, 1)}); }, {"'d'", "[0, 1]"});
}
