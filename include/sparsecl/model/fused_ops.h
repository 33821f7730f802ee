// The decoder's RMSNorm and gated MLP activation as custom autograd functions that keep less for the
// backward pass than the same formulas written as separate tensor ops (DESIGN.md performance anchors:
// activation memory of a LoRA step).
//
// Values and gradients are those of the plain formulas, bit for bit: each backward applies autograd's own
// derivative formulas (tools/autograd/derivatives.yaml) to recomputed intermediates, in the same order
// and dtypes. What changes is what is kept between forward and backward:
// - rms_norm keeps x and the per-row scale [..., 1] instead of an fp32 copy of x (for a bf16 residual
//   stream, 4 bytes per element saved instead of 2 + 4);
// - gated_activation keeps gate and up instead of gate, up and act(gate) (one [tokens, I] less per
//   layer: 235 MB per layer for Llama-3-8B at 8192 tokens in bf16).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace sparsecl::model {

// HF LlamaRMSNorm: weight * (x_f32 * rsqrt(mean(x_f32^2, -1) + eps)).to(x.dtype), where the product
// follows type promotion between weight and x. x [..., H], weight [H].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// act(gate) * up for act = "silu" | "gelu" | "gelu_pytorch_tanh" (HF names; anything else is an Error).
// gate, up [..., I] of the same shape.
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, const std::string& act);

}  // namespace sparsecl::model
