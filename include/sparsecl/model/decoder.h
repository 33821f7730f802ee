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
//
// Pipeline placement (HF device_map style, docs/model.md): a Placement puts contiguous runs of decoder
// layers on different devices, so that a model too large for one GPU runs on several of one node; the
// layers run one after another and the hidden state moves to the next layer's device at run boundaries.
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

// A compact update of a few output rows or input columns of a projection (the `mask` method's neuron
// deltas): only those rows / columns change, stored as K dense rows / columns plus their indices
// instead of a full-size masked copy. The projection then computes with W[index, :] + delta (rows) or
// W[:, index] + delta (columns):
//   rows    (columns = false): delta [K, in];  y[..., index] += x delta^T          (index_add, last dim)
//   columns (columns = true):  delta [out, K]; y += x[..., index] delta^T
struct IndexedDelta {
  at::Tensor index;  // [K] int64 on the weight's device, distinct entries
  at::Tensor delta;  // rows: [K, in]; columns: [out, K]; trainable ones are fp32 masters
  bool columns = false;
};

struct Linear {
  at::Tensor weight;  // [out, in]
  at::Tensor bias;    // [out] or undefined
  std::vector<LoraDelta> lora;
  std::vector<IndexedDelta> indexed;  // applied after the LoRA deltas
};

// Folds every indexed delta into the weight (W[index, :] += delta or W[:, index] += delta, in the
// weight's dtype, no autograd) and removes them: the rows / columns outside `index` stay bit for bit.
void merge_indexed_deltas(Linear& linear);

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
// may read it, accumulate statistics from it, or register an autograd hook on it (not with
// ForwardOptions::checkpoint_layers: the hook then sees the activations of the no-grad first pass).
using ActivationHook = std::function<void(HookPoint, int64_t layer, const at::Tensor&)>;

// The checkpoint tensors a config requires, in HF order: HF name -> shape ("lm_head.weight" only when
// untied). The one list that loading, random init and Placement::balanced's byte count use.
std::vector<std::pair<std::string, std::vector<int64_t>>> checkpoint_tensor_shapes(const ModelConfig& config);

// Where every tensor of a Decoder lives (pipeline placement across the GPUs of one node).
//   embed_device   the embeddings (and RoPE tables); where callers put input_ids / attention_mask
//   layer_devices  one per decoder layer: its norms, projections (and their LoRA / indexed deltas), its
//                  slice of the KV cache
//   head_device    the final norm and the LM head; where logits / last_hidden come out. With tied
//                  embeddings the head multiplies by the embedding matrix itself, so head_device must
//                  equal embed_device (no copy: a copy would go stale when the embedding is trained or
//                  overwritten, e.g. full fine-tuning of a tied model); balanced() places it there.
struct Placement {
  std::vector<at::Device> layer_devices;
  at::Device embed_device{at::kCPU};
  at::Device head_device{at::kCPU};

  // Everything on `device`.
  static Placement single(at::Device device, int64_t num_layers);
  // Contiguous runs of layers over `devices` (in order) with parameter bytes per device balanced: the
  // embeddings count on the first device, the final norm + untied LM head on the last (a tied head on
  // the first, with the embeddings). Rule: with at least as many layers as devices every device first
  // gets one layer; each remaining layer then goes to the device whose byte total after taking it is
  // smallest (ties: the lower index), which minimises the largest total; device i then holds the next
  // n_i layers. Deterministic; a device may be listed twice ("cpu,cpu" exercises the split on a CPU).
  // Throws sparsecl::Error when `devices` is empty.
  static Placement balanced(const ModelConfig& config, const std::vector<at::Device>& devices, at::ScalarType dtype);

  // The device of a checkpoint tensor under its HF name ("model.layers.3.mlp.up_proj.weight" -> layer
  // 3's device). Throws sparsecl::Error for a name outside checkpoint_tensor_shapes().
  at::Device device_of(const std::string& tensor_name) const;
  // True when every tensor is on one device.
  bool is_single() const;
  // Parameter bytes per distinct device (in order of first use: embeddings, layers, head) as
  // balanced() counts them: every checkpoint tensor once, on the device it is placed on.
  std::vector<std::pair<at::Device, int64_t>> bytes_per_device(const ModelConfig& config, at::ScalarType dtype) const;
  // "cuda:0 [embed_tokens, layers 0-39]; cuda:1 [layers 40-79, norm, lm_head]" for logs.
  std::string describe() const;
  // Throws sparsecl::Error unless there is one device per layer of `config` and a tied head sits with
  // the embeddings.
  void check(const ModelConfig& config) const;
};

