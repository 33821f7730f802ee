// The `mask` fine-tuning method (mask.h, docs/train.md "mask"): the stage's neurons are chosen with the
// probe's own collection and ranking (probe::collect_domain_stats -> DomainStats::score ->
// probe::top_set), the update lives in compact model::IndexedDelta tensors attached to the Linears, and
// the stage's product is those deltas + their indices (mask_deltas.safetensors) and the selection
// (mask.json), which later stages read for mask.exclude_previous.
#include "sparsecl/train/mask.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/options.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/io/provenance.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/decoder.h"

namespace sparsecl::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kDeltasFile = "mask_deltas.safetensors";  // the stage's product: indices + deltas
constexpr const char* kOutputJson = "mask.json";                 // the stage's selection (+ provenance)
constexpr const char* kStateJson = "mask_selection.json";        // the selection inside a checkpoint

std::vector<int64_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

at::Tensor from_vector(const std::vector<int64_t>& v) {
  return at::tensor(at::ArrayRef<int64_t>(v), at::TensorOptions().dtype(at::kLong)).clone();  // [n] CPU
}

// The rows of q_proj (= columns of o_proj) of the given heads: h*D .. h*D + D-1 each, ascending.
at::Tensor head_rows(const at::Tensor& heads, int64_t head_dim) {
  return (heads.to(at::kLong).unsqueeze(1) * head_dim + at::arange(head_dim, at::kLong).unsqueeze(0)).reshape({-1});
}

// The K entries with the largest score (probe::top_set: ties -> lower index; ascending) among those not
// `excluded` ([n] bool CPU, or undefined: none excluded).
at::Tensor top_allowed(const at::Tensor& score, int64_t K, const at::Tensor& excluded, const std::string& what) {
  const at::Tensor s = score.to(at::kCPU, at::kFloat);  // [n]
  if (!excluded.defined()) return probe::top_set(s, K).to(at::kCPU);
  const at::Tensor allowed = excluded.logical_not().nonzero().reshape({-1});  // [A] ascending
  if (allowed.numel() < K)
    throw Error("mask.exclude_previous: " + what + " has only " + std::to_string(allowed.numel()) +
                " entries left that earlier stages did not choose, but this stage needs " + std::to_string(K) +
                " (lower mask.ratio / mask.head_ratio or turn mask.exclude_previous off)");
  // top_set over the allowed entries returns ascending positions into `allowed`, itself ascending.
  return allowed.index_select(0, probe::top_set(s.index_select(0, allowed), K).to(at::kCPU));
}

std::map<std::string, model::Linear*> linears_by_name(model::Decoder& decoder) {
  std::map<std::string, model::Linear*> m;
  for (auto& [name, lin] : decoder.named_linears()) m[name] = lin;
  return m;
}

std::string layer_prefix(int64_t l) { return "model.layers." + std::to_string(l) + "."; }

}  // namespace

// ---- options and selection ---------------------------------------------------------------------------

MaskOptions MaskOptions::from_config(const config::Config& cfg) {
  MaskOptions o;
  o.ratio = cfg.get<double>("mask.ratio");
  o.exclude_previous = cfg.get<bool>("mask.exclude_previous");
  o.heads = cfg.get<bool>("mask.heads");
  o.head_ratio = cfg.get<double>("mask.head_ratio");
  o.probe = probe::Settings::from_config(cfg);
  o.probe.top_ratio = o.ratio;  // the per-token top-k of the freq score uses the same ratio
  o.probe.permutations = 0;     // a selection needs neither nulls, nor token pairs, nor gradients
  o.probe.token_pairs = 0;
  o.probe.gradient_overlap = false;
  return o;
}

json MaskSelection::to_json() const {
  json layers = json::array();
  for (size_t l = 0; l < neurons.size(); ++l) {
    json e = {{"layer", l}, {"k", neurons[l].numel()}, {"neurons", to_vector(neurons[l])}};
    if (l < heads.size() && heads[l].defined()) e["heads"] = to_vector(heads[l]);
    layers.push_back(std::move(e));
  }
  return {{"layers", layers}};
}

