// The decoder: loading from HF checkpoints with full validation, and the forward pass (embeddings,
// RMSNorm, RoPE incl. llama3 scaling, GQA attention through SDPA with an optional KV cache, SwiGLU MLP,
// LM head). Mirrors transformers' modeling_llama / qwen2 / qwen3 / mistral numerics. Packed rows
// (segment_ids: block-diagonal causal attention, positions restarting per example) and activation
// checkpointing per decoder layer (an autograd Node that recomputes the layer in backward) serve the
// trainer. Under a pipeline placement (Placement) every tensor is loaded onto its own device and the
// forward pass moves the hidden state, and once per device the per-call tensors, to each layer's device.
#include "sparsecl/model/decoder.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <cmath>
#include <functional>
#include <mutex>
#include <numbers>
#include <set>
#include <unordered_set>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/fused_ops.h"

namespace sparsecl::model {
namespace fs = std::filesystem;

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

// Inverse frequencies [D/2] exactly as transformers' rope init functions compute them (fp32).
at::Tensor rope_inverse_frequencies(const ModelConfig& c) {
  const int64_t D = c.head_dim;
  at::Tensor exponent = at::arange(0, D, 2, at::kLong).to(at::kFloat) / static_cast<double>(D);
  at::Tensor inv_freq = 1.0 / at::pow(c.rope.theta, exponent);
  if (c.rope.type == "linear") return inv_freq / c.rope.factor;
  if (c.rope.type == "yarn") {  // _compute_yarn_parameters, op for op
    const double dim = static_cast<double>(D), base = c.rope.theta;
    const double old_len = static_cast<double>(c.rope.original_max_position_embeddings);
    auto correction_dim = [&](double rotations) {
      return (dim * std::log(old_len / (rotations * 2 * std::numbers::pi))) / (2 * std::log(base));
    };
    double low = correction_dim(c.rope.beta_fast), high = correction_dim(c.rope.beta_slow);
    if (c.rope.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, dim - 1);
    if (low == high) high += 0.001;  // no singularity
    at::Tensor ramp = ((at::arange(D / 2, at::kFloat) - low) / (high - low)).clamp(0, 1);
    at::Tensor extrapolation_factor = 1 - ramp;
    at::Tensor pos_freqs = at::pow(c.rope.theta, exponent);
    at::Tensor extrapolated = 1.0 / pos_freqs, interpolated = 1.0 / (c.rope.factor * pos_freqs);
    return interpolated * (1 - extrapolation_factor) + extrapolated * extrapolation_factor;
  }
  if (c.rope.type != "llama3") return inv_freq;
  const double factor = c.rope.factor, low = c.rope.low_freq_factor, high = c.rope.high_freq_factor;
  const double old_len = static_cast<double>(c.rope.original_max_position_embeddings);
  const double low_freq_wavelen = old_len / low, high_freq_wavelen = old_len / high;
  at::Tensor wavelen = 2.0 * std::numbers::pi / inv_freq;
  at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
  at::Tensor smooth = (old_len / wavelen - low) / (high - low);
  at::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
  at::Tensor is_medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
  return at::where(is_medium, smoothed, scaled);
}

}  // namespace

std::vector<std::pair<std::string, std::vector<int64_t>>> checkpoint_tensor_shapes(const ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim, V = c.vocab_size;
  const int64_t q = c.num_attention_heads * D, kv = c.num_key_value_heads * D;
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  out.push_back({"model.embed_tokens.weight", {V, H}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    out.push_back({p + "input_layernorm.weight", {H}});
    out.push_back({p + "post_attention_layernorm.weight", {H}});
    out.push_back({p + "self_attn.q_proj.weight", {q, H}});
    out.push_back({p + "self_attn.k_proj.weight", {kv, H}});
    out.push_back({p + "self_attn.v_proj.weight", {kv, H}});
    out.push_back({p + "self_attn.o_proj.weight", {H, q}});
    if (c.qkv_bias) {
      out.push_back({p + "self_attn.q_proj.bias", {q}});
      out.push_back({p + "self_attn.k_proj.bias", {kv}});
      out.push_back({p + "self_attn.v_proj.bias", {kv}});
    }
    if (c.o_bias) out.push_back({p + "self_attn.o_proj.bias", {H}});
    if (c.qk_norm) {
      out.push_back({p + "self_attn.q_norm.weight", {D}});
      out.push_back({p + "self_attn.k_norm.weight", {D}});
    }
    out.push_back({p + "mlp.gate_proj.weight", {I, H}});
    out.push_back({p + "mlp.up_proj.weight", {I, H}});
    out.push_back({p + "mlp.down_proj.weight", {H, I}});
    if (c.mlp_bias) {
      out.push_back({p + "mlp.gate_proj.bias", {I}});
      out.push_back({p + "mlp.up_proj.bias", {I}});
      out.push_back({p + "mlp.down_proj.bias", {H}});
    }
  }
  out.push_back({"model.norm.weight", {H}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {V, H}});
  return out;
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  throw Error("unknown dtype '" + name + "' (supported: float32, bfloat16, float16)");
}

at::Device parse_device(const std::string& name) {
  if (name == "cpu") return at::Device(at::kCPU);
  if (name.rfind("cuda", 0) == 0) {
    if (!at::hasCUDA()) throw Error("device '" + name + "' requested but no CUDA device is available");
    const at::Device d(name);
    // A bare "cuda" is the current device (cuda:LOCAL_RANK in a data-parallel job, cli::join_job), made
    // explicit so that generators, guards and checkpoints all name the same GPU.
    return d.has_index() ? d : c10::impl::getDeviceGuardImpl(at::kCUDA)->getDevice();
  }
  throw Error("unknown device '" + name + "' (supported: cpu, cuda, cuda:N)");
}

KVCache::KVCache(const ModelConfig& c, int64_t batch, int64_t capacity, at::ScalarType dtype, at::Device device)
    : KVCache(c, batch, capacity, dtype, Placement::single(device, c.num_hidden_layers)) {}

KVCache::KVCache(const ModelConfig& c, int64_t batch, int64_t capacity, at::ScalarType dtype, const Placement& placement)
    : capacity_(capacity) {
  placement.check(c);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto opts = at::TensorOptions().dtype(dtype).device(placement.layer_devices[l]);
    k_.push_back(at::zeros({batch, c.num_key_value_heads, capacity, c.head_dim}, opts));  // [B, kv, cap, D]
    v_.push_back(at::zeros({batch, c.num_key_value_heads, capacity, c.head_dim}, opts));  // [B, kv, cap, D]
  }
}

