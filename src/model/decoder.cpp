// The decoder: loading from HF checkpoints with full validation, and the forward pass (embeddings,
// RMSNorm, RoPE incl. llama3 scaling, GQA attention through SDPA with an optional KV cache, SwiGLU MLP,
// LM head). Mirrors transformers' modeling_llama / qwen2 / qwen3 / mistral numerics.
#include "sparsecl/model/decoder.h"


#include <cmath>
#include <numbers>
#include <set>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/io/safetensors.h"

namespace sparsecl::model {
namespace fs = std::filesystem;

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// HF LlamaRMSNorm: normalise in fp32, cast back, then scale by the weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(x.scalar_type());
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

at::Tensor activation(const at::Tensor& x, const std::string& act) {
  if (act == "silu") return at::silu(x);
  if (act == "gelu") return at::gelu(x);
  return at::gelu(x, "tanh");  // gelu_pytorch_tanh (validated in ModelConfig)
}

// Expected tensors of the checkpoint: HF name -> shape. Built from the config alone.
std::vector<std::pair<std::string, std::vector<int64_t>>> expected_tensors(const ModelConfig& c) {
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

}  // namespace

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
    return at::Device(name);
  }
  throw Error("unknown device '" + name + "' (supported: cpu, cuda, cuda:N)");
}

KVCache::KVCache(const ModelConfig& c, int64_t batch, int64_t capacity, at::ScalarType dtype, at::Device device)
    : capacity_(capacity) {
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    k_.push_back(at::zeros({batch, c.num_key_value_heads, capacity, c.head_dim}, opts));
    v_.push_back(at::zeros({batch, c.num_key_value_heads, capacity, c.head_dim}, opts));
  }
}

Decoder Decoder::load(const fs::path& dir, at::ScalarType dtype, at::Device device) {
  Decoder d;
  d.config_ = ModelConfig::load(dir);
  d.source_ = dir;
  d.dtype_ = dtype;
  d.device_ = device;
  const ModelConfig& c = d.config_;
  io::Checkpoint ck = io::Checkpoint::open(dir);

  // 1. Validate everything before converting anything.
  const auto expected = expected_tensors(c);
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

  // 2. Convert: straight from the mapped file to the compute dtype on the device.
  auto get = [&](const std::string& name) {
    return ck.tensor(name).to(at::TensorOptions().dtype(dtype).device(device), /*non_blocking=*/false, /*copy=*/true);
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
  d.inv_freq_ = inv_freq.to(dtype).to(at::kFloat).to(device);
  d.build_parameter_table();
  return d;
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
    y = y + at::linear(at::linear(xi, d.A.to(x.scalar_type())), d.B.to(x.scalar_type())) * d.scale;
  }
  return y;
}

std::pair<at::Tensor, at::Tensor> Decoder::rope_tables(const at::Tensor& position_ids) const {
  // freqs [B, T, D/2] = positions x inv_freq (fp32, as HF's rotary embedding), emb = cat(freqs, freqs).
  at::Tensor freqs = position_ids.to(at::kFloat).unsqueeze(-1) * inv_freq_.view({1, 1, -1});
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {emb.cos(), emb.sin()};
}