MaskSelection MaskSelection::from_json(const json& j, const std::string& source) {
  MaskSelection s;
  if (!j.is_object() || !j.contains("layers") || !j["layers"].is_array())
    throw Error(source + ": no \"layers\" array (not a mask selection)");
  try {
    const auto& layers = j["layers"];
    for (size_t l = 0; l < layers.size(); ++l) {
      const auto& e = layers[l];
      if (e.at("layer").get<int64_t>() != static_cast<int64_t>(l))
        throw Error(source + ": layers[" + std::to_string(l) + "] has \"layer\" " + e.at("layer").dump());
      s.neurons.push_back(from_vector(e.at("neurons").get<std::vector<int64_t>>()));
      if (e.contains("heads")) s.heads.push_back(from_vector(e.at("heads").get<std::vector<int64_t>>()));
    }
  } catch (const json::exception& e) {
    throw Error(source + ": malformed mask selection (" + e.what() + ")");
  }
  if (!s.heads.empty() && s.heads.size() != s.neurons.size())
    throw Error(source + ": \"heads\" given for some layers only");
  return s;
}

std::vector<data::Example> mask_probe_examples(const std::vector<data::Example>& examples,
                                               const probe::Settings& settings, uint64_t seed) {
  const int64_t n = static_cast<int64_t>(examples.size());
  std::vector<data::Example> out;
  if (settings.max_samples > 0 && n > settings.max_samples) {
    const std::vector<int64_t> order = data::seeded_permutation(n, probe::derive_seed(seed, "mask/probe"));
    for (int64_t i = 0; i < settings.max_samples; ++i) out.push_back(examples[static_cast<size_t>(order[i])]);
  } else {
    out = examples;
  }
  if (settings.max_length > 0)
    for (auto& e : out)
      if (static_cast<int64_t>(e.ids.size()) > settings.max_length) {
        e.ids.resize(static_cast<size_t>(settings.max_length));
        e.loss_mask.resize(static_cast<size_t>(settings.max_length));
        e.truncated = true;
      }
  return out;
}

std::vector<at::Tensor> attention_head_norms(const model::Decoder& decoder, const std::vector<data::Example>& examples,
                                             int64_t batch_size, int64_t pad_id) {
  const auto& c = decoder.config();
  const int64_t L = c.num_hidden_layers, nh = c.num_attention_heads, D = c.head_dim;
  if (examples.empty()) throw Error("mask: no examples to rank the attention heads on");
  if (batch_size < 1) throw Error("mask: probe.batch_size must be >= 1");
  std::vector<at::Tensor> sums;
  for (int64_t l = 0; l < L; ++l)  // each on its layer's device (pipeline placement)
    sums.push_back(at::zeros({nh}, at::TensorOptions().dtype(at::kDouble).device(decoder.layer_device(l))));
  int64_t tokens = 0;
  at::NoGradGuard no_grad;
  for (size_t start = 0; start < examples.size(); start += static_cast<size_t>(batch_size)) {
    if (!dist::owns(static_cast<int64_t>(start) / batch_size)) continue;  // data parallel: batches round-robin
    const size_t end = std::min(examples.size(), start + static_cast<size_t>(batch_size));
    const data::Batch batch = data::make_batch(examples, start, end, pad_id);
    const int64_t B = batch.input_ids.size(0), T = batch.input_ids.size(1);
    std::vector<int64_t> real;  // flat positions b*T + t of the real tokens
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < batch.lengths[b]; ++t) real.push_back(b * T + t);
    const at::Tensor real_idx = from_vector(real).to(decoder.device());  // [N]
    model::ActivationHook hook = [&](model::HookPoint point, int64_t l, const at::Tensor& live) {
      if (point != model::HookPoint::AttnOutput) return;
      const at::Tensor heads = live.detach().reshape({B * T, nh, D}).index_select(0, real_idx.to(live.device()));  // [N, nh, D]
      sums[l] += at::linalg_vector_norm(heads.to(at::kFloat), 2, {-1}).sum(0).to(at::kDouble);  // [nh]
    };
    model::ForwardInput in;
    in.input_ids = batch.input_ids.to(decoder.device());  // [B, T]
    if (batch.num_tokens != B * T) in.attention_mask = batch.attention_mask.to(decoder.device());  // [B, T]
    model::ForwardOptions opt;
    opt.logits = false;
    opt.hook = &hook;
    decoder.forward(in, opt);
    tokens += batch.num_tokens;
  }
  dist::all_reduce_sum(sums);  // sums and counts over the ranks' batches
  tokens = dist::sum(tokens);
  std::vector<at::Tensor> out;
  for (auto& s : sums) out.push_back((s / static_cast<double>(std::max<int64_t>(tokens, 1))).to(at::kCPU, at::kFloat));
  return out;
}