Decoder Decoder::load(const fs::path& dir, at::ScalarType dtype, at::Device device) {
  return load(dir, dtype, Placement::single(device, ModelConfig::load(dir).num_hidden_layers));
}

Decoder Decoder::load(const fs::path& dir, at::ScalarType dtype, const Placement& placement) {
  Decoder d;
  d.config_ = ModelConfig::load(dir);
  d.source_ = dir;
  d.dtype_ = dtype;
  const ModelConfig& c = d.config_;
  placement.check(c);
  d.placement_ = placement;
  io::Checkpoint ck = io::Checkpoint::open(dir);

  // 1. Validate everything before converting anything.
  const auto expected = checkpoint_tensor_shapes(c);
  std::set<std::string> used;
  for (const auto& [name, shape] : expected) {
    if (!ck.contains(name))
      throw Error(ck.source().string() + ": missing tensor '" + name + "' (required by " + c.model_type + " config with " +
                  std::to_string(c.num_hidden_layers) + " layers)");
    const io::TensorInfo& info = ck.info(name);
    if (info.dtype != "F32" && info.dtype != "F16" && info.dtype != "BF16")
      throw Error(ck.file_of(name).string() + ": tensor '" + name + "' has unsupported dtype " + info.dtype +
                  " (supported: F32, F16, BF16)");
    if (info.shape != shape)
      throw Error(ck.file_of(name).string() + ": tensor '" + name + "' has shape " + shape_str(info.shape) +
                  ", expected " + shape_str(shape) + " from config.json");
    used.insert(name);
  }
  std::vector<std::string> unused;
  for (const auto& name : ck.names())
    if (!used.count(name) && !(c.tie_word_embeddings && name == "lm_head.weight")) unused.push_back(name);
  if (!unused.empty()) {
    std::string list;
    for (size_t i = 0; i < unused.size() && i < 8; ++i) list += (i ? ", " : "") + unused[i];
    if (unused.size() > 8) list += ", ... (" + std::to_string(unused.size()) + " in all)";
    log::warn(ck.source().string(), ": ignoring ", unused.size(), " tensor(s) the model does not use: ", list);
  }

  // 2. Convert: straight from the mapped file to the compute dtype on the tensor's own device.
  auto get = [&](const std::string& name) {
    return ck.tensor(name).to(at::TensorOptions().dtype(dtype).device(placement.device_of(name)),
                              /*non_blocking=*/false, /*copy=*/true);
  };
  auto get_linear = [&](const std::string& prefix, bool bias) {
    Linear l;
    l.weight = get(prefix + ".weight");
    if (bias) l.bias = get(prefix + ".bias");
    return l;
  };
  d.embed_tokens_ = get("model.embed_tokens.weight");
  d.layers_.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    DecoderLayer& L = d.layers_[i];
    L.input_layernorm.weight = get(p + "input_layernorm.weight");
    L.post_attention_layernorm.weight = get(p + "post_attention_layernorm.weight");
    L.q_proj = get_linear(p + "self_attn.q_proj", c.qkv_bias);
    L.k_proj = get_linear(p + "self_attn.k_proj", c.qkv_bias);
    L.v_proj = get_linear(p + "self_attn.v_proj", c.qkv_bias);
    L.o_proj = get_linear(p + "self_attn.o_proj", c.o_bias);
    if (c.qk_norm) {
      L.q_norm.weight = get(p + "self_attn.q_norm.weight");
      L.k_norm.weight = get(p + "self_attn.k_norm.weight");
    }
    L.gate_proj = get_linear(p + "mlp.gate_proj", c.mlp_bias);
    L.up_proj = get_linear(p + "mlp.up_proj", c.mlp_bias);
    L.down_proj = get_linear(p + "mlp.down_proj", c.mlp_bias);
  }
  d.norm_.weight = get("model.norm.weight");
  if (!c.tie_word_embeddings) d.lm_head_ = get("lm_head.weight");
  // HF keeps inv_freq as a floating buffer, so `model.to(dtype)` rounds it: a checkpoint published in
  // bf16/fp16 and loaded the default way (transformers 5's dtype="auto") runs RoPE with inv_freq
  // rounded to that dtype, even after a later cast to fp32; so does any bf16 compute. Reproduce both.
  at::Tensor inv_freq = rope_inverse_frequencies(c);
  if (c.torch_dtype == "bfloat16" || c.torch_dtype == "float16")
    inv_freq = inv_freq.to(parse_dtype(c.torch_dtype)).to(at::kFloat);
  d.inv_freq_ = inv_freq.to(dtype).to(at::kFloat).to(placement.embed_device);
  d.build_parameter_table();
  return d;
}

Decoder::Decoder(Decoder&& other) noexcept { *this = std::move(other); }

