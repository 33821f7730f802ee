// Bad checkpoints give one clear error naming the file and the tensor, and the CLI exits non-zero:
// a truncated safetensors file, a wrong-shaped tensor, a missing tensor, an unsupported dtype, a
// missing shard, an unknown model_type, a malformed header; plus safetensors round-trips.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "sparsecl/common/error.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/decoder.h"

namespace fs = std::filesystem;
using namespace sparsecl;

namespace {

const fs::path kModels = fs::path(SPARSECL_TEST_DATA) / "models";

// A writable copy of a fixture model directory.
fs::path copy_model(const std::string& name, const std::string& tag) {
  const fs::path dir = fs::temp_directory_path() / ("sparsecl_bad_" + name + "_" + tag);
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(kModels / name))
    if (e.is_regular_file()) fs::copy_file(e.path(), dir / e.path().filename());
  for (const auto& e : fs::directory_iterator(dir)) fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  return dir;
}

// Expects Decoder::load to throw sparsecl::Error whose message contains every needle.
void expect_load_error(const fs::path& dir, const std::vector<std::string>& needles) {
  try {
    model::Decoder::load(dir, at::kFloat, at::kCPU);
    FAIL() << "loading " << dir << " should have failed";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "message lacks '" << n << "': " << msg;
  }
}

void rewrite_with(const fs::path& file, const std::function<void(std::vector<std::pair<std::string, at::Tensor>>&)>& edit) {
  auto tensors = io::load_safetensors(file);
  std::vector<std::pair<std::string, at::Tensor>> list(tensors.begin(), tensors.end());
  edit(list);
  io::save_safetensors(file, list);
}

TEST(BadCheckpoint, TruncatedFileNamesFileAndTensor) {
  const fs::path dir = copy_model("llama3", "truncated");
  const fs::path file = dir / "model.safetensors";
  fs::resize_file(file, fs::file_size(file) - 1000);
  expect_load_error(dir, {file.string(), "truncated", "tensor '"});
}

TEST(BadCheckpoint, TruncatedHeader) {
  const fs::path dir = copy_model("mistral", "header");
  fs::resize_file(dir / "model.safetensors", 100);
  expect_load_error(dir, {(dir / "model.safetensors").string(), "truncated"});
}

TEST(BadCheckpoint, WrongShapeNamesTensorAndShapes) {
  const fs::path dir = copy_model("mistral", "shape");
  rewrite_with(dir / "model.safetensors", [](auto& list) {
    for (auto& [name, t] : list)
      if (name == "model.layers.1.mlp.up_proj.weight") t = at::zeros({175, 64});
  });
  expect_load_error(dir, {"model.layers.1.mlp.up_proj.weight", "[175, 64]", "[176, 64]", "model.safetensors"});
}

TEST(BadCheckpoint, MissingTensorIsNamed) {
  const fs::path dir = copy_model("mistral", "missing");
  rewrite_with(dir / "model.safetensors", [](auto& list) {
    std::erase_if(list, [](auto& p) { return p.first == "model.layers.2.self_attn.k_proj.weight"; });
  });
  expect_load_error(dir, {"missing tensor 'model.layers.2.self_attn.k_proj.weight'"});
}

TEST(BadCheckpoint, UnsupportedDtypeIsNamed) {
  const fs::path dir = copy_model("mistral", "dtype");
  rewrite_with(dir / "model.safetensors", [](auto& list) {
    for (auto& [name, t] : list)
      if (name == "model.norm.weight") t = t.to(at::kInt);
  });
  expect_load_error(dir, {"model.norm.weight", "unsupported dtype I32"});
}

TEST(BadCheckpoint, MissingShardIsNamed) {
  const fs::path dir = copy_model("qwen2", "shard");
  fs::remove(dir / "model-00004-of-00009.safetensors");
  expect_load_error(dir, {"model-00004-of-00009.safetensors", "missing"});
}

TEST(BadCheckpoint, PickleOnlyCheckpointIsNamed) {
  const fs::path dir = copy_model("mistral", "pickle");
  fs::rename(dir / "model.safetensors", dir / "pytorch_model.bin");
  expect_load_error(dir, {"pytorch_model.bin", "safetensors only", "save_pretrained"});
}

TEST(BadCheckpoint, UnknownModelType) {
  const fs::path dir = copy_model("llama3", "type");
  nlohmann::json j;
  {
    std::ifstream in(dir / "config.json");
    j = nlohmann::json::parse(in);
  }
  j["model_type"] = "gpt_neox";
  std::ofstream(dir / "config.json") << j.dump();
  expect_load_error(dir, {"unknown model_type 'gpt_neox'", "config.json"});
}

TEST(BadCheckpoint, UnusedTensorsAreAcceptedWithAWarning) {
  const fs::path dir = copy_model("mistral", "extra");
  rewrite_with(dir / "model.safetensors", [](auto& list) {
    list.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", at::ones({4})});
  });
  EXPECT_NO_THROW(model::Decoder::load(dir, at::kFloat, at::kCPU));
}