// ---- the method ----------------------------------------------------------------------------------------

MaskMethod::MaskMethod(MaskOptions options, StageContext context)
    : options_(std::move(options)), context_(std::move(context)) {
  if (!(options_.ratio > 0 && options_.ratio <= 1))
    throw Error("mask.ratio must be in (0, 1], got " + std::to_string(options_.ratio));
  if (options_.heads && !(options_.head_ratio > 0 && options_.head_ratio <= 1))
    throw Error("mask.head_ratio must be in (0, 1], got " + std::to_string(options_.head_ratio));
  if (options_.probe.batch_size < 1) throw Error("probe.batch_size must be >= 1");
}

NamedTensors MaskMethod::setup(model::Decoder& decoder) {
  const auto& c = decoder.config();
  const int64_t L = c.num_hidden_layers, H = c.hidden_size, I = c.intermediate_size;
  const int64_t K = probe::top_count(options_.ratio, I);
  const int64_t Kh = probe::top_count(options_.head_ratio, c.num_attention_heads);
  head_dim_ = c.head_dim;
  const int64_t q_rows = options_.heads ? Kh * c.head_dim : 0;
  const auto leaf = [&](int64_t layer, std::vector<int64_t> shape) {  // on the layer's device
    return at::zeros(shape, at::TensorOptions().dtype(at::kFloat).device(decoder.layer_device(layer))).requires_grad_(true);
  };
  targets_.clear();
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = layer_prefix(l);
    if (options_.heads) {
      // GQA: k_proj / v_proj rows serve a group of query heads, so they stay frozen (see docs/train.md).
      targets_.push_back({p + "self_attn.q_proj", l, true, false, leaf(l, {q_rows, H})});   // [Kh*D, H]
      targets_.push_back({p + "self_attn.o_proj", l, true, true, leaf(l, {H, q_rows})});    // [H, Kh*D]
    }
    targets_.push_back({p + "mlp.gate_proj", l, false, false, leaf(l, {K, H})});  // [K, H]
    targets_.push_back({p + "mlp.up_proj", l, false, false, leaf(l, {K, H})});    // [K, H]
    targets_.push_back({p + "mlp.down_proj", l, false, true, leaf(l, {H, K})});   // [H, K]
  }
  NamedTensors params;
  for (auto& t : targets_) params.push_back({t.module + ".delta", &t.delta});
  return params;
}