ForwardOutput Decoder::forward(const ForwardInput& in, const ForwardOptions& opt) const {
  const ModelConfig& c = config_;
  if (in.input_ids.dim() != 2) throw Error("input_ids must be [B, T], got " + shape_str(in.input_ids.sizes()));
  const at::Tensor ids = in.input_ids.to(device_, at::kLong);
  const int64_t B = ids.size(0), T = ids.size(1);
  const int64_t past = opt.cache ? opt.cache->length_ : 0;
  const int64_t S = past + T;  // keys visible to this call
  if (opt.cache && S > opt.cache->capacity_)
    throw Error("KV cache capacity " + std::to_string(opt.cache->capacity_) + " exceeded (" + std::to_string(S) + ")");
  if (c.sliding_window && S > *c.sliding_window)
    throw Error("sequence length " + std::to_string(S) + " exceeds the model's sliding_window (" +
                std::to_string(*c.sliding_window) + "), which sparsecl does not implement");
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

  at::Tensor position_ids = in.position_ids.defined()
                                ? in.position_ids.to(device_, at::kLong)
                                : at::arange(past, S, at::TensorOptions().dtype(at::kLong).device(device_)).unsqueeze(0).expand({B, T});
  auto [cos, sin] = rope_tables(position_ids);
  cos = cos.to(dtype_).unsqueeze(1);  // [B, 1, T, D]
  sin = sin.to(dtype_).unsqueeze(1);

  // Attention mask: plain causal when nothing is padded and there is no cache (SDPA's fast path);
  // otherwise an explicit boolean [B, 1, T, S] mask = causal AND key is a real token.
  std::optional<at::Tensor> mask;
  bool is_causal = false;
  if (!in.attention_mask.defined() && past == 0) {
    is_causal = T > 1;
  } else {
    auto lopts = at::TensorOptions().dtype(at::kLong).device(device_);
    at::Tensor q_pos = at::arange(past, S, lopts).view({T, 1});
    at::Tensor k_pos = at::arange(0, S, lopts).view({1, S});
    at::Tensor m = (k_pos <= q_pos).view({1, 1, T, S});
    if (in.attention_mask.defined()) {
      if (in.attention_mask.dim() != 2 || in.attention_mask.size(0) != B || in.attention_mask.size(1) != S)
        throw Error("attention_mask must be [B, past + T] = [" + std::to_string(B) + ", " + std::to_string(S) +
                    "], got " + shape_str(in.attention_mask.sizes()));
      at::Tensor keys = in.attention_mask.to(device_).to(at::kBool).view({B, 1, 1, S});
      m = m.logical_and(keys);
      // A query row with no visible key (a fully padded row) would give NaN: let it see itself.
      at::Tensor empty = m.any(-1, /*keepdim=*/true).logical_not();
      m = m.logical_or(empty.logical_and((k_pos == q_pos).view({1, 1, T, S})));
    }
    mask = m;
  }

  ForwardOutput out;
  at::Tensor x = at::embedding(embed_tokens_, ids);  // [B, T, H]
  if (opt.hidden_states) out.hidden_states.push_back(x);
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, D = c.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const DecoderLayer& L = layers_[l];
    at::Tensor residual = x;
    at::Tensor h = rms_norm(x, L.input_layernorm.weight, c.rms_norm_eps);
    if (opt.hook && *opt.hook) (*opt.hook)(HookPoint::AttnInput, l, h);
    at::Tensor q = linear(h, L.q_proj, opt.training).view({B, T, nh, D});
    at::Tensor k = linear(h, L.k_proj, opt.training).view({B, T, nkv, D});
    at::Tensor v = linear(h, L.v_proj, opt.training).view({B, T, nkv, D}).transpose(1, 2);
    if (c.qk_norm) {
      q = rms_norm(q, L.q_norm.weight, c.rms_norm_eps);
      k = rms_norm(k, L.k_norm.weight, c.rms_norm_eps);
    }
    q = q.transpose(1, 2);  // [B, nh, T, D]
    k = k.transpose(1, 2);  // [B, nkv, T, D]
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    if (opt.cache) {
      opt.cache->k_[l].narrow(2, past, T).copy_(k);
      opt.cache->v_[l].narrow(2, past, T).copy_(v);
      k = opt.cache->k_[l].narrow(2, 0, S);
      v = opt.cache->v_[l].narrow(2, 0, S);
    }
    at::Tensor attn = at::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, /*enable_gqa=*/nkv != nh);
    attn = attn.transpose(1, 2).reshape({B, T, nh * D});
    if (opt.hook && *opt.hook) (*opt.hook)(HookPoint::AttnOutput, l, attn);
    x = residual + linear(attn, L.o_proj, opt.training);

    residual = x;
    h = rms_norm(x, L.post_attention_layernorm.weight, c.rms_norm_eps);
    if (opt.hook && *opt.hook) (*opt.hook)(HookPoint::MlpInput, l, h);
    at::Tensor act = activation(linear(h, L.gate_proj, opt.training), c.hidden_act) * linear(h, L.up_proj, opt.training);
    if (opt.hook && *opt.hook) (*opt.hook)(HookPoint::MlpIntermediate, l, act);
    if (opt.mlp_act) out.mlp_act.push_back(act);
    x = residual + linear(act, L.down_proj, opt.training);
    if (opt.hook && *opt.hook) (*opt.hook)(HookPoint::Residual, l, x);
    if (opt.hidden_states && l + 1 < c.num_hidden_layers) out.hidden_states.push_back(x);
  }
  if (opt.cache) opt.cache->length_ = S;
  x = rms_norm(x, norm_.weight, c.rms_norm_eps);
  out.last_hidden = x;
  if (opt.hidden_states) out.hidden_states.push_back(x);
  if (opt.logits) out.logits = at::linear(x, config_.tie_word_embeddings ? embed_tokens_ : lm_head_);
  return out;
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
