// Next-token cross-entropy computed straight from the final hidden states, a chunk of tokens at a time,
// without ever holding the [tokens, vocab] logits (DESIGN.md performance anchors; issue: a Llama-3 batch of
// 4 x 2048 tokens has 8192 x 128256 logits, 4.2 GB in fp32 plus as much again for their gradient).
//
// The forward pass computes, per chunk of label tokens, logits = h W^T, the loss and at once the
// gradients dL/dh (and dL/dW when the head is trainable), then drops the logits; backward only scales
// the stored gradients by the incoming one. Peak extra memory: one [chunk, V] fp32 block. Same value as
// causal_lm_loss(h W^T, labels) (HF ForCausalLM convention, mean over labels != -100), computed in fp32.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sparsecl::model {

// hidden [B, T, H] (the decoder's last_hidden), head [V, H] (lm_head, or the tied embedding matrix),
// labels [B, T] int64 with -100 = no loss (any device; on the host, finding the label positions does not
// wait for the device). Returns a scalar fp32 loss,
// differentiable with respect to hidden and head (when they require grad). chunk_tokens >= 1 bounds the
// logits held at once. No label token: an Error (the mean is undefined).
at::Tensor chunked_causal_lm_loss(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
                                  int64_t chunk_tokens = 2048);

}  // namespace sparsecl::model
