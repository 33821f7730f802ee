// PEFT LoRA adapters: reading and writing the PEFT layout (`adapter_config.json` +
// `adapter_model.safetensors`, keys `base_model.model.<module>.lora_{A,B}.weight`), attaching an
// adapter to a Decoder's linear projections (y = W x + scale * B A x, scale = alpha/r or, with rsLoRA,
// alpha/sqrt(r); per-module rank_pattern / alpha_pattern as PEFT resolves them), and merging it into
// the base weights. Options PEFT has that change the math and that we do not implement (DoRA,
// fan_in_fan_out, LoRA biases, modules_to_save) are rejected with an error naming the key.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "sparsecl/model/decoder.h"

namespace sparsecl::model {

struct LoraConfig {
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool use_rslora = false;
  std::vector<std::string> target_modules;  // suffixes such as "q_proj" (PEFT list form)
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;

  static LoraConfig from_peft_json(const nlohmann::json& j, const std::string& source);
  nlohmann::json to_peft_json() const;
  int64_t rank_for(const std::string& module) const;
  double scale_for(const std::string& module) const;
};

struct LoraAdapter {
  LoraConfig config;
  // HF module name ("model.layers.0.self_attn.q_proj") -> (A [r, in], B [out, r]).
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> weights;

  // Reads a PEFT adapter directory; validates keys and shapes (not yet against a model).
  static LoraAdapter load(const std::filesystem::path& dir);
  // Writes a PEFT adapter directory atomically (files written to temporaries, then renamed).
  void save(const std::filesystem::path& dir) const;
};

// Attaches `adapter` to the decoder (appends a LoraDelta to each targeted Linear, converted to the
// decoder's dtype on that Linear's weight device: its layer's device under a pipeline placement). Every adapter module must exist in the model with matching shapes.
// With `trainable`, the attached A and B are fp32 leaves with requires_grad (what training updates).
void attach_lora(Decoder& decoder, const LoraAdapter& adapter, bool trainable = false);

// Folds every attached LoRA delta into its base weight (W += scale * B A) and detaches the adapters.
void merge_lora(Decoder& decoder);

// The most recently attached delta of every adapted linear under its PEFT key
// ("base_model.model.<module>.lora_A.weight" -> &A, "...lora_B.weight" -> &B): what an optimizer
// trains and what gradient checks compare. Earlier (stacked) adapters are frozen and not listed.
std::vector<std::pair<std::string, at::Tensor*>> lora_parameters(Decoder& decoder);

}  // namespace sparsecl::model
