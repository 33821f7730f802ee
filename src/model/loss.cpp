// chunked_causal_lm_loss (loss.h): a custom autograd function whose forward pass also produces the
// gradients, one chunk of label tokens at a time.
#include "sparsecl/model/loss.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "sparsecl/common/error.h"

namespace sparsecl::model {

namespace {

// Inputs: the label tokens' hidden states h [N, H], the head W [V, H], their targets [N] int64.
// Output: the mean cross-entropy (scalar fp32). Saved for backward: dL/dh [N, H] and dL/dW [V, H] (fp32),
// the gradients of the mean loss; backward multiplies them by the incoming gradient.
class ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h, const at::Tensor& head,
                            const at::Tensor& targets, int64_t chunk) {
    const int64_t N = h.size(0);
    const bool grad_h = h.requires_grad(), grad_head = head.requires_grad();
    const at::Tensor h_c = h.to(head.scalar_type());  // the matmuls run in the head's (compute) dtype
    at::Tensor loss_sum = at::zeros({}, h.options().dtype(at::kFloat));
    at::Tensor dh = grad_h ? at::empty({N, h.size(1)}, h.options().dtype(at::kFloat)) : at::Tensor();  // [N, H]
    at::Tensor dhead = grad_head ? at::zeros(head.sizes(), head.options().dtype(at::kFloat)) : at::Tensor();  // [V, H]
    const double inv_n = 1.0 / static_cast<double>(N);
    for (int64_t start = 0; start < N; start += chunk) {
      const int64_t n = std::min(chunk, N - start);
      const at::Tensor x = h_c.narrow(0, start, n);                 // [n, H]
      const at::Tensor t = targets.narrow(0, start, n);             // [n]
      const at::Tensor logits = at::matmul(x, head.t()).to(at::kFloat);  // [n, V]
      const at::Tensor lse = at::logsumexp(logits, {1});            // [n]
      loss_sum += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum();
      if (!grad_h && !grad_head) continue;
      // d(mean loss)/d logits = (softmax - onehot(target)) / N, built in place of the logits.
      at::Tensor g = logits.sub_(lse.unsqueeze(1)).exp_();          // [n, V] softmax
      g.scatter_add_(1, t.unsqueeze(1), at::full({n, 1}, -1.0f, g.options()));
      g.mul_(inv_n);
      const at::Tensor g_c = g.to(head.scalar_type());
      if (grad_h) dh.narrow(0, start, n).copy_(at::matmul(g_c, head));      // [n, H]
      if (grad_head) dhead.add_(at::matmul(g_c.t(), x).to(at::kFloat));     // [V, H]
    }
    ctx->save_for_backward({dh, dhead});
    ctx->saved_data["h_dtype"] = static_cast<int64_t>(h.scalar_type());
    ctx->saved_data["head_dtype"] = static_cast<int64_t>(head.scalar_type());
    return loss_sum * inv_n;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& go = grad_out[0];  // scalar
    const auto h_dtype = static_cast<at::ScalarType>(ctx->saved_data["h_dtype"].toInt());
    const auto head_dtype = static_cast<at::ScalarType>(ctx->saved_data["head_dtype"].toInt());
    at::Tensor dh = saved[0].defined() ? (saved[0] * go).to(h_dtype) : at::Tensor();
    at::Tensor dhead = saved[1].defined() ? (saved[1] * go).to(head_dtype) : at::Tensor();
    return {dh, dhead, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor chunked_causal_lm_loss(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
                                  int64_t chunk_tokens) {
  if (hidden.dim() != 3 || labels.dim() != 2 || hidden.size(0) != labels.size(0) || hidden.size(1) != labels.size(1))
    throw Error("chunked_causal_lm_loss: hidden [B, T, H] and labels [B, T] do not match");
  if (head.dim() != 2 || head.size(1) != hidden.size(2))
    throw Error("chunked_causal_lm_loss: head must be [V, H] with H = hidden's last size");
  if (chunk_tokens < 1) throw Error("chunked_causal_lm_loss: chunk_tokens must be >= 1");
  const int64_t T = hidden.size(1), H = hidden.size(2);
  // hidden[:, t] predicts labels[:, t + 1]; only positions with a label take part. They are found where
  // the labels are (the host, in training: no wait for the device's forward pass to finish).
  const at::Tensor shifted = labels.narrow(1, 1, T - 1).reshape({-1});  // [B*(T-1)]
  const at::Tensor rows = shifted.ne(-100).nonzero().squeeze(1);      // [N]
  if (rows.numel() == 0) throw Error("chunked_causal_lm_loss: no label token (every label is -100)");
  const at::Tensor targets = shifted.index_select(0, rows).to(hidden.device());  // [N]
  at::Tensor h = hidden.narrow(1, 0, T - 1).reshape({-1, H}).index_select(0, rows.to(hidden.device()));  // [N, H]
  // Without grad mode nothing will call backward: compute the loss alone (no dL/dh, dL/dW).
  if (!at::GradMode::is_enabled()) return ChunkedCrossEntropy::apply(h.detach(), head.detach(), targets, chunk_tokens);
  return ChunkedCrossEntropy::apply(h, head, targets, chunk_tokens);
}

}  // namespace sparsecl::model
