// PEFT LoRA adapters: config parsing with PEFT's pattern rules, loading/saving the PEFT layout,
// attaching to and merging into a Decoder (each delta on its projection's device, so that adapters
// follow a pipeline placement).
#include "sparsecl/model/lora.h"

#include <cmath>
#include <fstream>
#include <regex>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/io/safetensors.h"

namespace sparsecl::model {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kPrefix = "base_model.model.";

// PEFT's get_pattern_key: a pattern key matches a module name when the name ends with it at a dot
// boundary (re.match(rf"(.*\.)?({key})$", name)).
template <typename V>
const V* match_pattern(const std::map<std::string, V>& patterns, const std::string& module) {
  for (const auto& [key, value] : patterns) {
    if (std::regex_match(module, std::regex("(.*\\.)?(" + key + ")"))) return &value;
  }
  return nullptr;
}

}  // namespace

LoraConfig LoraConfig::from_peft_json(const json& j, const std::string& source) {
  LoraConfig c;
  auto type = j.value("peft_type", std::string("LORA"));
  if (type != "LORA") throw Error(source + ": peft_type '" + type + "' is not LORA");
  try {
    c.r = j.at("r").get<int64_t>();
    c.alpha = j.at("lora_alpha").get<double>();
  } catch (const json::exception& e) {
    throw Error(source + ": missing or malformed 'r' / 'lora_alpha' (" + e.what() + ")");
  }
  if (c.r <= 0) throw Error(source + ": 'r' must be positive");
  c.dropout = j.contains("lora_dropout") && !j["lora_dropout"].is_null() ? j["lora_dropout"].get<double>() : 0.0;
  c.use_rslora = j.value("use_rslora", false);
  if (j.contains("target_modules") && j["target_modules"].is_array())
    c.target_modules = j["target_modules"].get<std::vector<std::string>>();
  if (j.contains("rank_pattern") && j["rank_pattern"].is_object())
    for (auto& [k, v] : j["rank_pattern"].items()) c.rank_pattern[k] = v.get<int64_t>();
  if (j.contains("alpha_pattern") && j["alpha_pattern"].is_object())
    for (auto& [k, v] : j["alpha_pattern"].items()) c.alpha_pattern[k] = v.get<double>();
  auto reject_true = [&](const char* key) {
    if (j.contains(key) && j[key].is_boolean() && j[key].get<bool>())
      throw Error(source + ": '" + std::string(key) + ": true' is not supported by sparsecl");
  };
  reject_true("use_dora");
  reject_true("fan_in_fan_out");
  reject_true("lora_bias");
  if (j.contains("bias") && j["bias"].is_string() && j["bias"] != "none")
    throw Error(source + ": 'bias: " + j["bias"].get<std::string>() + "' is not supported (only \"none\")");
  if (j.contains("modules_to_save") && j["modules_to_save"].is_array() && !j["modules_to_save"].empty())
    throw Error(source + ": 'modules_to_save' is not supported");
  return c;
}

json LoraConfig::to_peft_json() const {
  return {{"peft_type", "LORA"},
          {"task_type", "CAUSAL_LM"},
          {"r", r},
          {"lora_alpha", alpha},
          {"lora_dropout", dropout},
          {"use_rslora", use_rslora},
          {"target_modules", target_modules},
          {"rank_pattern", rank_pattern},
          {"alpha_pattern", alpha_pattern},
          {"bias", "none"},
          {"fan_in_fan_out", false},
          {"use_dora", false},
          {"init_lora_weights", true},
          {"inference_mode", true},
          {"modules_to_save", nullptr},
          {"base_model_name_or_path", nullptr},
          {"peft_version", "0.21.0"}};
}

int64_t LoraConfig::rank_for(const std::string& module) const {
  const int64_t* p = match_pattern(rank_pattern, module);
  return p ? *p : r;
}

double LoraConfig::scale_for(const std::string& module) const {
  const double* a = match_pattern(alpha_pattern, module);
  const double alpha_m = a ? *a : alpha;
  const double r_m = static_cast<double>(rank_for(module));
  return use_rslora ? alpha_m / std::sqrt(r_m) : alpha_m / r_m;
}