// The device list of a device map spec (the `device_map` config key / `--device-map` flag):
//   "" or "none"        -> {} (no pipeline: the model goes on its one device)
//   "auto"              -> every visible CUDA device, cuda:0 .. cuda:N-1 (Error when none is visible)
//   "cuda:0,cuda:1,..." -> that list, in order; "cpu" entries are allowed ("cpu,cpu" runs the split
//                          code path on a CPU); "cuda" without an index means cuda:0
// Throws sparsecl::Error naming the spec on an unknown entry, an empty entry or a CUDA index that is
// not visible.
std::vector<at::Device> parse_device_map(const std::string& spec);
// What the CLI / config wiring calls: Placement::balanced over parse_device_map(device_map), or, when
// the map is "" / "none", Placement::single(device) (device_map, when given, overrides device).
Placement resolve_placement(const ModelConfig& config, const std::string& device_map, at::Device device,
                            at::ScalarType dtype);

class Decoder;
// The one way the subcommands load a model from the user's settings: `device` ("cpu" | "cuda" |
// "cuda:N") unless `device_map` (the config key / --device-map) places the layers over several devices,
// in which case the placement is logged.
Decoder load_decoder(const std::filesystem::path& dir, at::ScalarType dtype, const std::string& device,
                     const std::string& device_map);

// Preallocated key/value cache for incremental decoding: per layer [B, kv_heads, capacity, head_dim],
// each on its layer's device.
class KVCache {
 public:
  KVCache(const ModelConfig& config, int64_t batch, int64_t capacity, at::ScalarType dtype, at::Device device);
  KVCache(const ModelConfig& config, int64_t batch, int64_t capacity, at::ScalarType dtype, const Placement& placement);
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
  at::Tensor position_ids;    // optional [B, T]; default past + arange(T), or restarting at 0 per segment
  // Optional [B, T] int64 for packed rows (data::make_packed_batch): 0 = padding, 1..n = the example of
  // the row a token belongs to. A token attends only to earlier tokens of its own segment (a
  // block-diagonal causal mask) and, unless position_ids are given, positions restart at 0 in every
  // segment, so each example computes exactly as if it were alone. Not with a KV cache.
  at::Tensor segment_ids;
};

// A decoding step whose shapes and buffers are the same at every step, so that a CUDA graph can capture
// it once and replay it (greedy_generate): the new token's keys / values go to cache position
// write_index (a device tensor, not a host integer) and the query attends over the whole cache capacity
// under `attend`. The caller marks the new position in `attend` and advances write_index and the
// position ids between steps; the cache's host-side length is neither read nor changed.
struct StaticDecodeStep {
  at::Tensor write_index;  // [1] int64 on the input device: the cache position of this step's token
  at::Tensor attend;       // [B, capacity] bool on the input device: true = a key the query may see
};

struct ForwardOptions {
  bool logits = true;          // the LM head (skip it when only activations are wanted)
  // When > 0, logits only for the last logits_to_keep positions ([B, keep, V], as HF's logits_to_keep):
  // generation needs the last position's alone, and the full [B, T, V] prefill logits of a large batch
  // would be gigabytes.
  int64_t logits_to_keep = 0;
  bool hidden_states = false;  // HF convention: L+1 entries, the last after the final norm
  bool mlp_act = false;        // every layer's down_proj input
  bool training = false;       // enables LoRA dropout
  KVCache* cache = nullptr;    // read and extended when given
  // With a cache, one new token per row (T = 1) and position_ids given: a static decoding step (above).
  const StaticDecodeStep* static_step = nullptr;
  const ActivationHook* hook = nullptr;
  // Activation checkpointing (training, grad mode on): each decoder layer runs without autograd and
  // keeps only its input; the backward pass recomputes it (same dropout masks: the CPU/CUDA generator
  // states are replayed) and backpropagates through the recomputation. Activation memory drops from
  // every intermediate of every layer to one [B, T, H] per layer, for about one more forward of
  // compute. The hook runs once per layer in the first pass, on tensors without autograd history
  // (it cannot register autograd hooks on them), and not during the recomputation. Not with a cache.
  // Gradients reach every tensor of the layer that requires grad (the norms' and projections'
  // weights and biases, LoRA A / B, indexed deltas) through the autograd graph as usual.
  bool checkpoint_layers = false;
  // With checkpoint_layers: only layers 0 .. checkpoint_layer_count - 1 are checkpointed (-1: all). The
  // others keep their activations, which saves their recomputation for the memory they hold.
  int64_t checkpoint_layer_count = -1;
};

// Devices under a pipeline placement: logits and last_hidden on the head device (output_device());
// hidden_states[0] on the embedding device, hidden_states[l] (0 < l < L) and mlp_act[l] on the device of
// the layer that produced them, the last hidden state on the head device. Hooks likewise see each
// layer's activations on that layer's device.
struct ForwardOutput {
  at::Tensor logits;                      // [B, T, V] (or [B, logits_to_keep, V]) in the compute dtype
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
  // The same with every tensor converted straight from the mapped file to its device in `placement`
  // (never the whole model on one device first). Throws when the placement does not fit the config.
  static Decoder load(const std::filesystem::path& dir, at::ScalarType dtype, const Placement& placement);