Decoder& Decoder::operator=(Decoder&& other) noexcept {
  config_ = std::move(other.config_);
  source_ = std::move(other.source_);
  dtype_ = other.dtype_;
  placement_ = std::move(other.placement_);
  embed_tokens_ = std::move(other.embed_tokens_);
  lm_head_ = std::move(other.lm_head_);
  norm_ = std::move(other.norm_);
  layers_ = std::move(other.layers_);
  inv_freq_ = std::move(other.inv_freq_);
  build_parameter_table();  // the table points into *this, not into `other`
  other.params_.clear();
  return *this;
}

void Decoder::build_parameter_table() {
  params_.clear();
  params_.push_back({"model.embed_tokens.weight", &embed_tokens_});
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    DecoderLayer& L = layers_[i];
    params_.push_back({p + "input_layernorm.weight", &L.input_layernorm.weight});
    params_.push_back({p + "post_attention_layernorm.weight", &L.post_attention_layernorm.weight});
    for (auto& [name, lin] : std::initializer_list<std::pair<const char*, Linear*>>{
             {"self_attn.q_proj", &L.q_proj}, {"self_attn.k_proj", &L.k_proj}, {"self_attn.v_proj", &L.v_proj},
             {"self_attn.o_proj", &L.o_proj}, {"mlp.gate_proj", &L.gate_proj}, {"mlp.up_proj", &L.up_proj},
             {"mlp.down_proj", &L.down_proj}}) {
      params_.push_back({p + name + ".weight", &lin->weight});
      if (lin->bias.defined()) params_.push_back({p + name + ".bias", &lin->bias});
    }
    if (L.q_norm.weight.defined()) {
      params_.push_back({p + "self_attn.q_norm.weight", &L.q_norm.weight});
      params_.push_back({p + "self_attn.k_norm.weight", &L.k_norm.weight});
    }
  }
  params_.push_back({"model.norm.weight", &norm_.weight});
  if (!config_.tie_word_embeddings) params_.push_back({"lm_head.weight", &lm_head_});
}

std::vector<std::pair<std::string, at::Tensor*>> Decoder::named_parameters() {
  return params_;
}

std::vector<std::pair<std::string, Linear*>> Decoder::named_linears() {
  std::vector<std::pair<std::string, Linear*>> out;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    DecoderLayer& L = layers_[i];
    out.push_back({p + "self_attn.q_proj", &L.q_proj});
    out.push_back({p + "self_attn.k_proj", &L.k_proj});
    out.push_back({p + "self_attn.v_proj", &L.v_proj});
    out.push_back({p + "self_attn.o_proj", &L.o_proj});
    out.push_back({p + "mlp.gate_proj", &L.gate_proj});
    out.push_back({p + "mlp.up_proj", &L.up_proj});
    out.push_back({p + "mlp.down_proj", &L.down_proj});
  }
  return out;
}

at::Tensor Decoder::linear(const at::Tensor& x, const Linear& l, bool training) const {
  at::Tensor y = at::linear(x, l.weight, l.bias.defined() ? std::optional<at::Tensor>(l.bias) : std::nullopt);
  for (const LoraDelta& d : l.lora) {
    at::Tensor xi = (training && d.dropout > 0) ? at::dropout(x, d.dropout, /*train=*/true) : x;
    // Trainable deltas are fp32 masters; compute in the activation dtype (a no-op cast in fp32).
    const at::Tensor xa = at::linear(xi, d.A.to(x.scalar_type()));  // [..., r]
    // y + scale * xa B^T as one GEMM whose epilogue adds y (PEFT's `y + B(A(x)) * scaling` is three
    // passes over [..., out] forward and two backward); y is a fresh contiguous linear output.
    const int64_t out = y.size(-1), r = xa.size(-1);
    y = at::addmm(y.reshape({-1, out}), xa.reshape({-1, r}), d.B.to(x.scalar_type()).t(), /*beta=*/1, /*alpha=*/d.scale)
            .view(y.sizes());
  }
  for (const IndexedDelta& d : l.indexed) {
    const at::Tensor delta = d.delta.to(x.scalar_type());  // fp32 master -> activation dtype (no-op in fp32)
    if (d.columns)
      y = y + at::linear(x.index_select(x.dim() - 1, d.index), delta);  // [..., K] x [out, K]^T -> [..., out]
    else
      y = y.index_add(y.dim() - 1, d.index, at::linear(x, delta).to(y.scalar_type()));  // [..., K] into [..., out]
  }
  return y;
}

void merge_indexed_deltas(Linear& l) {
  at::NoGradGuard no_grad;
  for (const IndexedDelta& d : l.indexed) {
    const at::Tensor index = d.index.to(l.weight.device(), at::kLong);
    const at::Tensor delta = d.delta.detach().to(l.weight.device(), l.weight.scalar_type());
    l.weight.index_add_(d.columns ? 1 : 0, index, delta);  // W[:, index] or W[index, :] += delta
  }
  l.indexed.clear();
}

std::pair<at::Tensor, at::Tensor> Decoder::rope_tables(const at::Tensor& position_ids) const {
  // freqs [B, T, D/2] = positions x inv_freq (fp32, as HF's rotary embedding), emb = cat(freqs, freqs).
  at::Tensor freqs = position_ids.to(at::kFloat).unsqueeze(-1) * inv_freq_.view({1, 1, -1});
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  if (config_.rope.attention_factor != 1.0)  // yarn: HF scales cos and sin (attention_scaling)
    return {emb.cos() * config_.rope.attention_factor, emb.sin() * config_.rope.attention_factor};
  return {emb.cos(), emb.sin()};
}

