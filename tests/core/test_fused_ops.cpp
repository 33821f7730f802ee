// The decoder's fused RMSNorm and gated activation (model/fused_ops.h) against the plain formulas they
// replace, written out here as separate tensor ops exactly as HF transformers writes them: values and
// gradients must be bitwise equal in float32 and bfloat16, for every combination of inputs that require
// gradients, including broadcast q/k norms and mixed dtypes.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "sparsecl/common/error.h"
#include "sparsecl/model/fused_ops.h"

namespace sparsecl::model {
namespace {

// HF LlamaRMSNorm.forward
at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(x.scalar_type());
}

// HF LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
at::Tensor gated_reference(const at::Tensor& gate, const at::Tensor& up, const std::string& act) {
  if (act == "silu") return at::silu(gate) * up;
  if (act == "gelu") return at::gelu(gate) * up;
  return at::gelu(gate, "tanh") * up;
}

struct Result {
  at::Tensor value;
  std::vector<at::Tensor> grads;  // undefined where the input does not require grad
};

// Runs f on fresh leaf copies of inputs (requires_grad as given), backpropagates a fixed random
// upstream gradient and returns the value and the inputs' gradients.
template <typename F>
Result run(F f, const std::vector<at::Tensor>& inputs, const std::vector<bool>& requires_grad) {
  std::vector<at::Tensor> leaves;
  for (size_t i = 0; i < inputs.size(); ++i) leaves.push_back(inputs[i].detach().clone().requires_grad_(requires_grad[i]));
  at::Tensor value = f(leaves);
  at::manual_seed(99);
  const at::Tensor upstream = at::randn(value.sizes(), at::kDouble).to(value.scalar_type());
  if (value.requires_grad()) value.backward(upstream);
  Result r{value.detach(), {}};
  for (auto& l : leaves) r.grads.push_back(l.grad().defined() ? l.grad().clone() : at::Tensor());
  return r;
}

void expect_bitwise_equal(const Result& got, const Result& want, const std::string& what) {
  ASSERT_EQ(got.value.scalar_type(), want.value.scalar_type()) << what;
  EXPECT_TRUE(at::equal(got.value, want.value))
      << what << ": value max |diff| " << (got.value.to(at::kDouble) - want.value.to(at::kDouble)).abs().max().item<double>();
  for (size_t i = 0; i < want.grads.size(); ++i) {
    const std::string g = what + " grad " + std::to_string(i);
    ASSERT_EQ(got.grads[i].defined(), want.grads[i].defined()) << g;
    if (!want.grads[i].defined()) continue;
    ASSERT_EQ(got.grads[i].scalar_type(), want.grads[i].scalar_type()) << g;
    EXPECT_TRUE(at::equal(got.grads[i], want.grads[i]))
        << g << ": max |diff| " << (got.grads[i].to(at::kDouble) - want.grads[i].to(at::kDouble)).abs().max().item<double>();
  }
}

// {false, false}: no graph, the plain formulas run directly (inference)
const std::vector<std::vector<bool>> kGradCombos = {{true, true}, {true, false}, {false, true}, {false, false}};

TEST(FusedOps, RmsNormMatchesPlainOpsBitwise) {
  struct Shape {
    std::vector<int64_t> x;
    int64_t h;
  };
  // a [B, T, H] residual stream, a [B, T, heads, D] q/k norm, a single row
  const std::vector<Shape> shapes = {{{2, 5, 64}, 64}, {{2, 3, 4, 16}, 16}, {{1, 37}, 37}};
  for (auto x_dtype : {at::kFloat, at::kBFloat16}) {
    for (auto w_dtype : {at::kFloat, at::kBFloat16}) {
      for (const auto& s : shapes) {
        at::manual_seed(3);
        const at::Tensor x = (at::randn(s.x, at::kDouble) * 3.0).to(x_dtype);
        const at::Tensor w = (1.0 + 0.2 * at::randn({s.h}, at::kDouble)).to(w_dtype);
        for (const auto& rg : kGradCombos) {
          const std::string what = std::string("rms_norm x ") + c10::toString(x_dtype) + " w " + c10::toString(w_dtype) +
                                   " rank " + std::to_string(s.x.size()) + " grads " + std::to_string(rg[0]) +
                                   std::to_string(rg[1]);
          const Result got = run([](auto& in) { return rms_norm(in[0], in[1], 1e-5); }, {x, w}, rg);
          const Result want = run([](auto& in) { return rms_norm_reference(in[0], in[1], 1e-5); }, {x, w}, rg);
          expect_bitwise_equal(got, want, what);
        }
      }
    }
  }
}

TEST(FusedOps, GatedActivationMatchesPlainOpsBitwise) {
  for (const std::string act : {"silu", "gelu", "gelu_pytorch_tanh"}) {
    for (auto [gate_dtype, up_dtype] : std::vector<std::pair<at::ScalarType, at::ScalarType>>{
             {at::kFloat, at::kFloat}, {at::kBFloat16, at::kBFloat16}, {at::kBFloat16, at::kFloat}}) {
      at::manual_seed(5);
      const at::Tensor gate = (at::randn({3, 7, 96}, at::kDouble) * 4.0).to(gate_dtype);
      const at::Tensor up = at::randn({3, 7, 96}, at::kDouble).to(up_dtype);
      for (const auto& rg : kGradCombos) {
        const std::string what = act + " gate " + c10::toString(gate_dtype) + " up " + c10::toString(up_dtype) + " grads " +
                                 std::to_string(rg[0]) + std::to_string(rg[1]);
        const Result got = run([&](auto& in) { return gated_activation(in[0], in[1], act); }, {gate, up}, rg);
        const Result want = run([&](auto& in) { return gated_reference(in[0], in[1], act); }, {gate, up}, rg);
        expect_bitwise_equal(got, want, what);
      }
    }
  }
}

TEST(FusedOps, BadArgumentsAreNamed) {
  const at::Tensor x = at::randn({2, 8});
  try {
    gated_activation(x, x, "relu2");
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("relu2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(gated_activation(x, at::randn({2, 9}), "silu"), Error);
  EXPECT_THROW(rms_norm(x, at::ones({7}), 1e-6), Error);
}

}  // namespace
}  // namespace sparsecl::model
