// Parsing and validation of HF config.json for the supported decoder families.
#include "sparsecl/model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"

namespace sparsecl::model {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

template <typename T>
T required(const json& j, const char* key, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) throw Error(source + ": missing required key '" + key + "'");
  try {
    return j[key].get<T>();
  } catch (const json::exception&) {
    throw Error(source + ": key '" + key + "' has the wrong type (" + j[key].dump() + ")");
  }
}

template <typename T>
T optional_or(const json& j, const char* key, T fallback, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  try {
    return j[key].get<T>();
  } catch (const json::exception&) {
    throw Error(source + ": key '" + key + "' has the wrong type (" + j[key].dump() + ")");
  }
}

RopeConfig parse_rope(const json& j, const std::string& source) {
  RopeConfig rope;
  // transformers 5 writes `rope_parameters` (which carries rope_theta); the published form has a
  // top-level `rope_theta` and an optional `rope_scaling`.
  json params = json::object();
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    params = j["rope_parameters"];
  } else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) {
    params = j["rope_scaling"];
  }
  rope.theta = optional_or<double>(params, "rope_theta", optional_or<double>(j, "rope_theta", 10000.0, source), source);
  std::string type = optional_or<std::string>(params, "rope_type", optional_or<std::string>(params, "type", "default", source), source);
  rope.type = type;
  if (type == "default") return rope;
  if (type == "linear") {
    rope.factor = required<double>(params, "factor", source + " rope parameters");
    return rope;
  }
  if (type == "llama3") {
    rope.factor = required<double>(params, "factor", source + " rope parameters");
    rope.low_freq_factor = required<double>(params, "low_freq_factor", source + " rope parameters");
    rope.high_freq_factor = required<double>(params, "high_freq_factor", source + " rope parameters");
    rope.original_max_position_embeddings =
        required<int64_t>(params, "original_max_position_embeddings", source + " rope parameters");
    return rope;
  }
  if (type == "yarn") {  // transformers' _compute_yarn_parameters
    const std::string where = source + " rope parameters";
    rope.original_max_position_embeddings = required<int64_t>(params, "original_max_position_embeddings", where);
    rope.factor = params.contains("factor") && !params["factor"].is_null()
                      ? required<double>(params, "factor", where)
                      : static_cast<double>(optional_or<int64_t>(j, "max_position_embeddings", 4096, source)) /
                            static_cast<double>(rope.original_max_position_embeddings);
    auto mscale_of = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    const double mscale = optional_or<double>(params, "mscale", 0.0, where);
    const double mscale_all_dim = optional_or<double>(params, "mscale_all_dim", 0.0, where);
    if (params.contains("attention_factor") && !params["attention_factor"].is_null())
      rope.attention_factor = required<double>(params, "attention_factor", where);
    else if (mscale != 0.0 && mscale_all_dim != 0.0)
      rope.attention_factor = mscale_of(rope.factor, mscale) / mscale_of(rope.factor, mscale_all_dim);
    else
      rope.attention_factor = mscale_of(rope.factor, 1.0);
    // `or 32` / `or 1` in transformers: a missing, null or zero beta takes the default.
    const double fast = optional_or<double>(params, "beta_fast", 0.0, where), slow = optional_or<double>(params, "beta_slow", 0.0, where);
    rope.beta_fast = fast != 0.0 ? fast : 32.0;
    rope.beta_slow = slow != 0.0 ? slow : 1.0;
    rope.truncate = optional_or<bool>(params, "truncate", true, where);
    if (optional_or<double>(params, "partial_rotary_factor", 1.0, where) != 1.0)
      throw Error(source + ": yarn with partial_rotary_factor != 1 is not supported");
    return rope;
  }
  throw Error(source + ": unsupported rope type '" + type + "' (supported: default, linear, llama3, yarn)");
}

