// The fine-tuning methods that plug into train::train (trainer.h): `lora` (new PEFT-layout adapters on
// the targeted projections) and `full` (every weight; the baseline). The sequential-stage helper
// model::merge_lora (lora.h) folds a finished stage's adapter into the base before the next stage.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "sparsecl/model/lora.h"
#include "sparsecl/train/trainer.h"

namespace sparsecl::config {
class Config;
}

namespace sparsecl::train {

// LoRA: for every linear whose HF module name matches `config.target_modules` (PEFT list rule: equal,
// or ends with "." + entry), a new adapter A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
// kaiming_uniform_(a=sqrt(5))) drawn from a CPU generator seeded with `seed`, B [out, r] = 0, attached
// on top of any adapters already there (stacked ones stay frozen). Output: adapter_config.json +
// adapter_model.safetensors (PEFT layout) at the top of the output directory.
class LoraMethod : public Method {
 public:
  LoraMethod(model::LoraConfig config, uint64_t seed) : config_(std::move(config)), seed_(seed) {}
  std::string name() const override { return "lora"; }
  NamedTensors setup(model::Decoder& decoder) override;
  void save_output(model::Decoder& decoder, const std::filesystem::path& dir) const override;
  void merge_into_base(model::Decoder& decoder) override;
  // The adapter as trained so far (A, B as fp32 CPU copies).
  model::LoraAdapter adapter(model::Decoder& decoder) const;
  const model::LoraConfig& config() const { return config_; }

 private:
  model::LoraConfig config_;
  uint64_t seed_;
  std::vector<std::string> modules_;  // adapted module names, set by setup()
};

// Full fine-tuning: every decoder parameter is a trainable leaf. The decoder must hold fp32 weights
// (they are the masters; on CUDA the trainer's bf16 autocast does the compute). Output: the trained
// weights as model.safetensors (HF names) + config.json and the tokenizer files of the base model, so
// the output directory loads like any HF model directory.
class FullMethod : public Method {
 public:
  std::string name() const override { return "full"; }
  NamedTensors setup(model::Decoder& decoder) override;
  void save_output(model::Decoder& decoder, const std::filesystem::path& dir) const override;
  bool dense() const override { return true; }
};

// What a method needs to know about the stage it trains, beyond the config.
struct StageContext {
  std::string stage;                                   // the domain of this stage ("math"); may be empty
  const std::vector<data::Example>* examples = nullptr;  // the stage's training examples (mask probes them)
  std::vector<std::filesystem::path> previous;         // output directories of the earlier stages of this
                                                       // sequence, oldest first (their masks, bases)
  int64_t pad_id = 0;
  uint64_t seed = 0;                                   // train.seed of this run
};

// The one place method names become Method objects: "lora", "full", "mask", "migu", "orth", configured
// from the resolved config (lora.*, mask.*, migu.*, orth.*). Unknown names are an Error listing them.
std::unique_ptr<Method> make_method(const std::string& name, const config::Config& cfg, const StageContext& ctx);

// Applies a finished stage's product (the output directory `dir` of method `name`) to a decoder that
// holds the model before that stage and merges it into the base weights: the model after the stage.
// Used to rebuild the model when a sequence is resumed and to evaluate a stage from its directory.
// With `merge_adapters` false (lora.merge=false), a lora / orth adapter stays attached (stacked, frozen)
// instead of being merged, as the `run` driver keeps it between stages then.
void apply_stage_output(model::Decoder& decoder, const std::string& name, const std::filesystem::path& dir,
                        bool merge_adapters = true);

// lora.* keys -> LoraConfig (r, alpha, dropout, rslora, target_modules).
model::LoraConfig lora_config_from(const config::Config& cfg);

// True when HF module `module` is targeted by PEFT list-form `targets`.
bool module_targeted(const std::string& module, const std::vector<std::string>& targets);

}  // namespace sparsecl::train