void MaskMethod::select(model::Decoder& decoder) {
  const auto& c = decoder.config();
  const int64_t L = c.num_hidden_layers, I = c.intermediate_size, nh = c.num_attention_heads;
  const int64_t K = probe::top_count(options_.ratio, I), Kh = probe::top_count(options_.head_ratio, nh);
  if (!context_.examples || context_.examples->empty())
    throw Error("mask: selecting the stage's neurons needs its training examples (StageContext::examples)");
  const std::string stage = context_.stage.empty() ? "mask" : context_.stage;

  // Earlier stages' choices (mask.exclude_previous): their mask.json files.
  std::vector<at::Tensor> excluded_neurons(L), excluded_heads(L);
  if (options_.exclude_previous) {
    for (const auto& dir : context_.previous) {
      const fs::path file = dir / kOutputJson;
      if (!fs::exists(file))
        throw Error(file.string() + ": missing; mask.exclude_previous needs every earlier stage's mask selection");
      const MaskSelection prev = MaskSelection::from_json(read_json_file(file, "mask selection"), file.string());
      if (static_cast<int64_t>(prev.neurons.size()) != L)
        throw Error(file.string() + ": selection of " + std::to_string(prev.neurons.size()) + " layers, the model has " +
                    std::to_string(L));
      for (int64_t l = 0; l < L; ++l) {
        if (!excluded_neurons[l].defined()) excluded_neurons[l] = at::zeros({I}, at::kBool);
        if (prev.neurons[l].numel() && (prev.neurons[l].min().item<int64_t>() < 0 || prev.neurons[l].max().item<int64_t>() >= I))
          throw Error(file.string() + ": layer " + std::to_string(l) + " names a neuron outside [0, " + std::to_string(I) + ")");
        excluded_neurons[l].index_fill_(0, prev.neurons[l], true);
        if (options_.heads && !prev.heads.empty()) {
          if (!excluded_heads[l].defined()) excluded_heads[l] = at::zeros({nh}, at::kBool);
          if (prev.heads[l].numel() && (prev.heads[l].min().item<int64_t>() < 0 || prev.heads[l].max().item<int64_t>() >= nh))
            throw Error(file.string() + ": layer " + std::to_string(l) + " names a head outside [0, " + std::to_string(nh) + ")");
          excluded_heads[l].index_fill_(0, prev.heads[l], true);
        }
      }
    }
  }

  const std::vector<data::Example> examples = mask_probe_examples(*context_.examples, options_.probe, context_.seed);
  log::info("mask: probing ", examples.size(), " examples of stage '", stage, "' to choose ", K, " of ", I,
            " neurons per layer by ", probe::score_name(options_.probe.score),
            options_.exclude_previous ? " (excluding earlier stages' neurons)" : "");
  const probe::DomainStats stats = probe::collect_domain_stats(decoder, examples, stage, options_.probe, context_.pad_id,
                                                               probe::derive_seed(context_.seed, "mask/collect"));
  MaskSelection sel;
  for (int64_t l = 0; l < L; ++l)
    sel.neurons.push_back(
        top_allowed(stats.score(l, options_.probe.score), K, excluded_neurons[l], "layer " + std::to_string(l) + "'s MLP"));
  if (options_.heads) {
    const auto norms = attention_head_norms(decoder, examples, options_.probe.batch_size, context_.pad_id);
    for (int64_t l = 0; l < L; ++l)
      sel.heads.push_back(top_allowed(norms[l], Kh, excluded_heads[l], "layer " + std::to_string(l) + "'s attention"));
  }
  selection_ = std::move(sel);
  probe_examples_ = stats.num_sequences;
  probe_tokens_ = stats.num_tokens;
  selected_ = probed_ = true;
}

at::Tensor MaskMethod::target_index(const Target& t) const {
  return t.heads ? head_rows(selection_.heads.at(t.layer), head_dim_) : selection_.neurons.at(t.layer);
}