// ---- activation checkpointing (ForwardOptions::checkpoint_layers) -----------------------------------
// libtorch C++ has no torch.utils.checkpoint; this is its mechanism for one decoder layer, as an
// autograd Node: the layer runs without autograd in the forward pass, the Node keeps the layer input
// (and the layer's trainable tensors, as its other inputs), and its backward recomputes the layer with
// autograd on and backpropagates the incoming gradient through the recomputation
// (torch::autograd::grad with respect to the input and the trainable tensors), returning the results
// along the Node's edges, so that gradients accumulate where they would without checkpointing.
namespace {

using torch::autograd::variable_list;

// Every tensor of a decoder layer that requires grad: the inputs of the layer's checkpoint Node. The
// one list of what a layer computes with (norm weights; per projection: weight, bias, LoRA A / B,
// indexed deltas). A field added to Linear / DecoderLayer that can be trained must be named here; the
// recomputation checks that no trainable tensor outside this list is reached (an Error instead of a
// silently lost gradient).
std::vector<at::Tensor> layer_grad_tensors(const DecoderLayer& L) {
  std::vector<at::Tensor> out;
  auto add = [&](const at::Tensor& t) {
    if (t.defined() && t.requires_grad()) out.push_back(t);
  };
  for (const RMSNorm* n : {&L.input_layernorm, &L.post_attention_layernorm, &L.q_norm, &L.k_norm}) add(n->weight);
  for (const Linear* lin : {&L.q_proj, &L.k_proj, &L.v_proj, &L.o_proj, &L.gate_proj, &L.up_proj, &L.down_proj}) {
    add(lin->weight);
    add(lin->bias);
    for (const LoraDelta& d : lin->lora) {
      add(d.A);
      add(d.B);
    }
    for (const IndexedDelta& d : lin->indexed) add(d.delta);
  }
  return out;
}

// The default generators a recomputation replays (torch.utils.checkpoint's preserve_rng_state): the CPU
// one always, the CUDA one of the layer's device when it runs there.
struct RngState {
  at::Tensor cpu, cuda;
  at::Device device = at::kCPU;

  static std::vector<at::Generator> generators(at::Device device) {
    std::vector<at::Generator> g{at::globalContext().defaultGenerator(at::kCPU)};
    if (device.is_cuda())
      g.push_back(at::globalContext().defaultGenerator(at::Device(at::kCUDA, device.has_index() ? device.index() : 0)));
    return g;
  }
  static RngState capture(at::Device device) {
    RngState s;
    s.device = device;
    auto g = generators(device);
    for (size_t i = 0; i < g.size(); ++i) {
      std::lock_guard<std::mutex> lock(g[i].mutex());
      (i == 0 ? s.cpu : s.cuda) = g[i].get_state();
    }
    return s;
  }
  void restore() const {
    if (!cpu.defined()) return;
    auto g = generators(device);
    for (size_t i = 0; i < g.size(); ++i) {
      std::lock_guard<std::mutex> lock(g[i].mutex());
      g[i].set_state(i == 0 ? cpu : cuda);
    }
  }
};

// The autocast state of the forward pass, which the recomputation must share (the trainer's bf16
// autocast on CUDA is off again when backward runs).
struct AutocastState {
  bool cpu = false, cuda = false;
  at::ScalarType cpu_dtype = at::kBFloat16, cuda_dtype = at::kBFloat16;

  static AutocastState capture() {
    AutocastState s;
    s.cpu = at::autocast::is_autocast_enabled(at::kCPU);
    s.cuda = at::autocast::is_autocast_enabled(at::kCUDA);
    s.cpu_dtype = at::autocast::get_autocast_dtype(at::kCPU);
    s.cuda_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
    return s;
  }
  void apply() const {
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
  }
};

// Runs the recomputation in the forward pass's RNG and autocast state; puts the current ones back after
// (also on an exception), so that the checkpoint leaves the generators exactly where they were.
class ReplayGuard {
 public:
  ReplayGuard(const RngState& rng, const AutocastState& autocast, at::Device device)
      : rng_now_(rng.cpu.defined() ? RngState::capture(device) : RngState{}), autocast_now_(AutocastState::capture()),
        autocast_on_(autocast.cpu || autocast.cuda) {
    rng.restore();
    autocast.apply();
  }
  ~ReplayGuard() {
    rng_now_.restore();
    autocast_now_.apply();
    // Casts cached by the recomputation's autocast are not needed once it is done.
    if (autocast_on_ && !autocast_now_.cpu && !autocast_now_.cuda) at::autocast::clear_cache();
  }
  ReplayGuard(const ReplayGuard&) = delete;
  ReplayGuard& operator=(const ReplayGuard&) = delete;

 private:
  RngState rng_now_;
  AutocastState autocast_now_;
  bool autocast_on_;
};

// Throws when the recomputed layer reached a tensor that requires grad (an AccumulateGrad leaf) other
// than the Node's inputs: its gradient would otherwise be lost.
void check_trainables_are_inputs(const at::Tensor& out, const std::vector<at::Tensor>& inputs, int64_t layer) {
  std::unordered_set<const torch::autograd::Node*> inputs_edges, seen;
  for (const at::Tensor& t : inputs)
    if (t.requires_grad()) inputs_edges.insert(torch::autograd::impl::gradient_edge(t).function.get());
  std::vector<torch::autograd::Node*> unvisited;
  if (out.grad_fn()) unvisited.push_back(out.grad_fn().get());
  while (!unvisited.empty()) {
    torch::autograd::Node* node = unvisited.back();
    unvisited.pop_back();
    for (const torch::autograd::Edge& e : node->next_edges()) {
      torch::autograd::Node* f = e.function.get();
      if (!f || inputs_edges.count(f) || !seen.insert(f).second) continue;
      if (auto* leaf = dynamic_cast<torch::autograd::AccumulateGrad*>(f))
        throw Error("activation checkpointing: decoder layer " + std::to_string(layer) +
                    " computes with a tensor that requires grad (shape " + shape_str(leaf->variable.sizes()) +
                    ") that layer_grad_tensors() in src/model/decoder.cpp does not list; add the field there");
      unvisited.push_back(f);
    }
  }
}

// The backward Node of one checkpointed layer. Inputs (edges): the layer input x, then the layer's
// tensors that require grad, in layer_grad_tensors() order.
class LayerCheckpointBackward final : public torch::autograd::Node {
 public:
  using Recompute = std::function<at::Tensor(const at::Tensor&)>;  // x [B, T, H] -> layer output [B, T, H]

