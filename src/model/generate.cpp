// Greedy generation: one prefill over the left-padded batch, then one token per step through the
// preallocated KV cache; rows that have stopped keep decoding padding but their output is frozen. Under a
// pipeline placement the cache follows the layers' devices, the ids / mask / positions live on the
// input device and the logits (hence each step's argmax) on the output device; forward() moves the
// fed-back token to the input device.
#include "sparsecl/model/generate.h"

#include <algorithm>

#include "sparsecl/common/error.h"

namespace sparsecl::model {

std::vector<std::vector<int64_t>> greedy_generate(const Decoder& decoder, const std::vector<std::vector<int64_t>>& prompts,
                                                  const GenerateOptions& options) {
  at::NoGradGuard no_grad;
  const int64_t B = static_cast<int64_t>(prompts.size());
  std::vector<std::vector<int64_t>> out(B);
  if (B == 0 || options.max_new_tokens <= 0) return out;
  int64_t T0 = 0;
  for (const auto& p : prompts) {
    if (p.empty()) throw Error("generate: empty prompt");
    T0 = std::max<int64_t>(T0, static_cast<int64_t>(p.size()));
  }
  const at::Device dev = decoder.device();  // the input device
  // Left-pad: prompt i occupies the last |p_i| positions of its row.
  at::Tensor ids = at::zeros({B, T0}, at::kLong);
  at::Tensor mask = at::zeros({B, T0}, at::kLong);
  bool padded = false;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = static_cast<int64_t>(prompts[b].size());
    padded |= n != T0;
    for (int64_t t = 0; t < n; ++t) {
      ids[b][T0 - n + t] = prompts[b][t];
      mask[b][T0 - n + t] = 1;
    }
  }
  ids = ids.to(dev);
  mask = mask.to(dev);
  KVCache cache(decoder.config(), B, T0 + options.max_new_tokens, decoder.dtype(), decoder.placement());

  ForwardInput in;
  in.input_ids = ids;
  if (padded) {
    in.attention_mask = mask;
    in.position_ids = (mask.cumsum(1) - 1).clamp_min(0);
  }
  ForwardOptions fo;
  fo.cache = &cache;
  at::Tensor next_pos = mask.sum(1, /*keepdim=*/true);  // [B, 1] position of the next token
  std::vector<bool> done(B, false);
  at::Tensor logits = decoder.forward(in, fo).logits;  // [B, T0, V]
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    at::Tensor next = logits.select(1, logits.size(1) - 1).argmax(-1);  // [B] on the output device
    at::Tensor next_cpu = next.to(at::kCPU);
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) continue;
      const int64_t tok = next_cpu[b].item<int64_t>();
      out[b].push_back(tok);
      if (std::find(options.stop_ids.begin(), options.stop_ids.end(), tok) != options.stop_ids.end()) done[b] = true;
      all_done &= done[b];
    }
    if (all_done || step + 1 == options.max_new_tokens) break;
    ForwardInput step_in;
    step_in.input_ids = next.view({B, 1});
    if (padded) {
      mask = at::cat({mask, at::ones({B, 1}, mask.options())}, 1);
      step_in.attention_mask = mask;
      step_in.position_ids = next_pos;
    }
    next_pos = next_pos + 1;
    logits = decoder.forward(step_in, fo).logits;
  }
  return out;
}

}  // namespace sparsecl::model