void MaskMethod::before_training(model::Decoder& decoder) {
  if (targets_.empty()) throw Error("mask: before_training() before setup()");
  if (!selected_) select(decoder);
  const auto& c = decoder.config();
  const int64_t L = c.num_hidden_layers;
  const int64_t K = probe::top_count(options_.ratio, c.intermediate_size);
  const int64_t Kh = probe::top_count(options_.head_ratio, c.num_attention_heads);
  if (static_cast<int64_t>(selection_.neurons.size()) != L || (options_.heads && static_cast<int64_t>(selection_.heads.size()) != L))
    throw Error("mask: the selection covers " + std::to_string(selection_.neurons.size()) + " layers, the model has " +
                std::to_string(L));
  for (int64_t l = 0; l < L; ++l) {
    if (selection_.neurons[l].numel() != K)
      throw Error("mask: layer " + std::to_string(l) + " selects " + std::to_string(selection_.neurons[l].numel()) +
                  " neurons, mask.ratio gives " + std::to_string(K));
    if (options_.heads && selection_.heads[l].numel() != Kh)
      throw Error("mask: layer " + std::to_string(l) + " selects " + std::to_string(selection_.heads[l].numel()) +
                  " heads, mask.head_ratio gives " + std::to_string(Kh));
  }
  auto linears = linears_by_name(decoder);
  for (const Target& t : targets_) {
    model::Linear* lin = linears.at(t.module);
    // The Linear holds another handle of the same leaf: the trainer's updates and gradients are shared.
    lin->indexed.push_back({target_index(t).to(lin->weight.device()), t.delta, t.columns});
  }
  int64_t numel = 0;
  for (const Target& t : targets_) numel += t.delta.numel();
  log::info("mask: training ", K, " neurons", options_.heads ? " and " + std::to_string(Kh) + " heads" : std::string(),
            " per layer (", numel, " delta parameters)");
}

json MaskMethod::output_json() const {
  json j = selection_.to_json();
  j["method"] = "mask";
  j["stage"] = context_.stage;
  j["ratio"] = options_.ratio;
  j["score"] = probe::score_name(options_.probe.score);
  j["heads"] = options_.heads;
  if (options_.heads) {
    j["head_ratio"] = options_.head_ratio;
    j["head_dim"] = head_dim_;
    j["head_score"] = "mean over real tokens of the L2 norm of the head's slice of the o_proj input";
  }
  j["exclude_previous"] = options_.exclude_previous;
  json prev = json::array();
  for (const auto& p : context_.previous) prev.push_back(p.string());
  if (options_.exclude_previous) j["excluded_stages"] = prev;
  j["probe"] = {{"examples", probe_examples_}, {"tokens", probe_tokens_}, {"settings", options_.probe.to_json()}};
  json modules = json::object();
  for (const Target& t : targets_)
    modules[t.module] = {{"kind", t.columns ? "columns" : "rows"},
                         {"k", t.heads ? selection_.heads.at(t.layer).numel() * head_dim_ : selection_.neurons.at(t.layer).numel()},
                         {"by", t.heads ? "heads" : "neurons"}};
  j["modules"] = modules;
  j["versions"] = io::software_versions();
  return j;
}

void MaskMethod::save_state(const fs::path& dir) const {
  if (!selected_) throw Error("mask: no selection to checkpoint");
  write_file_atomic(dir / kStateJson, output_json().dump(2) + "\n");
}

void MaskMethod::load_state(const fs::path& dir) {
  const fs::path file = dir / kStateJson;
  const json j = read_json_file(file, "mask checkpoint state");
  selection_ = MaskSelection::from_json(j, file.string());
  if (options_.heads && selection_.heads.empty()) throw Error(file.string() + ": no head selection, but mask.heads is on");
  if (j.contains("probe") && j["probe"].is_object()) {
    probe_examples_ = j["probe"].value("examples", int64_t{0});
    probe_tokens_ = j["probe"].value("tokens", int64_t{0});
  }
  selected_ = true;
}

void MaskMethod::save_output(model::Decoder& /*decoder*/, const fs::path& dir) const {
  if (!selected_) throw Error("mask: save_output() without a selection");
  fs::create_directories(dir);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const Target& t : targets_) {
    tensors.push_back({t.module + ".index", target_index(t)});  // [K] int64
    tensors.push_back({t.module + ".delta", t.delta.detach()});  // [K, in] or [out, K] fp32
  }
  io::save_safetensors(dir / kDeltasFile, tensors, {{"format", "sparsecl-mask"}, {"producer", "sparsecl " SPARSECL_VERSION}});
  write_file_atomic(dir / kOutputJson, output_json().dump(2) + "\n");
  log::info("wrote the mask deltas and selection to ", dir.string());
}

