// Greedy generation: one prefill over the left-padded batch, then one token per step through the
// preallocated KV cache, with the tokens kept on the device (the host checks for stops every few
// steps); rows that have stopped keep decoding but their output ends at their stop token. Under a
// pipeline placement the cache follows the layers' devices, the ids / mask / positions live on the
// input device and the logits (hence each step's argmax) on the output device; forward() moves the
// fed-back token to the input device.
//
// The decoding steps run in one of three ways (DecodeMode, generate.h). `dynamic` attends over the keys
// written so far. `fixed` runs every step as a StaticDecodeStep: the step's inputs (last token,
// position, cache write index, attention row mask) are device tensors that the step itself advances,
// so the same kernels on the same buffers run every step. `graph` captures such a step as a CUDA graph
// after one eager warm-up step and replays it: the host then issues one graph launch per token, which
// is what batched decoding on a large GPU is bound by otherwise (a few thousand kernel launches per
// step for an 8B model). A capture that fails is an error naming the way around it (dynamic decoding).
#include "sparsecl/model/generate.h"

#include <ATen/ATen.h>

#ifdef SPARSECL_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <optional>

#include "sparsecl/common/error.h"

namespace sparsecl::model {

DecodeMode parse_decode_mode(const std::string& name) {
  if (name == "auto" || name == "automatic") return DecodeMode::automatic;
  if (name == "dynamic") return DecodeMode::dynamic;
  if (name == "fixed") return DecodeMode::fixed;
  if (name == "graph") return DecodeMode::graph;
  throw Error("unknown decode mode '" + name + "' (auto, dynamic, fixed, graph)");
}

std::string decode_mode_name(DecodeMode mode) {
  switch (mode) {
    case DecodeMode::automatic: return "automatic";
    case DecodeMode::dynamic: return "dynamic";
    case DecodeMode::fixed: return "fixed";
    case DecodeMode::graph: return "graph";
  }
  return "?";
}

DecodeMode resolve_decode_mode(const Decoder& decoder, DecodeMode requested) {
  DecodeMode mode = requested;
  if (mode == DecodeMode::automatic) {
    const char* env = std::getenv("SPARSECL_DECODE");
    if (env != nullptr && *env != '\0') mode = parse_decode_mode(env);
  }
#ifdef SPARSECL_WITH_CUDA
  const bool graphs = decoder.placement().is_single() && decoder.device().is_cuda();
#else
  const bool graphs = false;  // a build without CUDA code has no graph capture
#endif
  if (mode == DecodeMode::automatic) return DecodeMode::dynamic;
  if (mode == DecodeMode::graph && !graphs) return DecodeMode::fixed;
  return mode;
}

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
  const DecodeMode mode = resolve_decode_mode(decoder, options.mode);
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
  const int64_t N = options.max_new_tokens;
  KVCache cache(decoder.config(), B, T0 + N, decoder.dtype(), decoder.placement());

  // The tokens stay on the device; the host looks at them every kStopCheckEvery steps (is every row
  // stopped?) and once at the end, instead of synchronising on every step. Rows that stopped keep
  // decoding (their later tokens are cut off below), exactly as when they were checked every step.
  constexpr int64_t kStopCheckEvery = 16;
  const at::Device out_dev = decoder.output_device();
  at::Tensor generated = at::zeros({B, N}, at::TensorOptions().dtype(at::kLong).device(out_dev));  // [B, N]
  int64_t steps = 0;  // columns of `generated` filled
  auto record = [&](const at::Tensor& token /*[B] or [B, 1], any device*/) {
    generated.select(1, steps).copy_(token.reshape({B}));
    ++steps;
  };
  auto all_stopped = [&] {
    if (options.stop_ids.empty() || steps % kStopCheckEvery != 0) return false;
    const at::Tensor tokens = generated.narrow(1, 0, steps).to(at::kCPU);  // [B, steps]
    auto t = tokens.accessor<int64_t, 2>();
    for (int64_t b = 0; b < B; ++b) {
      bool stop = false;
      for (int64_t j = 0; j < steps && !stop; ++j)
        stop = std::find(options.stop_ids.begin(), options.stop_ids.end(), t[b][j]) != options.stop_ids.end();
      if (!stop) return false;
    }
    return true;
  };