  LayerCheckpointBackward(int64_t layer, Recompute recompute, const at::Tensor& x, const std::vector<at::Tensor>& params,
                          RngState rng, AutocastState autocast, at::Device device)
      : layer_(layer), recompute_(std::move(recompute)), x_(x, /*is_output=*/false), rng_(std::move(rng)),
        autocast_(autocast), device_(device) {
    for (const at::Tensor& p : params) params_.emplace_back(p, /*is_output=*/false);
  }

  std::string name() const override { return "sparsecl::LayerCheckpointBackward"; }

  variable_list apply(variable_list&& grads) override {
    variable_list result(num_outputs());
    if (!recompute_) throw Error("activation checkpointing: layer " + std::to_string(layer_) +
                                 " backpropagated twice (its saved input was released after the first backward)");
    const at::Tensor& grad_out = grads[0];  // [B, T, H]
    if (!grad_out.defined()) return result;  // nothing flows back through this layer
    const at::Tensor x = x_.unpack();
    std::vector<at::Tensor> params;
    for (const auto& p : params_) params.push_back(p.unpack());
    at::Tensor x_in = x.detach().requires_grad_(task_should_compute_output(0));
    at::Tensor out;
    {
      ReplayGuard replay(rng_, autocast_, device_);
      at::AutoGradMode grad_on(true);
      out = recompute_(x_in);
    }
    std::vector<at::Tensor> all = params;
    all.push_back(x_in);
    check_trainables_are_inputs(out, all, layer_);
    std::vector<at::Tensor> wrt;
    std::vector<size_t> slot;
    if (x_in.requires_grad()) {
      wrt.push_back(x_in);
      slot.push_back(0);
    }
    for (size_t i = 0; i < params.size(); ++i) {
      if (!task_should_compute_output(i + 1)) continue;
      wrt.push_back(params[i]);
      slot.push_back(i + 1);
    }
    if (wrt.empty() || !out.requires_grad()) return result;
    const variable_list g = torch::autograd::grad({out}, wrt, {grad_out}, /*retain_graph=*/false,
                                                  /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t k = 0; k < g.size(); ++k) result[slot[k]] = g[k];
    return result;
  }

  void release_variables() override {
    x_.reset_data();
    for (auto& p : params_) p.reset_data();
    recompute_ = nullptr;
  }

 private:
  int64_t layer_;
  Recompute recompute_;
  torch::autograd::SavedVariable x_;
  std::vector<torch::autograd::SavedVariable> params_;
  RngState rng_;
  AutocastState autocast_;
  at::Device device_;
};

// Positions restarting at 0 in every segment: segment_ids [B, T] -> position_ids [B, T] int64.
at::Tensor segment_positions(const at::Tensor& segment_ids) {
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  at::Tensor idx = at::arange(T, segment_ids.options().dtype(at::kLong)).unsqueeze(0).expand({B, T});
  at::Tensor starts = at::ones({B, T}, segment_ids.options().dtype(at::kBool));
  if (T > 1) starts.narrow(1, 1, T - 1).copy_(segment_ids.narrow(1, 1, T - 1) != segment_ids.narrow(1, 0, T - 1));
  at::Tensor start_idx = std::get<0>(at::cummax(at::where(starts, idx, at::zeros_like(idx)), 1));  // [B, T]
  return idx - start_idx;
}

}  // namespace

at::Tensor Decoder::checkpointed_layer_forward(int64_t l, const at::Tensor& x, const LayerContext& ctx) const {
  const std::vector<at::Tensor> params = layer_grad_tensors(layers_[l]);
  // The generator state before the first pass is what the recomputation replays (LoRA dropout masks):
  // the CPU generator and, when the layer runs on a GPU, that GPU's.
  const at::Device device = layer_device(l);
  RngState rng = ctx.training ? RngState::capture(device) : RngState{};
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = layer_forward(l, x, ctx);  // hook and mlp_act see this pass, once
  }
  LayerContext again = ctx;
  again.hook = nullptr;
  again.mlp_act = nullptr;
  again.cache = nullptr;
  // The Decoder must outlive the backward pass (the recomputation runs its layer l).
  auto recompute = [this, l, again](const at::Tensor& xi) { return layer_forward(l, xi, again); };
  std::shared_ptr<LayerCheckpointBackward> node(
      new LayerCheckpointBackward(l, std::move(recompute), x, params, std::move(rng), AutocastState::capture(), device),
      torch::autograd::deleteNode);
  variable_list inputs{x};
  inputs.insert(inputs.end(), params.begin(), params.end());
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  // Even with no input requiring grad the Node stays in the graph, so that its recomputation checks
  // that the layer reaches no trainable tensor outside layer_grad_tensors().
  torch::autograd::create_gradient_edge(out, node);
  return out;
}