LoraAdapter LoraAdapter::load(const fs::path& dir) {
  const fs::path cfg_path = dir / "adapter_config.json";
  const fs::path weights_path = dir / "adapter_model.safetensors";
  const json j = read_json_file(cfg_path, "adapter config");
  LoraAdapter a;
  a.config = LoraConfig::from_peft_json(j, cfg_path.string());
  auto file = io::SafetensorsFile::open(weights_path);
  const std::string prefix = kPrefix;
  for (const auto& key : file->names()) {
    const std::string where = weights_path.string() + ": tensor '" + key + "'";
    if (key.rfind(prefix, 0) != 0) throw Error(where + " does not start with '" + prefix + "'");
    std::string rest = key.substr(prefix.size());
    bool is_a = false;
    for (const char* suffix : {".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight"}) {
      const std::string s = suffix;
      if (rest.size() > s.size() && rest.compare(rest.size() - s.size(), s.size(), s) == 0) {
        is_a = s.find("lora_A") != std::string::npos;
        rest = rest.substr(0, rest.size() - s.size());
        goto matched;
      }
    }
    throw Error(where + " is not a lora_A/lora_B weight (LoRA biases, embeddings and DoRA are not supported)");
  matched:
    at::Tensor t = file->tensor(key).to(at::kFloat).clone();
    if (t.dim() != 2) throw Error(where + " must be 2-D");
    auto& slot = a.weights[rest];
    (is_a ? slot.first : slot.second) = t;
  }
  for (const auto& [module, ab] : a.weights) {
    if (!ab.first.defined() || !ab.second.defined())
      throw Error(weights_path.string() + ": module '" + module + "' lacks its lora_" + (ab.first.defined() ? "B" : "A") +
                  " weight");
    const int64_t r = a.config.rank_for(module);
    if (ab.first.size(0) != r || ab.second.size(1) != r)
      throw Error(weights_path.string() + ": module '" + module + "' has rank " + std::to_string(ab.first.size(0)) +
                  " but adapter_config.json gives " + std::to_string(r));
  }
  if (a.weights.empty()) throw Error(weights_path.string() + ": no LoRA weights");
  return a;
}

void LoraAdapter::save(const fs::path& dir) const {
  fs::create_directories(dir);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [module, ab] : weights) {
    tensors.push_back({kPrefix + module + ".lora_A.weight", ab.first.to(at::kFloat)});
    tensors.push_back({kPrefix + module + ".lora_B.weight", ab.second.to(at::kFloat)});
  }
  io::save_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  const fs::path cfg = dir / "adapter_config.json";
  const fs::path tmp = cfg.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << config.to_peft_json().dump(2) << "\n";
    if (!out) throw Error(tmp.string() + ": write failed");
  }
  fs::rename(tmp, cfg);
}

void attach_lora(Decoder& decoder, const LoraAdapter& adapter, bool trainable) {
  std::map<std::string, Linear*> linears;
  for (auto& [name, lin] : decoder.named_linears()) linears[name] = lin;
  // Validate all modules before attaching any.
  for (const auto& [module, ab] : adapter.weights) {
    auto it = linears.find(module);
    if (it == linears.end()) throw Error("LoRA adapter targets '" + module + "', which the model does not have");
    const at::Tensor& W = it->second->weight;
    if (ab.first.size(1) != W.size(1) || ab.second.size(0) != W.size(0))
      throw Error("LoRA adapter module '" + module + "': A [" + std::to_string(ab.first.size(0)) + ", " +
                  std::to_string(ab.first.size(1)) + "], B [" + std::to_string(ab.second.size(0)) + ", " +
                  std::to_string(ab.second.size(1)) + "] do not fit the weight [" + std::to_string(W.size(0)) + ", " +
                  std::to_string(W.size(1)) + "]");
  }
  for (const auto& [module, ab] : adapter.weights) {
    LoraDelta d;
    // On the projection's own device (under a pipeline placement not necessarily decoder.device()).
    const at::Device device = linears[module]->weight.device();
    auto opts = at::TensorOptions().device(device).dtype(trainable ? at::kFloat : decoder.dtype());
    d.A = ab.first.to(opts, false, true);
    d.B = ab.second.to(opts, false, true);
    if (trainable) {
      d.A.requires_grad_(true);
      d.B.requires_grad_(true);
    }
    d.scale = adapter.config.scale_for(module);
    d.dropout = adapter.config.dropout;
    linears[module]->lora.push_back(std::move(d));
  }
}

void merge_lora(Decoder& decoder) {
  at::NoGradGuard no_grad;
  for (auto& [name, lin] : decoder.named_linears()) {
    for (const LoraDelta& d : lin->lora) {
      at::Tensor delta = at::matmul(d.B.to(at::kFloat), d.A.to(at::kFloat)) * d.scale;  // [out, in]
      lin->weight.copy_((lin->weight.to(at::kFloat) + delta.to(lin->weight.device())).to(lin->weight.scalar_type()));
    }
    lin->lora.clear();
  }
}

std::vector<std::pair<std::string, at::Tensor*>> lora_parameters(Decoder& decoder) {
  std::vector<std::pair<std::string, at::Tensor*>> out;
  for (auto& [name, lin] : decoder.named_linears()) {
    if (lin->lora.empty()) continue;
    LoraDelta& d = lin->lora.back();
    out.push_back({kPrefix + name + ".lora_A.weight", &d.A});
    out.push_back({kPrefix + name + ".lora_B.weight", &d.B});
  }
  return out;
}

}  // namespace sparsecl::model
