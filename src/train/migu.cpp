// The `migu` baseline (migu.h, docs/train.md "migu"): full fine-tuning whose gradient rows are gated per
// step by the L1 norm of each projection's output over the step's real tokens. The norms are taken in
// the activation hook from the projections' inputs (recomputing x W^T + b without autograd) and
// accumulated over the step's micro-batches; before_optimizer_step zeroes the rows below the quantile.
#include "sparsecl/train/migu.h"

#include <ATen/ATen.h>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/options.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/model/decoder.h"

namespace sparsecl::train {

namespace {

model::Linear& projection(model::DecoderLayer& L, size_t p) {
  model::Linear* all[] = {&L.q_proj, &L.k_proj, &L.v_proj, &L.o_proj, &L.gate_proj, &L.up_proj, &L.down_proj};
  return *all[p];
}

}  // namespace

const std::array<const char*, 7>& MiguMethod::projections() {
  static const std::array<const char*, 7> names = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"};
  return names;
}

MiguMethod::MiguMethod(double quantile) : quantile_(quantile) {
  if (!(quantile >= 0 && quantile < 1)) throw Error("migu.quantile must be in [0, 1), got " + std::to_string(quantile));
  hook_ = [this](model::HookPoint point, int64_t layer, const at::Tensor& x) { observe(point, layer, x); };
}

NamedTensors MiguMethod::setup(model::Decoder& decoder) {
  NamedTensors params = FullMethod::setup(decoder);
  decoder_ = &decoder;
  norms_.clear();
  gated_.clear();
  for (auto& layer : decoder.layers()) {
    std::array<at::Tensor, 7> norms, gated;
    for (size_t p = 0; p < 7; ++p) {
      const int64_t out = projection(layer, p).weight.size(0);
      const at::Device dev = projection(layer, p).weight.device();  // the layer's (pipeline placement)
      norms[p] = at::zeros({out}, at::TensorOptions().dtype(at::kFloat).device(dev));  // [out]
      gated[p] = at::zeros({out}, at::TensorOptions().dtype(at::kBool).device(dev));   // [out]
    }
    norms_.push_back(norms);
    gated_.push_back(gated);
  }
  return params;
}

void MiguMethod::before_forward(const data::Batch& batch) {
  if (!decoder_) throw Error("migu: before_forward() before setup()");
  batch_rows_ = batch.input_ids.size(0);
  batch_len_ = batch.input_ids.size(1);
  const at::Tensor positions =
      batch.attention_mask.defined()
          ? batch.attention_mask.reshape({-1}).nonzero().reshape({-1})  // [N] flat b*T+t of the real tokens
          : at::arange(batch_rows_ * batch_len_, at::kLong);
  real_positions_ = positions.to(decoder_->device());
}

void MiguMethod::observe(model::HookPoint point, int64_t layer, const at::Tensor& x) {
  if (point == model::HookPoint::Residual || !decoder_) return;
  if (!real_positions_.defined())
    throw Error("migu: a training forward pass without before_forward() (the trainer announces every micro-batch)");
  if (x.dim() != 3 || x.size(0) != batch_rows_ || x.size(1) != batch_len_)
    throw Error("migu: an activation of " + std::to_string(x.size(0)) + " x " + std::to_string(x.size(1)) +
                " positions does not match the announced batch (" + std::to_string(batch_rows_) + " x " +
                std::to_string(batch_len_) + ")");
  at::NoGradGuard no_grad;
  const at::Tensor real = x.detach().reshape({batch_rows_ * batch_len_, x.size(2)})
                              .index_select(0, real_positions_.to(x.device()));  // [N, in]
  model::DecoderLayer& L = decoder_->layers().at(static_cast<size_t>(layer));
  for (size_t p = 0; p < 7; ++p) {
    if (model::input_hook_point(projections()[p]) != point) continue;
    const model::Linear& lin = projection(L, p);
    const at::Tensor y = at::linear(real, lin.weight.detach(),
                                    lin.bias.defined() ? std::optional<at::Tensor>(lin.bias.detach()) : std::nullopt);  // [N, out]
    norms_[layer][p] += y.abs().sum(at::IntArrayRef{0}, /*keepdim=*/false, at::kFloat);  // [out]: sum_tokens |y_i|
  }
}

void MiguMethod::before_optimizer_step(model::Decoder& decoder, int64_t step) {
  at::NoGradGuard no_grad;
  at::Tensor gated_rows = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(decoder.device()));
  int64_t rows = 0;
  for (size_t l = 0; l < norms_.size(); ++l) {
    for (size_t p = 0; p < 7; ++p) {
      model::Linear& lin = projection(decoder.layers().at(l), p);
      at::Tensor& norms = norms_[l][p];  // [out]
      dist::all_reduce_sum(norms);  // data parallel: the step's tokens are spread over the ranks
      // torch.quantile's default (linear interpolation between the order statistics).
      const at::Tensor threshold = at::quantile(norms, quantile_);
      const at::Tensor gated = norms.lt(threshold);  // [out] bool
      if (lin.weight.grad().defined()) lin.weight.mutable_grad().masked_fill_(gated.unsqueeze(1), 0.0);  // rows
      if (lin.bias.defined() && lin.bias.grad().defined()) lin.bias.mutable_grad().masked_fill_(gated, 0.0);
      gated_[l][p] = gated;
      gated_rows += gated.sum().to(gated_rows.device());
      rows += gated.numel();
      norms.zero_();
    }
  }
  if (log::enabled(log::Level::debug))
    log::debug("migu step ", step, ": gated ", gated_rows.item<int64_t>(), " of ", rows, " output rows");
}

const at::Tensor& MiguMethod::output_norms(int64_t layer, int64_t proj) const {
  return norms_.at(static_cast<size_t>(layer)).at(static_cast<size_t>(proj));
}

const at::Tensor& MiguMethod::gated(int64_t layer, int64_t proj) const {
  return gated_.at(static_cast<size_t>(layer)).at(static_cast<size_t>(proj));
}

std::unique_ptr<Method> make_migu_method(const config::Config& cfg, const StageContext& /*ctx*/) {
  return std::make_unique<MiguMethod>(cfg.get<double>("migu.quantile"));
}

}  // namespace sparsecl::train