at::Tensor Decoder::layer_forward(int64_t l, const at::Tensor& x_in, const LayerContext& ctx) const {
  const ModelConfig& c = config_;
  const DecoderLayer& L = layers_[l];
  const int64_t B = ctx.B, T = ctx.T, past = ctx.past, S = ctx.S;
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, D = c.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const ActivationHook* hook = ctx.hook && *ctx.hook ? ctx.hook : nullptr;

  at::Tensor x = x_in;
  at::Tensor residual = x;
  at::Tensor h = rms_norm(x, L.input_layernorm.weight, c.rms_norm_eps);
  if (hook) (*hook)(HookPoint::AttnInput, l, h);
  at::Tensor q = linear(h, L.q_proj, ctx.training).view({B, T, nh, D});
  at::Tensor k = linear(h, L.k_proj, ctx.training).view({B, T, nkv, D});
  at::Tensor v = linear(h, L.v_proj, ctx.training).view({B, T, nkv, D}).transpose(1, 2);
  if (c.qk_norm) {
    q = rms_norm(q, L.q_norm.weight, c.rms_norm_eps);
    k = rms_norm(k, L.k_norm.weight, c.rms_norm_eps);
  }
  q = q.transpose(1, 2);  // [B, nh, T, D]
  k = k.transpose(1, 2);  // [B, nkv, T, D]
  q = q * ctx.cos + rotate_half(q) * ctx.sin;
  k = k * ctx.cos + rotate_half(k) * ctx.sin;
  if (ctx.cache && ctx.write_index.defined()) {  // static decoding step: write at a device index, read all
    ctx.cache->k_[l].index_copy_(2, ctx.write_index, k);
    ctx.cache->v_[l].index_copy_(2, ctx.write_index, v);
    k = ctx.cache->k_[l];  // [B, nkv, capacity, D]
    v = ctx.cache->v_[l];
  } else if (ctx.cache) {
    ctx.cache->k_[l].narrow(2, past, T).copy_(k);
    ctx.cache->v_[l].narrow(2, past, T).copy_(v);
    k = ctx.cache->k_[l].narrow(2, 0, S);
    v = ctx.cache->v_[l].narrow(2, 0, S);
  }
  const bool windowed = ctx.window_mask && c.is_sliding_layer(l);
  at::Tensor attn = at::scaled_dot_product_attention(q, k, v, windowed ? ctx.window_mask : ctx.mask, 0.0,
                                                     !windowed && ctx.is_causal, scale, /*enable_gqa=*/nkv != nh);
  attn = attn.transpose(1, 2).reshape({B, T, nh * D});
  if (hook) (*hook)(HookPoint::AttnOutput, l, attn);
  x = residual + linear(attn, L.o_proj, ctx.training);

  residual = x;
  h = rms_norm(x, L.post_attention_layernorm.weight, c.rms_norm_eps);
  if (hook) (*hook)(HookPoint::MlpInput, l, h);
  at::Tensor act =
      gated_activation(linear(h, L.gate_proj, ctx.training), linear(h, L.up_proj, ctx.training), c.hidden_act);  // [B, T, I]
  if (hook) (*hook)(HookPoint::MlpIntermediate, l, act);
  if (ctx.mlp_act) ctx.mlp_act->push_back(act);
  x = residual + linear(act, L.down_proj, ctx.training);
  if (hook) (*hook)(HookPoint::Residual, l, x);
  return x;
}

