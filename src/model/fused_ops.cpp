// rms_norm and gated_activation (fused_ops.h): custom autograd functions whose backward recomputes the
// cheap intermediates (the normalised rows, act(gate)) instead of keeping them, then applies the very
// derivative formulas autograd would (the comments name each formula of derivatives.yaml), so gradients
// equal the plain ops' bit for bit.
#include "sparsecl/model/fused_ops.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/autograd.h>

#include "sparsecl/common/error.h"

namespace sparsecl::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The plain formulas, which the functions' forward passes compute. Without a graph to build (no grad
// mode, or no input requiring grad: inference, the probe, generation) they run directly, sparing the
// custom function's per-call node.
bool builds_graph(const at::Tensor& a, const at::Tensor& b) {
  return at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad());
}

// x [..., H] -> (weight * normed, r [..., 1] fp32)
std::pair<at::Tensor, at::Tensor> rms_norm_values(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor h = x.to(at::kFloat);                                        // [..., H]
  const at::Tensor r = at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);  // [..., 1]
  return {weight * (h * r).to(x.scalar_type()), r};
}

// Inputs x [..., H], weight [H]. Saved: x, weight, r = rsqrt(mean(x_f32^2) + eps) [..., 1] fp32.
class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    auto [y, r] = rms_norm_values(x, weight, eps);
    ctx->save_for_backward({x, weight, r});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &r = saved[2];
    const at::Tensor& g = grad_outputs[0];  // [..., H] in the promoted dtype
    const at::Tensor h = x.to(at::kFloat);
    const at::Tensor normed = (h * r).to(x.scalar_type());  // the forward's weight-less output
    at::Tensor grad_x, grad_weight;
    // mul: self (weight): grad * other; the engine then reduces it to weight's shape and casts it to
    // weight's dtype, in that order (sum first)
    if (ctx->needs_input_grad(1)) grad_weight = at::sum_to(g * normed, weight.sizes()).to(weight.scalar_type());
    if (ctx->needs_input_grad(0)) {
      // mul: other (normed): grad * self, cast to normed's dtype; then back to fp32 (_to_copy's backward)
      const at::Tensor g_hr = (g * weight).to(x.scalar_type()).to(at::kFloat);  // [..., H]
      // mul (h * r): self: grad * r; other: grad * h, summed to r's shape
      const at::Tensor g_h_direct = g_hr * r;
      const at::Tensor g_r = at::sum_to(g_hr * h, r.sizes());
      // rsqrt: -0.5 * grad * result^3; the + eps passes the gradient through
      const at::Tensor g_var = -0.5 * g_r * r.pow(3);
      // mean over the last dim: grad expanded / H; pow(2): grad * (2 * self^1)
      const at::Tensor g_sq = g_var.expand(h.sizes()) / h.size(-1);
      const at::Tensor g_h_var = g_sq * (2.0 * h.pow(1.0));
      grad_x = (g_h_direct + g_h_var).to(x.scalar_type());
    }
    return {grad_x, grad_weight, at::Tensor()};
  }
};

enum class Act : int64_t { silu = 0, gelu = 1, gelu_tanh = 2 };

Act parse_act(const std::string& act) {
  if (act == "silu") return Act::silu;
  if (act == "gelu") return Act::gelu;
  if (act == "gelu_pytorch_tanh") return Act::gelu_tanh;
  throw Error("unsupported hidden_act '" + act + "' (supported: silu, gelu, gelu_pytorch_tanh)");
}

at::Tensor apply_act(const at::Tensor& x, Act act) {
  switch (act) {
    case Act::silu: return at::silu(x);
    case Act::gelu: return at::gelu(x);
    case Act::gelu_tanh: return at::gelu(x, "tanh");
  }
  return {};
}

at::Tensor act_backward(const at::Tensor& grad, const at::Tensor& x, Act act) {
  switch (act) {
    case Act::silu: return at::silu_backward(grad, x);
    case Act::gelu: return at::gelu_backward(grad, x);
    case Act::gelu_tanh: return at::gelu_backward(grad, x, "tanh");
  }
  return {};
}

// Inputs gate, up [..., I]. Saved: gate, up; act(gate) is recomputed in backward.
class GatedActivationFunction : public torch::autograd::Function<GatedActivationFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up, int64_t act) {
    ctx->save_for_backward({gate, up});
    ctx->saved_data["act"] = act;
    return apply_act(gate, static_cast<Act>(act)) * up;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &gate = saved[0], &up = saved[1];
    const Act act = static_cast<Act>(ctx->saved_data["act"].toInt());
    const at::Tensor& g = grad_outputs[0];
    at::Tensor grad_gate, grad_up;
    // mul: self (act(gate)): grad * other in self's dtype, then the activation's own backward
    if (ctx->needs_input_grad(0)) grad_gate = act_backward((g * up).to(gate.scalar_type()), gate, act);
    // mul: other (up): grad * self in other's dtype
    if (ctx->needs_input_grad(1)) grad_up = (g * apply_act(gate, act)).to(up.scalar_type());
    return {grad_gate, grad_up, at::Tensor()};
  }
};

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (weight.dim() != 1 || x.dim() == 0 || x.size(-1) != weight.size(0))
    throw Error("rms_norm: weight [H] must match x's last dim (weight " + std::to_string(weight.dim()) + "-D, H " +
                std::to_string(weight.dim() == 1 ? weight.size(0) : -1) + ")");
  return builds_graph(x, weight) ? RmsNormFunction::apply(x, weight, eps) : rms_norm_values(x, weight, eps).first;
}

at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, const std::string& act) {
  if (!gate.sizes().equals(up.sizes())) throw Error("gated_activation: gate and up must have the same shape");
  const Act a = parse_act(act);
  return builds_graph(gate, up) ? GatedActivationFunction::apply(gate, up, static_cast<int64_t>(a)) : apply_act(gate, a) * up;
}

}  // namespace sparsecl::model
