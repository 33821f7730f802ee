// The one decoder-only transformer behind every subcommand: Llama / Mistral / Qwen2 / Qwen3 as data
// (ModelConfig), weights named exactly as the HF tensors, loaded from HF checkpoint directories.
//
// Design: plain structs of at::Tensor rather than torch::nn::Module, so that loading assigns tensors
// without a throw-away random init, every parameter is addressable by its HF name, and the forward
// pass is one readable function. Numerics follow HF transformers (RMSNorm in fp32, RoPE tables in
// fp32, loss in fp32) so that fp32 CPU results agree with it to ~1e-5.
//
// Hook point (llama.cpp style): an optional callback sees, per layer, the MLP intermediate
// h = act(gate_proj(x)) * up_proj(x) (the input of down_proj, [B,T,I]) and the residual stream after
// the layer ([B,T,H]). Probing and masked tuning attach there without forking the model code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "sparsecl/model/config.h"

namespace sparsecl::model {

// y = x W^T + b + sum_adapters scale * B (A dropout(x)): a base projection plus stacked LoRA deltas.
struct LoraDelta {
  at::Tensor A;  // [r, in]
  at::Tensor B;  // [out, r]
  double scale = 1.0;
  double dropout = 0.0;  // applied to x in training mode only
};

struct Linear {
  at::Tensor weight;  // [out, in]
  at::Tensor bias;    // [out] or undefined
  std::vector<LoraDelta> lora;
};

struct RMSNorm {
  at::Tensor weight;  // [dim]
};

struct DecoderLayer {
  RMSNorm input_layernorm, post_attention_layernorm;
  Linear q_proj, k_proj, v_proj, o_proj;
  RMSNorm q_norm, k_norm;  // qwen3 only (weights undefined otherwise)
  Linear gate_proj, up_proj, down_proj;
};

// Where a hook sees the forward pass, per layer. Every linear projection's input is one of them:
//   AttnInput       [B,T,H]     input_layernorm(x): the input of q_proj / k_proj / v_proj
//   AttnOutput      [B,T,nh*D]  attention output before o_proj: the input of o_proj
//   MlpInput        [B,T,H]     post_attention_layernorm(x): the input of gate_proj / up_proj
//   MlpIntermediate [B,T,I]     act(gate_proj(x)) * up_proj(x): the input of down_proj (the probe's point)
//   Residual        [B,T,H]     the residual stream after the layer
enum class HookPoint { AttnInput, AttnOutput, MlpInput, MlpIntermediate, Residual };
// The hook point whose tensor is the input of projection `proj` ("q_proj", ..., "down_proj").
HookPoint input_hook_point(const std::string& proj);
// Called during forward with (point, layer index, tensor). The tensor is the live activation: a hook
// may read it, accumulate statistics from it, or register an autograd hook on it.
using ActivationHook = std::function<void(HookPoint, int64_t layer, const at::Tensor&)>;

// Preallocated key/value cache for incremental decoding: per layer [B, kv_heads, capacity, head_dim].
class KVCache {
 public:
  KVCache(const ModelConfig& config, int64_t batch, int64_t capacity, at::ScalarType dtype, at::Device device);
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }

 private:
  friend class Decoder;
  std::vector<at::Tensor> k_, v_;
  int64_t length_ = 0, capacity_ = 0;
};

struct ForwardInput {
  at::Tensor input_ids;       // [B, T] int64
  at::Tensor attention_mask;  // optional [B, past + T], 1 = real token (right or left padding)
  at::Tensor position_ids;    // optional [B, T]; default past + arange(T)
};

struct ForwardOptions {
  bool logits = true;          // the LM head (skip it when only activations are wanted)
  bool hidden_states = false;  // HF convention: L+1 entries, the last after the final norm
  bool mlp_act = false;        // every layer's down_proj input
  bool training = false;       // enables LoRA dropout
  KVCache* cache = nullptr;    // read and extended when given
  const ActivationHook* hook = nullptr;
};

struct ForwardOutput {
  at::Tensor logits;                      // [B, T, V] in the compute dtype
  at::Tensor last_hidden;                 // [B, T, H] after the final norm
  std::vector<at::Tensor> hidden_states;  // [B, T, H] x (L+1) when asked for
  std::vector<at::Tensor> mlp_act;        // [B, T, I] x L when asked for
};

class Decoder {
 public:
  // Loads DIR/config.json and the checkpoint (single or sharded safetensors) into `dtype` on `device`.
  // Every tensor is validated (present, shape, dtype) before any is converted: a bad checkpoint
  // throws sparsecl::Error naming the file and tensor, and nothing is half-loaded. Tensors the model
  // does not use are named in a warning.
  static Decoder load(const std::filesystem::path& dir, at::ScalarType dtype, at::Device device);

  ForwardOutput forward(const ForwardInput& input, const ForwardOptions& options = {}) const;

  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }
  const std::filesystem::path& source() const { return source_; }

  // Every parameter under its HF name ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"
  // only when untied). Pointers stay valid for the Decoder's lifetime.
  std::vector<std::pair<std::string, at::Tensor*>> named_parameters();
  // Every linear projection under its HF module name ("model.layers.0.mlp.down_proj").
  std::vector<std::pair<std::string, Linear*>> named_linears();

  std::vector<DecoderLayer>& layers() { return layers_; }
  const std::vector<DecoderLayer>& layers() const { return layers_; }

 private:
  Decoder() = default;
  void build_parameter_table();
  at::Tensor linear(const at::Tensor& x, const Linear& l, bool training) const;
  std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& position_ids) const;  // cos, sin [B,T,D] fp32

  ModelConfig config_;
  std::filesystem::path source_;
  at::ScalarType dtype_ = at::kFloat;
  at::Device device_ = at::kCPU;
  at::Tensor embed_tokens_;  // [V, H]
  at::Tensor lm_head_;       // [V, H]; undefined when tied (embed_tokens_ is used)
  RMSNorm norm_;
  std::vector<DecoderLayer> layers_;
  at::Tensor inv_freq_;      // [D/2] fp32 on device
  std::vector<std::pair<std::string, at::Tensor*>> params_;
};

// Mean next-token cross-entropy over labels != -100 (HF ForCausalLM convention: logits[:, t] predicts
// labels[:, t+1]), computed in fp32. logits [B, T, V], labels [B, T] int64 -> scalar.
at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels);

// Parses "float32" | "bfloat16" | "float16" and "cpu" | "cuda" | "cuda:N" with clear errors.
at::ScalarType parse_dtype(const std::string& name);
at::Device parse_device(const std::string& name);

}  // namespace sparsecl::model