ForwardOutput Decoder::forward(const ForwardInput& in, const ForwardOptions& opt) const {
  const ModelConfig& c = config_;
  if (in.input_ids.dim() != 2) throw Error("input_ids must be [B, T], got " + shape_str(in.input_ids.sizes()));
  const at::Device input_device = device();
  const at::Tensor ids = in.input_ids.to(input_device, at::kLong);
  const int64_t B = ids.size(0), T = ids.size(1);
  const StaticDecodeStep* static_step = opt.static_step;
  if (static_step) {
    if (!opt.cache || T != 1 || !in.position_ids.defined() || in.attention_mask.defined() || in.segment_ids.defined())
      throw Error("a static decoding step needs a KV cache, one token per row, position_ids, and no attention_mask "
                  "or segment_ids");
    if (!static_step->write_index.defined() || static_step->write_index.numel() != 1 || !static_step->attend.defined() ||
        static_step->attend.dim() != 2 || static_step->attend.size(0) != B ||
        static_step->attend.size(1) != opt.cache->capacity_)
      throw Error("a static decoding step needs write_index [1] and attend [B, cache capacity]");
  }
  const int64_t past = opt.cache && !static_step ? opt.cache->length_ : 0;
  const int64_t S = static_step ? opt.cache->capacity_ : past + T;  // keys visible to this call
  if (opt.cache && S > opt.cache->capacity_)
    throw Error("KV cache capacity " + std::to_string(opt.cache->capacity_) + " exceeded (" + std::to_string(S) + ")");
  // Ids coming from the host are range-checked there (a clear error instead of an out-of-bounds
  // gather); ids already on an accelerator (generation feeding back its own argmax) are in range by
  // construction, and checking them would cost a device sync per decoding step.
  if (in.input_ids.device().is_cpu() && ids.numel()) {
    const int64_t max_id = in.input_ids.max().item<int64_t>();
    const int64_t min_id = in.input_ids.min().item<int64_t>();
    if (min_id < 0 || max_id >= c.vocab_size)
      throw Error("input id out of range [0, " + std::to_string(c.vocab_size) + "): min " + std::to_string(min_id) +
                  ", max " + std::to_string(max_id));
  }
  at::Tensor segments;  // [B, T] int64 or undefined
  if (in.segment_ids.defined()) {
    if (in.segment_ids.dim() != 2 || in.segment_ids.size(0) != B || in.segment_ids.size(1) != T)
      throw Error("segment_ids must be [B, T] = [" + std::to_string(B) + ", " + std::to_string(T) + "], got " +
                  shape_str(in.segment_ids.sizes()));
    if (opt.cache) throw Error("segment_ids (packed rows) cannot be combined with a KV cache");
    segments = in.segment_ids.to(input_device, at::kLong);
    if (in.segment_ids.device().is_cpu() && segments.numel() && segments.min().item<int64_t>() < 0)
      throw Error("segment_ids must be >= 0 (0 = padding, 1..n = the example of the row)");
  }
  if (opt.checkpoint_layers && opt.cache) throw Error("checkpoint_layers (activation checkpointing) cannot be combined with a KV cache");

  at::Tensor position_ids = in.position_ids.defined() ? in.position_ids.to(input_device, at::kLong)
                            : segments.defined()      ? segment_positions(segments)
                                                      : at::arange(past, S, at::TensorOptions().dtype(at::kLong).device(input_device))
                                                            .unsqueeze(0)
                                                            .expand({B, T});
  auto [cos, sin] = rope_tables(position_ids);
  LayerContext ctx;
  ctx.B = B;
  ctx.T = T;
  ctx.past = past;
  ctx.S = S;
  ctx.cos = cos.to(dtype_).unsqueeze(1);  // [B, 1, T, D]
  ctx.sin = sin.to(dtype_).unsqueeze(1);
  ctx.training = opt.training;
  ctx.cache = opt.cache;
  ctx.hook = opt.hook;
  if (static_step) ctx.write_index = static_step->write_index;

  // Attention mask: none when nothing is padded or packed and either there is no cache (plain causal)
  // or one new token sees every cached key (a decoding step): SDPA's fast kernels. Otherwise an explicit
  // boolean [B, 1, T, S] mask = causal AND key is a real token AND (packed) key is in the query's segment.
  if (static_step) {
    ctx.mask = static_step->attend.view({B, 1, 1, S});  // every written key of the row, padding excluded
  } else if (!in.attention_mask.defined() && !segments.defined() && (past == 0 || T == 1)) {
    ctx.is_causal = past == 0 && T > 1;
  } else {
    auto lopts = at::TensorOptions().dtype(at::kLong).device(input_device);
    at::Tensor q_pos = at::arange(past, S, lopts).view({T, 1});
    at::Tensor k_pos = at::arange(0, S, lopts).view({1, S});
    at::Tensor m = (k_pos <= q_pos).view({1, 1, T, S});
    if (in.attention_mask.defined()) {
      if (in.attention_mask.dim() != 2 || in.attention_mask.size(0) != B || in.attention_mask.size(1) != S)
        throw Error("attention_mask must be [B, past + T] = [" + std::to_string(B) + ", " + std::to_string(S) +
                    "], got " + shape_str(in.attention_mask.sizes()));
      at::Tensor keys = in.attention_mask.to(input_device).to(at::kBool).view({B, 1, 1, S});
      m = m.logical_and(keys);
    }
    if (segments.defined()) {  // S == T here (no cache)
      at::Tensor same = segments.view({B, 1, T, 1}) == segments.view({B, 1, 1, T});  // [B, 1, T, T]
      m = m.logical_and(same).logical_and((segments != 0).view({B, 1, 1, T}));
    }
    if (in.attention_mask.defined() || segments.defined()) {
      // A query row with no visible key (a padding position) would give NaN: let it see itself.
      at::Tensor empty = m.any(-1, /*keepdim=*/true).logical_not();
      m = m.logical_or(empty.logical_and((k_pos == q_pos).view({1, 1, T, S})));
    }
    ctx.mask = m;
  }
  // Sliding layers (ModelConfig::sliding_window) additionally hide the key slots j <= i - W from the query
  // at slot i (HF's sliding_window_overlay, on slot indices, padding included); nothing to hide while
  // S <= W. A static step's query slot is its write index.
  if (c.sliding_window && S > *c.sliding_window) {
    const int64_t W = *c.sliding_window;
    auto lopts = at::TensorOptions().dtype(at::kLong).device(input_device);
    at::Tensor k_pos = at::arange(0, S, lopts).view({1, S});
    at::Tensor q_pos = static_step ? static_step->write_index.view({1, 1}) : at::arange(past, S, lopts).view({T, 1});
    at::Tensor w = ctx.mask ? *ctx.mask : (k_pos <= q_pos).view({1, 1, T, S});
    w = w.logical_and((k_pos > q_pos - W).view({1, 1, T, S}));
    // A padding query whose window holds only padding would give NaN: let it see itself.
    at::Tensor empty = w.any(-1, /*keepdim=*/true).logical_not();
    ctx.window_mask = w.logical_or(empty.logical_and((k_pos == q_pos).view({1, 1, T, S})));
  }

  ForwardOutput out;
  if (opt.mlp_act) ctx.mlp_act = &out.mlp_act;
  // The per-call tensors on every device a layer runs on, copied there once per call (pipeline placement).
  std::vector<std::pair<at::Device, LayerContext>> contexts;
  contexts.reserve(placement_.layer_devices.size() + 1);  // references into it stay valid
  contexts.emplace_back(input_device, std::move(ctx));
  auto context_for = [&](at::Device target) -> const LayerContext& {
    for (const auto& [dev, layer_ctx] : contexts)
      if (dev == target) return layer_ctx;
    return contexts.emplace_back(target, context_on(contexts.front().second, target)).second;
  };
  at::Tensor x = at::embedding(embed_tokens_, ids);  // [B, T, H] on the input device
  if (opt.hidden_states) out.hidden_states.push_back(x);
  const bool checkpoint = opt.checkpoint_layers && at::GradMode::is_enabled();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const at::Device dev = layer_device(l);
    const LayerContext& layer_ctx = context_for(dev);
    x = x.to(dev);  // a no-op within a run of layers on one device
    const bool recompute = checkpoint && (opt.checkpoint_layer_count < 0 || l < opt.checkpoint_layer_count);
    x = recompute ? checkpointed_layer_forward(l, x, layer_ctx) : layer_forward(l, x, layer_ctx);  // [B, T, H]
    if (opt.hidden_states && l + 1 < c.num_hidden_layers) out.hidden_states.push_back(x);
  }
  if (opt.cache && !static_step) opt.cache->length_ = S;
  x = rms_norm(x.to(output_device()), norm_.weight, c.rms_norm_eps);  // [B, T, H] on the head device
  out.last_hidden = x;
  if (opt.hidden_states) out.hidden_states.push_back(x);
  if (opt.logits) {
    const int64_t keep = opt.logits_to_keep > 0 ? std::min(opt.logits_to_keep, T) : T;
    out.logits = at::linear(x.narrow(1, T - keep, keep), head_weight());  // [B, keep, V]
  }
  return out;
}