// Which layers attend within a sliding window, as transformers 5 decides it: Mistral applies its
// sliding_window to every layer (MistralModel ignores layer_types); Qwen2 / Qwen3 only with
// use_sliding_window, on the layers layer_types names "sliding_attention" or, without layer_types, on
// layers >= max_window_layers (default 28). Llama has no sliding window.
void parse_sliding_window(const json& j, const std::string& source, ModelConfig& c) {
  const size_t L = static_cast<size_t>(c.num_hidden_layers);
  if (c.model_type == "mistral") {
    if (j.contains("sliding_window") && !j["sliding_window"].is_null()) {
      c.sliding_window = required<int64_t>(j, "sliding_window", source);
      c.sliding_layers.assign(L, true);
    }
  } else if (c.model_type == "qwen2" || c.model_type == "qwen3") {
    if (optional_or<bool>(j, "use_sliding_window", false, source)) {
      c.sliding_window = optional_or<int64_t>(j, "sliding_window", 4096, source);
      const int64_t first = optional_or<int64_t>(j, "max_window_layers", 28, source);
      c.sliding_layers.assign(L, false);
      for (size_t l = 0; l < L; ++l) c.sliding_layers[l] = static_cast<int64_t>(l) >= first;
    }
    if (j.contains("layer_types") && !j["layer_types"].is_null()) {
      const json& types = j["layer_types"];
      if (!types.is_array() || types.size() != L)
        throw Error(source + ": \"layer_types\" must be a list of num_hidden_layers (" + std::to_string(L) + ") strings");
      std::vector<bool> sliding(L, false);
      for (size_t l = 0; l < L; ++l) {
        const std::string t = types[l].is_string() ? types[l].get<std::string>() : types[l].dump();
        if (t == "sliding_attention") sliding[l] = true;
        else if (t != "full_attention")
          throw Error(source + ": layer_types[" + std::to_string(l) + "] is '" + t +
                      "' (supported: full_attention, sliding_attention)");
      }
      const bool any = std::find(sliding.begin(), sliding.end(), true) != sliding.end();
      if (any && !c.sliding_window)
        throw Error(source + ": layer_types names sliding_attention layers but use_sliding_window is off "
                             "(transformers would find no sliding_window for them)");
      if (c.sliding_window) c.sliding_layers = std::move(sliding);
    }
  }
  if (c.sliding_window && *c.sliding_window < 1)
    throw Error(source + ": sliding_window must be >= 1, got " + std::to_string(*c.sliding_window));
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& source) {
  if (!j.is_object()) throw Error(source + ": config is not a JSON object");
  ModelConfig c;
  c.model_type = required<std::string>(j, "model_type", source);
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2" && c.model_type != "qwen3")
    throw Error(source + ": unknown model_type '" + c.model_type + "' (supported: llama, mistral, qwen2, qwen3)");
  c.vocab_size = required<int64_t>(j, "vocab_size", source);
  c.hidden_size = required<int64_t>(j, "hidden_size", source);
  c.intermediate_size = required<int64_t>(j, "intermediate_size", source);
  c.num_hidden_layers = required<int64_t>(j, "num_hidden_layers", source);
  c.num_attention_heads = required<int64_t>(j, "num_attention_heads", source);
  c.num_key_value_heads = optional_or<int64_t>(j, "num_key_value_heads", c.num_attention_heads, source);
  if (c.num_attention_heads <= 0 || c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads)
    throw Error(source + ": num_attention_heads (" + std::to_string(c.num_attention_heads) +
                ") must be a positive multiple of num_key_value_heads (" + std::to_string(c.num_key_value_heads) + ")");
  const bool has_head_dim = j.contains("head_dim") && !j["head_dim"].is_null();
  if (!has_head_dim && c.hidden_size % c.num_attention_heads)
    throw Error(source + ": hidden_size is not divisible by num_attention_heads and no head_dim is given");
  c.head_dim = has_head_dim ? required<int64_t>(j, "head_dim", source) : c.hidden_size / c.num_attention_heads;
  c.max_position_embeddings = optional_or<int64_t>(j, "max_position_embeddings", 4096, source);
  c.rms_norm_eps = optional_or<double>(j, "rms_norm_eps", 1e-6, source);
  c.hidden_act = optional_or<std::string>(j, "hidden_act", "silu", source);
  if (c.hidden_act != "silu" && c.hidden_act != "gelu" && c.hidden_act != "gelu_pytorch_tanh")
    throw Error(source + ": unsupported hidden_act '" + c.hidden_act + "' (supported: silu, gelu, gelu_pytorch_tanh)");
  c.rope = parse_rope(j, source);
  c.tie_word_embeddings = optional_or<bool>(j, "tie_word_embeddings", false, source);
  c.mlp_bias = optional_or<bool>(j, "mlp_bias", false, source);
  if (c.model_type == "qwen2") {
    c.qkv_bias = true;  // hard-wired in Qwen2Attention
  } else {
    c.qkv_bias = c.o_bias = optional_or<bool>(j, "attention_bias", false, source);
  }
  c.qk_norm = (c.model_type == "qwen3");
  parse_sliding_window(j, source, c);
  if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"].get<int64_t>();
  if (j.contains("pad_token_id") && j["pad_token_id"].is_number_integer()) c.pad_token_id = j["pad_token_id"].get<int64_t>();
  if (j.contains("eos_token_id")) {
    if (j["eos_token_id"].is_number_integer()) c.eos_token_ids.push_back(j["eos_token_id"].get<int64_t>());
    else if (j["eos_token_id"].is_array())
      for (auto& e : j["eos_token_id"]) c.eos_token_ids.push_back(e.get<int64_t>());
  }
  c.torch_dtype = optional_or<std::string>(j, "torch_dtype", optional_or<std::string>(j, "dtype", "", source), source);
  for (auto [name, v] : {std::pair{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size},
                         {"intermediate_size", c.intermediate_size}, {"num_hidden_layers", c.num_hidden_layers},
                         {"head_dim", c.head_dim}})
    if (v <= 0) throw Error(source + ": '" + name + "' must be positive");
  if (c.head_dim % 2) throw Error(source + ": head_dim must be even for RoPE");
  return c;
}