  // Movable (the parameter table, which points into the object, is rebuilt); not copyable.
  Decoder(Decoder&& other) noexcept;
  Decoder& operator=(Decoder&& other) noexcept;
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;
  // A decoder of `config`'s shape with random weights made directly in `dtype` on `device` (no
  // checkpoint): projections, embeddings and the LM head ~ N(0, 0.02^2), norm weights 1, biases 0.
  // Drawn in HF tensor-name order from one generator of the device's kind seeded with `seed`, so one
  // seed gives the same weights on one device. For shape benchmarks (`sparsecl bench model`).
  static Decoder random(const ModelConfig& config, at::ScalarType dtype, at::Device device, uint64_t seed);
  // The same weights (drawn on the embedding device, each tensor then moved to its device in
  // `placement`): equal to random(config, dtype, placement.embed_device, seed) placed differently.
  static Decoder random(const ModelConfig& config, at::ScalarType dtype, const Placement& placement, uint64_t seed);

  ForwardOutput forward(const ForwardInput& input, const ForwardOptions& options = {}) const;

  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }
  // The input device (the embeddings): where callers put input_ids / attention_mask / labels.
  at::Device device() const { return placement_.embed_device; }
  // Where logits and last_hidden come out (the final norm and LM head).
  at::Device output_device() const { return placement_.head_device; }
  at::Device layer_device(int64_t layer) const { return placement_.layer_devices.at(static_cast<size_t>(layer)); }
  const Placement& placement() const { return placement_; }
  // The LM head [V, H] on output_device(): lm_head.weight, or the embedding matrix when tied. For losses
  // computed from last_hidden without the full logits (chunked_causal_lm_loss).
  const at::Tensor& head_weight() const { return config_.tie_word_embeddings ? embed_tokens_ : lm_head_; }
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

  // What every layer of one forward call shares (built once by forward() on the input device, then
  // copied once to each further device a layer runs on).
  struct LayerContext {
    int64_t B = 0, T = 0, past = 0, S = 0;   // batch, new tokens, cached tokens, keys visible (past + T)
    at::Tensor cos, sin;                     // [B, 1, T, D] RoPE tables in the compute dtype
    std::optional<at::Tensor> mask;          // [B or 1, 1, T, S] boolean (true = may attend), or none
    bool is_causal = false;                  // plain causal attention (no mask)
    std::optional<at::Tensor> window_mask;   // sliding layers' mask [B or 1, 1, T, S] when the window
                                             // hides some key (S > W); none: they use `mask` / is_causal
    bool training = false;                   // LoRA dropout on
    KVCache* cache = nullptr;
    at::Tensor write_index;                  // [1] int64: a static decoding step's cache position
    const ActivationHook* hook = nullptr;    // null during a checkpoint recomputation
    std::vector<at::Tensor>* mlp_act = nullptr;  // receives the MLP intermediate [B, T, I], or null
  };
  // Decoder layer `l`: x [B, T, H] -> the residual stream after the layer [B, T, H]; calls the hook at
  // AttnInput, AttnOutput, MlpInput, MlpIntermediate and Residual, writes the layer's keys / values into
  // the cache when there is one.
  at::Tensor layer_forward(int64_t l, const at::Tensor& x, const LayerContext& ctx) const;
  // layer_forward under activation checkpointing (ForwardOptions::checkpoint_layers).
  at::Tensor checkpointed_layer_forward(int64_t l, const at::Tensor& x, const LayerContext& ctx) const;
  // `ctx` with its tensors (RoPE tables, mask) on `device`.
  static LayerContext context_on(const LayerContext& ctx, at::Device device);

  ModelConfig config_;
  std::filesystem::path source_;
  at::ScalarType dtype_ = at::kFloat;
  Placement placement_;
  at::Tensor embed_tokens_;  // [V, H] on placement_.embed_device
  at::Tensor lm_head_;       // [V, H] on placement_.head_device; undefined when tied (embed_tokens_ is used)
  RMSNorm norm_;             // on placement_.head_device
  std::vector<DecoderLayer> layers_;  // layer l on placement_.layer_devices[l]
  at::Tensor inv_freq_;      // [D/2] fp32 on the embedding device
  std::vector<std::pair<std::string, at::Tensor*>> params_;
};

// Mean next-token cross-entropy over labels != -100 (HF ForCausalLM convention: logits[:, t] predicts
// labels[:, t+1]), computed in fp32. logits [B, T, V], labels [B, T] int64 -> scalar.
at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels);

// Parses "float32" | "bfloat16" | "float16" and "cpu" | "cuda" | "cuda:N" with clear errors.
at::ScalarType parse_dtype(const std::string& name);
at::Device parse_device(const std::string& name);

}  // namespace sparsecl::model