  // Prefill: the whole prompt, logits of its last position only.
  ForwardInput in;
  in.input_ids = ids;
  if (padded) {
    in.attention_mask = mask;
    in.position_ids = (mask.cumsum(1) - 1).clamp_min(0);
  }
  ForwardOptions fo;
  fo.cache = &cache;
  fo.logits_to_keep = 1;
  at::Tensor next = decoder.forward(in, fo).logits.select(1, 0).argmax(-1);  // [B] on the output device
  record(next);
  const at::Tensor first_position = mask.sum(1, /*keepdim=*/true);           // [B, 1] position of token 1

  if (mode == DecodeMode::dynamic) {
    at::Tensor full_mask;  // [B, T0 + N]: the prompt mask, then ones for the generated positions
    if (padded) full_mask = at::cat({mask, at::ones({B, N}, mask.options())}, 1);
    at::Tensor next_pos = first_position;
    while (steps < N && !all_stopped()) {
      ForwardInput step_in;
      step_in.input_ids = next.view({B, 1});
      if (padded) {
        step_in.attention_mask = full_mask.narrow(1, 0, T0 + steps);  // [B, past + 1]
        step_in.position_ids = next_pos;
      }
      next_pos = next_pos + 1;
      next = decoder.forward(step_in, fo).logits.select(1, 0).argmax(-1);
      record(next);
    }
  } else {
    // Fixed steps: all inputs in device buffers that the step advances itself.
    const auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
    at::Tensor token = next.view({B, 1}).to(dev).clone();                   // [B, 1] the last token
    at::Tensor position = first_position.clone();                           // [B, 1]
    StaticDecodeStep step_state;
    step_state.write_index = at::full({1}, T0, long_opts);                  // [1]
    step_state.attend = at::zeros({B, T0 + N}, long_opts.dtype(at::kBool));  // [B, T0 + N]
    step_state.attend.narrow(1, 0, T0).copy_(mask.to(at::kBool));
    ForwardOptions step_fo;
    step_fo.cache = &cache;
    step_fo.logits_to_keep = 1;
    step_fo.static_step = &step_state;
    ForwardInput step_in;
    step_in.input_ids = token;
    step_in.position_ids = position;
    const std::function<void()> decode_step = [&] {
      step_state.attend.index_fill_(1, step_state.write_index, true);  // the new token sees itself
      const at::Tensor logits = decoder.forward(step_in, step_fo).logits;  // [B, 1, V]
      token.copy_(logits.select(1, 0).argmax(-1).view({B, 1}));
      position.add_(1);
      step_state.write_index.add_(1);
    };
#ifdef SPARSECL_WITH_CUDA
    if (mode == DecodeMode::graph) {
      // Everything runs on a side stream (capture cannot use the legacy default stream), ordered after
      // the prefill and before whatever the caller's stream does next.
      const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(dev.index());
      const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, dev.index());
      at::cuda::CUDAEvent prefill_done;
      prefill_done.record(caller);
      prefill_done.block(side);
      {
        c10::cuda::CUDAStreamGuard on_side(side);
        std::optional<at::cuda::CUDAGraph> graph;
        if (steps < N) {  // one eager step first: it initialises the libraries' handles and workspaces
          decode_step();
          record(token);
        }
        if (steps < N && !all_stopped()) {  // capture records the step without running it
          graph.emplace();
          try {
            graph->capture_begin();
            decode_step();
            graph->capture_end();
          } catch (const std::exception& e) {
            // Leave the device usable (a stream still capturing blocks other work), then say so.
            cudaStreamCaptureStatus status{};
            if (cudaStreamIsCapturing(side.stream(), &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
              cudaGraph_t partial = nullptr;
              (void)cudaStreamEndCapture(side.stream(), &partial);
              if (partial != nullptr) (void)cudaGraphDestroy(partial);
            }
            throw Error(std::string("generate: capturing a decoding step as a CUDA graph failed (SPARSECL_DECODE=dynamic "
                                    "decodes without graphs): ") + e.what());
          }
        }
        while (graph && steps < N && !all_stopped()) {
          graph->replay();
          record(token);
        }
        side.synchronize();  // the last replays are done before the graph and its memory pool go
      }
      at::cuda::CUDAEvent decode_done;
      decode_done.record(side);
      decode_done.block(caller);
    }
#endif
    if (mode == DecodeMode::fixed) {
      while (steps < N && !all_stopped()) {
        decode_step();
        record(token);
      }
    }
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
