// The decoder's configuration, parsed from a HF config.json. One struct describes every supported
// family (llama, mistral, qwen2, qwen3): the families differ only in data (DESIGN.md, "Models").
// Both published config forms are accepted: `rope_theta` + `rope_scaling`, and transformers 5's
// `rope_parameters`. Anything we would have to guess about is an error naming the key.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace sparsecl::model {

struct RopeConfig {
  std::string type = "default";  // "default" | "linear" | "llama3" | "yarn"
  double theta = 10000.0;
  double factor = 1.0;                       // linear, llama3, yarn
  double low_freq_factor = 1.0;              // llama3
  double high_freq_factor = 4.0;             // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3, yarn
  double beta_fast = 32.0, beta_slow = 1.0;  // yarn: the ramp between extrapolated and interpolated dims
  bool truncate = true;                      // yarn: integer correction range
  double attention_factor = 1.0;             // yarn: cos / sin scale (HF's attention_scaling); 1 otherwise
};

struct ModelConfig {
  std::string model_type;  // llama | mistral | qwen2 | qwen3
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // qwen3 (and newer llama/mistral configs) set it independently of hidden/heads
  int64_t max_position_embeddings = 0;
  // Sliding-window attention (HF's sliding_window_overlay): on a sliding layer the query at key-slot index
  // i attends only to slots j with i - W < j <= i. Mistral: every layer when sliding_window is set;
  // Qwen2/3 with use_sliding_window: the layers config.json's layer_types names "sliding_attention", else
  // those from max_window_layers on.
  std::optional<int64_t> sliding_window;  // W
  std::vector<bool> sliding_layers;       // [num_hidden_layers], or empty: no sliding layer
  bool is_sliding_layer(int64_t l) const {
    return sliding_window && l >= 0 && static_cast<size_t>(l) < sliding_layers.size() && sliding_layers[static_cast<size_t>(l)];
  }
  double rms_norm_eps = 1e-6;
  std::string hidden_act = "silu";
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;   // qwen2; llama's attention_bias (which also biases o_proj)
  bool o_bias = false;
  bool mlp_bias = false;
  bool qk_norm = false;    // qwen3: per-head RMSNorm on q and k before RoPE
  std::optional<int64_t> bos_token_id, pad_token_id;
  std::vector<int64_t> eos_token_ids;
  std::string torch_dtype;  // as published ("bfloat16", "float32", ...); informational

  // Parses and validates; `source` names the file in error messages.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source);
  // Reads DIR/config.json (or a path to a config file).
  static ModelConfig load(const std::filesystem::path& dir_or_file);
  nlohmann::json to_json() const;

  int64_t kv_groups() const { return num_attention_heads / num_key_value_heads; }
  // Parameters of the HF model (embeddings counted once when tied).
  int64_t parameter_count() const;
};

}  // namespace sparsecl::model