Decoder::LayerContext Decoder::context_on(const LayerContext& ctx, at::Device device) {
  LayerContext moved = ctx;
  moved.cos = ctx.cos.to(device);  // [B, 1, T, D]
  moved.sin = ctx.sin.to(device);
  if (ctx.mask) moved.mask = ctx.mask->to(device);  // [B or 1, 1, T, S]
  if (ctx.window_mask) moved.window_mask = ctx.window_mask->to(device);
  if (ctx.write_index.defined()) moved.write_index = ctx.write_index.to(device);  // [1]
  return moved;
}

HookPoint input_hook_point(const std::string& proj) {
  if (proj == "q_proj" || proj == "k_proj" || proj == "v_proj") return HookPoint::AttnInput;
  if (proj == "o_proj") return HookPoint::AttnOutput;
  if (proj == "gate_proj" || proj == "up_proj") return HookPoint::MlpInput;
  if (proj == "down_proj") return HookPoint::MlpIntermediate;
  throw Error("no hook point for projection '" + proj + "' (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj)");
}

at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels) {
  const int64_t V = logits.size(-1);
  at::Tensor shift_logits = logits.narrow(1, 0, logits.size(1) - 1).to(at::kFloat).reshape({-1, V});
  at::Tensor shift_labels = labels.to(logits.device()).narrow(1, 1, labels.size(1) - 1).reshape({-1});
  return at::cross_entropy_loss(shift_logits, shift_labels, /*weight=*/{}, at::Reduction::Mean, /*ignore_index=*/-100);
}

}  // namespace sparsecl::model

// ---- random weights for shape benchmarks (Decoder::random) ------------------------------------------
namespace sparsecl::model {

Decoder Decoder::random(const ModelConfig& config, at::ScalarType dtype, at::Device device, uint64_t seed) {
  return random(config, dtype, Placement::single(device, config.num_hidden_layers), seed);
}

Decoder Decoder::random(const ModelConfig& config, at::ScalarType dtype, const Placement& placement, uint64_t seed) {
  placement.check(config);
  Decoder d;
  d.config_ = config;
  d.source_ = "random:seed=" + std::to_string(seed);
  d.dtype_ = dtype;
  d.placement_ = placement;
  const ModelConfig& c = d.config_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim, V = c.vocab_size;
  const int64_t q = c.num_attention_heads * D, kv = c.num_key_value_heads * D;
  const at::Device draw_device = placement.embed_device;
  // A private generator of the embedding device's kind (the default one's type, reseeded): the global
  // generators are left as they were. Draws happen in the checkpoint's tensor order (norms and biases
  // draw nothing), all on the embedding device, so that a placement changes where the weights live but
  // not their values; each tensor then moves to its own device at once.
  at::Generator gen = [&] {
    at::Generator global = at::globalContext().defaultGenerator(draw_device);
    std::lock_guard<std::mutex> lock(global.mutex());
    at::Generator g = global.clone();
    g.set_current_seed(seed);
    return g;
  }();
  auto opts_on = [&](at::Device device) { return at::TensorOptions().dtype(dtype).device(device); };
  auto normal = [&](at::IntArrayRef shape, at::Device device) {
    return at::empty(shape, opts_on(draw_device)).normal_(0.0, 0.02, gen).to(device);
  };
  auto ones = [&](int64_t n, at::Device device) { return at::ones({n}, opts_on(device)); };
  auto linear = [&](int64_t out, int64_t in, bool bias, at::Device device) {
    Linear l;
    l.weight = normal({out, in}, device);  // [out, in]
    if (bias) l.bias = at::zeros({out}, opts_on(device));
    return l;
  };
  d.embed_tokens_ = normal({V, H}, placement.embed_device);  // [V, H]
  d.layers_.resize(c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    DecoderLayer& L = d.layers_[l];
    const at::Device dev = placement.layer_devices[l];
    L.input_layernorm.weight = ones(H, dev);
    L.post_attention_layernorm.weight = ones(H, dev);
    L.q_proj = linear(q, H, c.qkv_bias, dev);
    L.k_proj = linear(kv, H, c.qkv_bias, dev);
    L.v_proj = linear(kv, H, c.qkv_bias, dev);
    L.o_proj = linear(H, q, c.o_bias, dev);
    if (c.qk_norm) {
      L.q_norm.weight = ones(D, dev);
      L.k_norm.weight = ones(D, dev);
    }
    L.gate_proj = linear(I, H, c.mlp_bias, dev);
    L.up_proj = linear(I, H, c.mlp_bias, dev);
    L.down_proj = linear(H, I, c.mlp_bias, dev);
  }
  d.norm_.weight = ones(H, placement.head_device);
  if (!c.tie_word_embeddings) d.lm_head_ = normal({V, H}, placement.head_device);  // [V, H]
  // RoPE frequencies exactly as load() derives them (rounded like HF when the config says bf16/fp16).
  at::Tensor inv_freq = rope_inverse_frequencies(c);
  if (c.torch_dtype == "bfloat16" || c.torch_dtype == "float16")
    inv_freq = inv_freq.to(parse_dtype(c.torch_dtype)).to(at::kFloat);
  d.inv_freq_ = inv_freq.to(dtype).to(at::kFloat).to(draw_device);
  d.build_parameter_table();
  return d;
}

}  // namespace sparsecl::model
