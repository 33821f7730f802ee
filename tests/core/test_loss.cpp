// chunked_causal_lm_loss against the obviously right formulation, causal_lm_loss(h W^T, labels): the
// loss and the gradients with respect to the hidden states and the head, for chunk sizes that split the
// label tokens unevenly, fit them exactly, or exceed them; ignored labels; a tied (shared) head; and on a
// GPU under bf16 autocast against the float32 CPU values.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

#include "sparsecl/common/error.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/loss.h"

namespace sparsecl::model {
namespace {

struct Case {
  at::Tensor hidden, head, labels;  // [B, T, H] leaf, [V, H] leaf, [B, T]
};

Case make_case(int64_t B, int64_t T, int64_t H, int64_t V, uint64_t seed) {
  at::manual_seed(seed);
  Case c;
  c.hidden = at::randn({B, T, H}, at::kDouble).to(at::kFloat).set_requires_grad(true);
  c.head = (at::randn({V, H}, at::kDouble) * 0.3).to(at::kFloat).set_requires_grad(true);
  c.labels = at::randint(0, V, {B, T}, at::kLong);
  c.labels.index_put_({0, at::indexing::Slice(0, 3)}, -100);  // a prompt without loss
  c.labels.index_put_({B - 1, T - 1}, -100);                  // padding at the end
  return c;
}

// (loss, dL/dhidden, dL/dhead) of a loss function of (hidden, head, labels).
template <typename F>
std::tuple<double, at::Tensor, at::Tensor> value_and_grads(const Case& c, F loss_fn) {
  c.hidden.mutable_grad() = at::Tensor();
  c.head.mutable_grad() = at::Tensor();
  at::Tensor loss = loss_fn(c.hidden, c.head, c.labels);
  (loss * 1.7).backward();  // a non-unit upstream gradient
  return {loss.item<double>(), c.hidden.grad().clone(), c.head.grad().clone()};
}

TEST(ChunkedLoss, MatchesFullLogitsLossAndGradients) {
  const Case c = make_case(3, 11, 16, 37, 1);
  const auto [ref_loss, ref_dh, ref_dw] = value_and_grads(c, [](const at::Tensor& h, const at::Tensor& w, const at::Tensor& l) {
    return causal_lm_loss(at::matmul(h, w.t()), l);
  });
  for (int64_t chunk : {1, 4, 7, 26, 1000}) {
    const auto [loss, dh, dw] = value_and_grads(c, [chunk](const at::Tensor& h, const at::Tensor& w, const at::Tensor& l) {
      return chunked_causal_lm_loss(h, w, l, chunk);
    });
    EXPECT_NEAR(loss, ref_loss, 1e-6 * std::abs(ref_loss)) << "chunk " << chunk;
    EXPECT_LT((dh - ref_dh).abs().max().item<double>(), 1e-6) << "chunk " << chunk;
    EXPECT_LT((dw - ref_dw).abs().max().item<double>(), 1e-6) << "chunk " << chunk;
    EXPECT_GT(dh.abs().max().item<double>(), 1e-3);  // the gradients are not trivially zero
  }
}

TEST(ChunkedLoss, TiedHeadAccumulatesBothUses) {
  // The head is also used elsewhere in the graph (like tied embeddings): gradients add up.
  const Case c = make_case(2, 9, 8, 21, 2);
  auto tied = [](auto loss_fn) {
    return [loss_fn](const at::Tensor& h, const at::Tensor& w, const at::Tensor& l) {
      return loss_fn(h + at::embedding(w, l.clamp_min(0)), w, l);
    };
  };
  const auto [ref_loss, ref_dh, ref_dw] = value_and_grads(c, tied([](const at::Tensor& h, const at::Tensor& w, const at::Tensor& l) {
    return causal_lm_loss(at::matmul(h, w.t()), l);
  }));
  const auto [loss, dh, dw] = value_and_grads(c, tied([](const at::Tensor& h, const at::Tensor& w, const at::Tensor& l) {
    return chunked_causal_lm_loss(h, w, l, 5);
  }));
  EXPECT_NEAR(loss, ref_loss, 1e-6 * std::abs(ref_loss));
  EXPECT_LT((dh - ref_dh).abs().max().item<double>(), 1e-6);
  EXPECT_LT((dw - ref_dw).abs().max().item<double>(), 1e-6);
}

TEST(ChunkedLoss, FrozenHeadGetsNoGradient) {
  Case c = make_case(2, 6, 8, 13, 3);
  c.head = c.head.detach();
  chunked_causal_lm_loss(c.hidden, c.head, c.labels, 4).backward();
  EXPECT_TRUE(c.hidden.grad().defined());
  EXPECT_FALSE(c.head.grad().defined());
}

TEST(ChunkedLossCuda, Bf16AutocastMatchesFloat32Cpu) {
  // The trainer's setting on a GPU: bf16 autocast, fp32 hidden states and a trainable fp32 head.
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const Case c = make_case(4, 33, 64, 301, 5);
  const auto [ref_loss, ref_dh, ref_dw] = value_and_grads(c, [](const at::Tensor& h, const at::Tensor& w, const at::Tensor& l) {
    return causal_lm_loss(at::matmul(h, w.t()), l);
  });
  Case g;
  g.hidden = c.hidden.detach().cuda().set_requires_grad(true);
  g.head = c.head.detach().cuda().set_requires_grad(true);
  g.labels = c.labels.cuda();
  const auto [loss, dh, dw] = value_and_grads(g, [](const at::Tensor& h, const at::Tensor& w, const at::Tensor& l) {
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
    at::Tensor out = chunked_causal_lm_loss(h, w, l, 50);
    at::autocast::set_autocast_enabled(at::kCUDA, false);
    at::autocast::clear_cache();
    return out;
  });
  auto rel = [](const at::Tensor& a, const at::Tensor& b) {
    return (a.cpu() - b).abs().max().item<double>() / b.abs().max().item<double>();
  };
  EXPECT_NEAR(loss, ref_loss, 2e-3 * std::abs(ref_loss));  // the bench's bf16 tolerances
  EXPECT_LT(rel(dh, ref_dh), 5e-2);
  EXPECT_LT(rel(dw, ref_dw), 5e-2);
}

TEST(ChunkedLoss, RejectsBadInput) {
  const Case c = make_case(2, 6, 8, 13, 4);
  EXPECT_THROW(chunked_causal_lm_loss(c.hidden, c.head, at::full({2, 6}, -100, at::kLong)), Error);
  EXPECT_THROW(chunked_causal_lm_loss(c.hidden, c.head.narrow(1, 0, 4), c.labels), Error);
  EXPECT_THROW(chunked_causal_lm_loss(c.hidden, c.head, c.labels.narrow(1, 0, 5)), Error);
  EXPECT_THROW(chunked_causal_lm_loss(c.hidden, c.head, c.labels, 0), Error);
}

}  // namespace
}  // namespace sparsecl::model