TEST(BadCheckpoint, CliExitsNonZeroWithTheMessage) {
  const fs::path dir = copy_model("llama3", "cli");
  fs::resize_file(dir / "model.safetensors", fs::file_size(dir / "model.safetensors") - 1000);
  const fs::path log = dir / "stderr.txt";
  const std::string cmd = std::string(SPARSECL_BINARY) + " info --model " + dir.string() + " > /dev/null 2> " + log.string();
  const int status = std::system(cmd.c_str());
  EXPECT_NE(status, 0);
  std::ifstream in(log);
  std::string text((std::istreambuf_iterator<char>(in)), {});
  EXPECT_NE(text.find("truncated"), std::string::npos) << text;
}

TEST(BadInput, OutOfVocabularyIdIsAnError) {
  auto decoder = model::Decoder::load(kModels / "mistral", at::kFloat, at::kCPU);
  model::ForwardInput in;
  in.input_ids = at::tensor({1, 2, 512}, at::kLong).view({1, 3});  // vocab_size is 512
  try {
    decoder.forward(in);
    FAIL() << "id 512 should be rejected";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("out of range [0, 512)"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, RoundTripKeepsDtypeShapeValuesAndMetadata) {
  const fs::path file = fs::temp_directory_path() / "sparsecl_roundtrip.safetensors";
  at::Tensor a = at::randn({3, 5}).to(at::kBFloat16);
  at::Tensor b = at::arange(7, at::kLong);
  at::Tensor c = at::randn({4, 6}).t();  // non-contiguous
  io::save_safetensors(file, {{"a", a}, {"b", b}, {"c", c}}, {{"k", "v"}});
  auto f = io::SafetensorsFile::open(file);
  EXPECT_EQ(f->metadata().at("k"), "v");
  EXPECT_TRUE(at::equal(f->tensor("a"), a));
  EXPECT_TRUE(at::equal(f->tensor("b"), b));
  EXPECT_TRUE(at::equal(f->tensor("c"), c));
  EXPECT_EQ(f->info("c").shape, (std::vector<int64_t>{6, 4}));
}

TEST(Safetensors, MalformedHeaderIsAnError) {
  const fs::path file = fs::temp_directory_path() / "sparsecl_malformed.safetensors";
  {
    std::ofstream out(file, std::ios::binary);
    const uint64_t n = 10;
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << "{not json}";
  }
  EXPECT_THROW(io::SafetensorsFile::open(file), Error);
}

}  // namespace

namespace {

// Which layers attend within a sliding window, as transformers 5 decides it (the attention itself is
// checked against HF in tests/python/test_hf_config_variants.py); a malformed layer_types is refused.
TEST(BadInput, SlidingWindowLayers) {
  for (const std::string name : {"qwen2", "qwen3"}) {
    nlohmann::json j;
    {
      std::ifstream in(kModels / name / "config.json");
      j = nlohmann::json::parse(in);
    }
    const int64_t L = j["num_hidden_layers"].get<int64_t>();
    ASSERT_GE(L, 2) << name;
    j["sliding_window"] = 4;
    j["use_sliding_window"] = false;
    auto off = model::ModelConfig::from_json(j, name);
    EXPECT_FALSE(off.sliding_window.has_value()) << name;
    EXPECT_FALSE(off.is_sliding_layer(0)) << name;
    j["use_sliding_window"] = true;
    j["max_window_layers"] = 1;  // layers 1.. slide
    auto on = model::ModelConfig::from_json(j, name);
    ASSERT_TRUE(on.sliding_window.has_value()) << name;
    EXPECT_EQ(*on.sliding_window, 4) << name;
    EXPECT_FALSE(on.is_sliding_layer(0)) << name;
    EXPECT_TRUE(on.is_sliding_layer(1)) << name;
    // An explicit layer_types wins over max_window_layers.
    j["layer_types"] = nlohmann::json::array();
    for (int64_t l = 0; l < L; ++l) j["layer_types"].push_back(l == 0 ? "sliding_attention" : "full_attention");
    auto typed = model::ModelConfig::from_json(j, name);
    EXPECT_TRUE(typed.is_sliding_layer(0)) << name;
    EXPECT_FALSE(typed.is_sliding_layer(1)) << name;
    j["layer_types"][1] = "chunked_attention";
    EXPECT_THROW(model::ModelConfig::from_json(j, name), Error) << name;
    j["layer_types"] = nlohmann::json::array({"full_attention"});
    if (L != 1) EXPECT_THROW(model::ModelConfig::from_json(j, name), Error) << name;
    j["layer_types"] = nlohmann::json::array();
    for (int64_t l = 0; l < L; ++l) j["layer_types"].push_back("sliding_attention");
    j["use_sliding_window"] = false;  // sliding layers without a window: HF fails too
    EXPECT_THROW(model::ModelConfig::from_json(j, name), Error) << name;
  }
  nlohmann::json m;
  {
    std::ifstream in(kModels / "mistral" / "config.json");
    m = nlohmann::json::parse(in);
  }
  m["sliding_window"] = 8;
  auto mistral = model::ModelConfig::from_json(m, "mistral");
  for (int64_t l = 0; l < mistral.num_hidden_layers; ++l) EXPECT_TRUE(mistral.is_sliding_layer(l));
  m["sliding_window"] = 0;
  EXPECT_THROW(model::ModelConfig::from_json(m, "mistral"), Error);
}

}  // namespace
