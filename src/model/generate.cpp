// Greedy generation: one prefill over the left-padded batch, then one token per step through the
// preallocated KV cache, with the tokens kept on the device (the host checks for stops every few
// steps); rows that have stopped keep decoding but their output ends at their stop token. Under a
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
  fo.logits_to_keep = 1;  // only the last position's logits are read
  const int64_t N = options.max_new_tokens;
  // The tokens stay on the device; the host looks at them every kStopCheckEvery steps (is every row
  // stopped?) and once at the end, instead of synchronising on every step. Rows that stopped keep
  // decoding (their later tokens are cut off below), exactly as when they were checked every step.
  constexpr int64_t kStopCheckEvery = 16;
  const at::Device out_dev = decoder.output_device();
  at::Tensor generated = at::zeros({B, N}, at::TensorOptions().dtype(at::kLong).device(out_dev));  // [B, N]
  at::Tensor full_mask;  // [B, T0 + N]: the prompt mask, then ones for the generated positions
  if (padded) full_mask = at::cat({mask, at::ones({B, N}, mask.options())}, 1);
  at::Tensor next_pos = mask.sum(1, /*keepdim=*/true);  // [B, 1] position of the next token
  auto stopped = [&](const at::Tensor& tokens /*[B, n] host*/) {
    auto t = tokens.accessor<int64_t, 2>();
    for (int64_t b = 0; b < B; ++b) {
      bool stop = false;
      for (int64_t j = 0; j < tokens.size(1) && !stop; ++j)
        stop = std::find(options.stop_ids.begin(), options.stop_ids.end(), t[b][j]) != options.stop_ids.end();
      if (!stop) return false;
    }
    return true;
  };
  int64_t steps = 0;
  at::Tensor logits = decoder.forward(in, fo).logits;  // [B, 1, V]
  for (int64_t step = 0; step < N; ++step) {
    const at::Tensor next = logits.select(1, 0).argmax(-1);  // [B] on the output device
    generated.select(1, step).copy_(next);
    steps = step + 1;
    if (steps == N) break;
    if (!options.stop_ids.empty() && steps % kStopCheckEvery == 0 &&
        stopped(generated.narrow(1, 0, steps).to(at::kCPU)))
      break;
    ForwardInput step_in;
    step_in.input_ids = next.view({B, 1});
    if (padded) {
      step_in.attention_mask = full_mask.narrow(1, 0, T0 + steps);  // [B, past + 1]
      step_in.position_ids = next_pos;
    }
    next_pos = next_pos + 1;
    logits = decoder.forward(step_in, fo).logits;
  }
  // Each row up to and including its first stop token.
  const at::Tensor host = generated.narrow(1, 0, steps).to(at::kCPU);  // [B, steps]
  auto h = host.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < steps; ++j) {
      out[b].push_back(h[b][j]);
      if (std::find(options.stop_ids.begin(), options.stop_ids.end(), h[b][j]) != options.stop_ids.end()) break;
    }
  }
  return out;
}

}  // namespace sparsecl::model
