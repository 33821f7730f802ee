// The `lora` and `full` fine-tuning methods (methods.h) on the shared trainer.
#include "sparsecl/train/methods.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <fstream>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/options.h"
#include "sparsecl/io/safetensors.h"

namespace sparsecl::train {

namespace fs = std::filesystem;

bool module_targeted(const std::string& module, const std::vector<std::string>& targets) {
  for (const auto& t : targets) {
    if (module == t) return true;
    if (module.size() > t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0 &&
        module[module.size() - t.size() - 1] == '.')
      return true;
  }
  return false;
}

model::LoraConfig lora_config_from(const config::Config& cfg) {
  model::LoraConfig c;
  c.r = cfg.get<int64_t>("lora.r");
  c.alpha = cfg.get<double>("lora.alpha");
  c.dropout = cfg.get<double>("lora.dropout");
  c.use_rslora = cfg.get<bool>("lora.rslora");
  c.target_modules = cfg.get<config::StringList>("lora.target_modules");
  if (c.target_modules.empty()) throw Error("lora.target_modules: empty (name at least one projection, e.g. q_proj)");
  return c;
}

// ---- lora -------------------------------------------------------------------------------------------

NamedTensors LoraMethod::setup(model::Decoder& decoder) {
  model::LoraAdapter adapter;
  adapter.config = config_;
  // One CPU generator for every A, in module order: the same seed gives the same init on any device.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed_);
  modules_.clear();
  for (auto& [name, lin] : decoder.named_linears()) {
    if (!module_targeted(name, config_.target_modules)) continue;
    const int64_t r = config_.rank_for(name);
    const int64_t in = lin->weight.size(1), out = lin->weight.size(0);
    // PEFT: kaiming_uniform_(A, a=sqrt(5)) -> bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in).
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    at::Tensor A = at::empty({r, in}, at::kFloat).uniform_(-bound, bound, gen);  // [r, in]
    at::Tensor B = at::zeros({out, r}, at::kFloat);                              // [out, r]
    adapter.weights[name] = {A, B};
    modules_.push_back(name);
  }
  if (modules_.empty())
    throw Error("lora.target_modules: none of the model's linear layers matches " +
                config::format_value(config::Value(config_.target_modules)));
  model::attach_lora(decoder, adapter, /*trainable=*/true);
  NamedTensors params;
  std::map<std::string, model::Linear*> linears;
  for (auto& [name, lin] : decoder.named_linears()) linears[name] = lin;
  for (const auto& m : modules_) {
    model::LoraDelta& d = linears.at(m)->lora.back();
    params.push_back({"base_model.model." + m + ".lora_A.weight", &d.A});
    params.push_back({"base_model.model." + m + ".lora_B.weight", &d.B});
  }
  return params;
}

model::LoraAdapter LoraMethod::adapter(model::Decoder& decoder) const {
  model::LoraAdapter a;
  a.config = config_;
  std::map<std::string, model::Linear*> linears;
  for (auto& [name, lin] : decoder.named_linears()) linears[name] = lin;
  for (const auto& m : modules_) {
    const model::LoraDelta& d = linears.at(m)->lora.back();
    a.weights[m] = {d.A.detach().to(at::kCPU, at::kFloat).clone(), d.B.detach().to(at::kCPU, at::kFloat).clone()};
  }
  return a;
}

void LoraMethod::save_output(model::Decoder& decoder, const fs::path& dir) const {
  adapter(decoder).save(dir);
  log::info("wrote the LoRA adapter (PEFT layout) to ", dir.string());
}

void LoraMethod::merge_into_base(model::Decoder& decoder) { model::merge_lora(decoder); }

// ---- full -------------------------------------------------------------------------------------------

NamedTensors FullMethod::setup(model::Decoder& decoder) {
  if (decoder.dtype() != at::kFloat)
    throw Error("full fine-tuning needs the model loaded in float32 (dtype=float32): its weights are the fp32 "
                "masters; on cuda the trainer's bf16 autocast does the compute");
  NamedTensors params = decoder.named_parameters();
  for (auto& [name, p] : params) p->requires_grad_(true);
  return params;
}

void FullMethod::save_output(model::Decoder& decoder, const fs::path& dir) const {
  fs::create_directories(dir);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (auto& [name, p] : decoder.named_parameters()) tensors.push_back({name, p->detach()});
  io::save_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}, {"producer", "sparsecl " SPARSECL_VERSION}});
  // config.json and the tokenizer files travel with the weights, so the directory is a model directory.
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt"}) {
    const fs::path src = decoder.source() / f;
    if (!fs::exists(src)) continue;
    const fs::path tmp = dir / (std::string(f) + ".tmp");
    fs::copy_file(src, tmp, fs::copy_options::overwrite_existing);
    fs::rename(tmp, dir / f);
  }
  log::info("wrote the fully fine-tuned model to ", dir.string());
}

}  // namespace sparsecl::train
