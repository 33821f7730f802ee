// The `migu` baseline (MIGU, Du et al. 2024, "Unlocking Continual Learning Abilities in Language
// Models"; DESIGN.md "Fine-tuning methods", docs/train.md "migu"): full fine-tuning in which, per step,
// the gradient rows (output units) of each of the 7 linear projections of every layer whose activation
// norm falls below the migu.quantile quantile of that projection's rows are zeroed before the optimizer
// step. The activation norm of output unit i of a linear W is MIGU's L1 norm of the layer output over
// the step's real tokens: sum_tokens |(x W^T + b)_i|.
//
// The projections' inputs x come from the decoder's hook points (model::input_hook_point(proj)); the
// outputs are recomputed from them in the hook under NoGradGuard (one extra x W^T per projection, about
// a third more matmul work per step than plain full fine-tuning). Padding is excluded via the batch's
// attention mask (before_forward). A gated unit's bias gradient is zeroed with its row. Parameters
// outside the linears (embeddings, norms, an untied LM head) are trained ungated.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "sparsecl/train/methods.h"
#include "sparsecl/train/trainer.h"

namespace sparsecl::config {
class Config;
}

namespace sparsecl::train {

class MiguMethod : public FullMethod {
 public:
  // The projections in their per-layer order (the index into output_norms / gated).
  static const std::array<const char*, 7>& projections();

  explicit MiguMethod(double quantile);
  std::string name() const override { return "migu"; }
  // FullMethod's (every parameter trainable, fp32 weights) + the norm accumulators; save_output is
  // FullMethod's (model.safetensors + config and tokenizer files); nothing to merge.
  NamedTensors setup(model::Decoder& decoder) override;
  const model::ActivationHook* activation_hook() override { return &hook_; }
  void before_forward(const data::Batch& batch) override;
  // Zeroes the gradient rows below the quantile, then resets the accumulated norms.
  void before_optimizer_step(model::Decoder& decoder, int64_t step) override;

  // The L1 output norms accumulated since the last optimizer step: [out] float32 on the device.
  const at::Tensor& output_norms(int64_t layer, int64_t proj) const;
  // The rows gated by the last before_optimizer_step: [out] bool on the device.
  const at::Tensor& gated(int64_t layer, int64_t proj) const;
  double quantile() const { return quantile_; }

 private:
  void observe(model::HookPoint point, int64_t layer, const at::Tensor& x);

  double quantile_;
  model::Decoder* decoder_ = nullptr;
  model::ActivationHook hook_;
  at::Tensor real_positions_;  // [N] int64 on the device: flat positions b*T+t of the batch's real tokens
  int64_t batch_rows_ = 0, batch_len_ = 0;
  std::vector<std::array<at::Tensor, 7>> norms_, gated_;  // per layer, per projection
};

std::unique_ptr<Method> make_migu_method(const config::Config& cfg, const StageContext& ctx);

}  // namespace sparsecl::train
