// make_method and apply_stage_output (methods.h): the one mapping from a method's name to its Method
// object and to how its stage product is applied to a model. Every caller (finetune-* commands, the
// `run` driver, tests) goes through here, so adding a method means adding it here once.
#include <ATen/ATen.h>

#include "sparsecl/common/error.h"
#include "sparsecl/config/options.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/lora.h"
#include "sparsecl/train/mask.h"
#include "sparsecl/train/methods.h"
#include "sparsecl/train/migu.h"
#include "sparsecl/train/orth.h"

namespace sparsecl::train {

namespace fs = std::filesystem;

std::unique_ptr<Method> make_method(const std::string& name, const config::Config& cfg, const StageContext& ctx) {
  if (name == "lora") return std::make_unique<LoraMethod>(lora_config_from(cfg), ctx.seed);
  if (name == "full") return std::make_unique<FullMethod>();
  if (name == "mask") return make_mask_method(cfg, ctx);
  if (name == "migu") return make_migu_method(cfg, ctx);
  if (name == "orth") return make_orth_method(cfg, ctx);
  throw Error("unknown fine-tuning method '" + name + "' (expected lora, full, mask, migu or orth)");
}

namespace {

// full / migu: the stage product is a whole model.safetensors under HF names; copy it into the weights.
void load_full_weights(model::Decoder& decoder, const fs::path& dir) {
  const std::map<std::string, at::Tensor> by_name = io::load_safetensors(dir / "model.safetensors");
  at::NoGradGuard no_grad;
  for (auto& [name, p] : decoder.named_parameters()) {
    auto it = by_name.find(name);
    if (it == by_name.end()) throw Error((dir / "model.safetensors").string() + ": missing tensor " + name);
    if (it->second.sizes() != p->sizes())
      throw Error((dir / "model.safetensors").string() + ": tensor " + name + " has the wrong shape");
    p->copy_(it->second);
  }
}

}  // namespace

void apply_stage_output(model::Decoder& decoder, const std::string& name, const fs::path& dir, bool merge_adapters) {
  if (name == "lora" || name == "orth") {  // orth's product is a PEFT adapter too
    model::attach_lora(decoder, model::LoraAdapter::load(dir));
    if (merge_adapters) model::merge_lora(decoder);
  } else if (name == "full" || name == "migu") {
    load_full_weights(decoder, dir);
  } else if (name == "mask") {
    apply_mask_output(decoder, dir);
  } else {
    throw Error("unknown fine-tuning method '" + name + "' in " + dir.string());
  }
}

}  // namespace sparsecl::train