ModelConfig ModelConfig::load(const fs::path& dir_or_file) {
  const fs::path path = fs::is_directory(dir_or_file) ? dir_or_file / "config.json" : dir_or_file;
  return from_json(read_json_file(path, "model config"), path.string());
}

json ModelConfig::to_json() const {
  json rope_j = {{"rope_type", rope.type}, {"rope_theta", rope.theta}};
  if (rope.type != "default") rope_j["factor"] = rope.factor;
  if (rope.type == "yarn") {
    rope_j["original_max_position_embeddings"] = rope.original_max_position_embeddings;
    rope_j["beta_fast"] = rope.beta_fast;
    rope_j["beta_slow"] = rope.beta_slow;
    rope_j["truncate"] = rope.truncate;
    rope_j["attention_factor"] = rope.attention_factor;
  }
  if (rope.type == "llama3") {
    rope_j["low_freq_factor"] = rope.low_freq_factor;
    rope_j["high_freq_factor"] = rope.high_freq_factor;
    rope_j["original_max_position_embeddings"] = rope.original_max_position_embeddings;
  }
  json j = {{"model_type", model_type},
            {"vocab_size", vocab_size},
            {"hidden_size", hidden_size},
            {"intermediate_size", intermediate_size},
            {"num_hidden_layers", num_hidden_layers},
            {"num_attention_heads", num_attention_heads},
            {"num_key_value_heads", num_key_value_heads},
            {"head_dim", head_dim},
            {"max_position_embeddings", max_position_embeddings},
            {"rms_norm_eps", rms_norm_eps},
            {"hidden_act", hidden_act},
            {"rope_parameters", rope_j},
            {"tie_word_embeddings", tie_word_embeddings},
            {"qkv_bias", qkv_bias},
            {"o_bias", o_bias},
            {"mlp_bias", mlp_bias},
            {"qk_norm", qk_norm},
            {"sliding_window", sliding_window ? json(*sliding_window) : json(nullptr)},
            {"sliding_layers", sliding_layers},
            {"eos_token_ids", eos_token_ids},
            {"torch_dtype", torch_dtype}};
  return j;
}

int64_t ModelConfig::parameter_count() const {
  const int64_t H = hidden_size, I = intermediate_size, D = head_dim;
  const int64_t q = num_attention_heads * D, kv = num_key_value_heads * D;
  int64_t attn = H * q + 2 * H * kv + q * H + (qkv_bias ? q + 2 * kv : 0) + (o_bias ? H : 0) + (qk_norm ? 2 * D : 0);
  int64_t mlp = 3 * H * I + (mlp_bias ? 2 * I + H : 0);
  int64_t layer = attn + mlp + 2 * H;
  return vocab_size * H * (tie_word_embeddings ? 1 : 2) + num_hidden_layers * layer + H;
}

}  // namespace sparsecl::model