void MaskMethod::merge_into_base(model::Decoder& decoder) {
  auto linears = linears_by_name(decoder);
  for (const Target& t : targets_) {
    model::Linear* lin = linears.at(t.module);
    if (!lin->indexed.empty()) model::merge_indexed_deltas(*lin);
  }
}

// ---- entry points --------------------------------------------------------------------------------------

std::unique_ptr<Method> make_mask_method(const config::Config& cfg, const StageContext& ctx) {
  return std::make_unique<MaskMethod>(MaskOptions::from_config(cfg), ctx);
}

void apply_mask_output(model::Decoder& decoder, const fs::path& stage_dir) {
  const fs::path jfile = stage_dir / kOutputJson, tfile = stage_dir / kDeltasFile;
  const json j = read_json_file(jfile, "mask selection");
  if (!j.contains("modules") || !j["modules"].is_object() || j["modules"].empty())
    throw Error(jfile.string() + ": no \"modules\" object (not the output of a mask stage)");
  std::map<std::string, at::Tensor> tensors = io::load_safetensors(tfile);
  auto linears = linears_by_name(decoder);
  // Validate everything before changing any weight: a bad file leaves the decoder as it was.
  std::vector<std::pair<model::Linear*, model::IndexedDelta>> pending;
  for (const auto& [module, spec] : j["modules"].items()) {
    const std::string kind = spec.is_object() ? spec.value("kind", std::string()) : std::string();
    if (kind != "rows" && kind != "columns")
      throw Error(jfile.string() + ": module '" + module + "' has kind '" + kind + "' (expected rows or columns)");
    auto lin = linears.find(module);
    if (lin == linears.end()) throw Error(jfile.string() + ": module '" + module + "' is not a linear layer of the model");
    auto take = [&](const std::string& key) {
      auto it = tensors.find(key);
      if (it == tensors.end()) throw Error(tfile.string() + ": missing tensor '" + key + "'");
      return it->second;
    };
    const at::Tensor index = take(module + ".index"), delta = take(module + ".delta");
    const bool columns = kind == "columns";
    const at::Tensor& W = lin->second->weight;  // [out, in]
    const int64_t span = W.size(columns ? 1 : 0);
    if (index.scalar_type() != at::kLong || index.dim() != 1)
      throw Error(tfile.string() + ": tensor '" + module + ".index' must be int64 [K]");
    const int64_t K = index.size(0);
    const std::vector<int64_t> want = columns ? std::vector<int64_t>{W.size(0), K} : std::vector<int64_t>{K, W.size(1)};
    if (!at::isFloatingType(delta.scalar_type()) || delta.sizes() != at::IntArrayRef(want))
      throw Error(tfile.string() + ": tensor '" + module + ".delta' must be floating point [" + std::to_string(want[0]) +
                  ", " + std::to_string(want[1]) + "] for the model's " + module);
    if (K > 0 && (index.min().item<int64_t>() < 0 || index.max().item<int64_t>() >= span))
      throw Error(tfile.string() + ": tensor '" + module + ".index' has entries outside [0, " + std::to_string(span) + ")");
    const at::Tensor sorted = std::get<0>(index.sort());  // [K]
    if (K > 1 && sorted.narrow(0, 1, K - 1).eq(sorted.narrow(0, 0, K - 1)).any().item<bool>())
      throw Error(tfile.string() + ": tensor '" + module + ".index' repeats an entry");
    pending.push_back({lin->second, {index.to(W.device()), delta.to(W.device(), at::kFloat), columns}});
  }
  if (tensors.size() != 2 * pending.size())
    throw Error(tfile.string() + ": holds " + std::to_string(tensors.size()) + " tensors, mask.json names " +
                std::to_string(pending.size()) + " modules (2 tensors each)");
  for (auto& [lin, d] : pending) {
    lin->indexed.push_back(std::move(d));
    model::merge_indexed_deltas(*lin);
  }
}

}  // namespace sparsecl::train
