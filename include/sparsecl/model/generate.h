// Greedy decoding with the KV cache. Prompts of different lengths are left-padded internally (with an
// attention mask and position ids from the mask, as HF does), so one batch serves many prompts.
#pragma once

#include <cstdint>
#include <vector>

#include "sparsecl/model/decoder.h"

namespace sparsecl::model {

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  std::vector<int64_t> stop_ids;  // a row stops after emitting one of these (it is kept in the output)
};

// Returns, per prompt, the newly generated ids (not the prompt). Runs without autograd.
std::vector<std::vector<int64_t>> greedy_generate(const Decoder& decoder, const std::vector<std::vector<int64_t>>& prompts,
                                                  const GenerateOptions& options);

}  // namespace sparsecl::model
