// Greedy decoding with the KV cache. Prompts of different lengths are left-padded internally (with an
// attention mask and position ids from the mask, as HF does), so one batch serves many prompts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sparsecl/model/decoder.h"

namespace sparsecl::model {

// How the decoding steps after the prefill run:
//   dynamic  each step attends over the keys written so far (the cache's length grows on the host);
//   fixed    each step is a StaticDecodeStep (decoder.h): same shapes and buffers every step, attention
//            over the whole cache capacity under a mask; the computation a graph captures, runnable
//            anywhere (tests compare it with dynamic on the CPU);
//   graph    fixed, with one step captured as a CUDA graph and replayed (single CUDA device): one
//            launch per token instead of a few thousand kernel launches from the host;
//   automatic  dynamic, unless the environment variable SPARSECL_DECODE=dynamic|fixed|graph says
//            otherwise. graph is the candidate default on a single GPU: it becomes automatic's choice
//            there once a GPU run has checked it (GenerateCuda.*) and measured it (bench model).
enum class DecodeMode { automatic, dynamic, fixed, graph };
DecodeMode parse_decode_mode(const std::string& name);  // Error naming the value otherwise
std::string decode_mode_name(DecodeMode mode);          // "automatic", "dynamic", "fixed", "graph"

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  std::vector<int64_t> stop_ids;  // a row stops after emitting one of these (it is kept in the output)
  DecodeMode mode = DecodeMode::automatic;
};

// Returns, per prompt, the newly generated ids (not the prompt). Runs without autograd.
std::vector<std::vector<int64_t>> greedy_generate(const Decoder& decoder, const std::vector<std::vector<int64_t>>& prompts,
                                                  const GenerateOptions& options);

// The mode greedy_generate uses for `requested` on this decoder (automatic and SPARSECL_DECODE resolved;
// graph falls back to fixed off a single CUDA device).
DecodeMode resolve_decode_mode(const Decoder& decoder, DecodeMode requested);

}  // namespace sparsecl::model
