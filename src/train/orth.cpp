// The `orth` fine-tuning method (orth.h): LoRA in the complement of earlier tasks' input subspace
// (project / InfLoRA init / O-LoRA regularize), the bases' statistics (activations, gradients, weight
// deltas) streamed per group of layers, and GPM's basis extension.
#include "sparsecl/train/orth.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/options.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/lora.h"
#include "sparsecl/model/loss.h"

namespace sparsecl::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kBasesFile = "orth_bases.safetensors";
constexpr const char* kPreviousAFile = "orth_previous_A.safetensors";
constexpr const char* kInfoFile = "orth.json";
constexpr const char* kStateFile = "orth_state.safetensors";  // in a checkpoint directory
// Eigen-directions below this share of a task's energy are round-off of the fp32 covariance.
constexpr double kNullEnergy = 1e-6;

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// An adapted projection: its module name, layer, input hook point and the Linear itself.
struct Site {
  std::string module;
  int64_t layer = 0;
  model::HookPoint point = model::HookPoint::AttnInput;
  model::Linear* linear = nullptr;
  int64_t in() const { return linear->weight.size(1); }
  int64_t out() const { return linear->weight.size(0); }
};

// "model.layers.12.mlp.down_proj" -> layer 12, hook point of down_proj.
Site site_of(const std::string& module, model::Linear* linear) {
  Site s;
  s.module = module;
  s.linear = linear;
  const std::string tag = "layers.";
  const size_t at = module.find(tag);
  if (at == std::string::npos) throw Error("orth: module '" + module + "' is not inside a decoder layer");
  s.layer = std::stoll(module.substr(at + tag.size()));
  s.point = model::input_hook_point(module.substr(module.rfind('.') + 1));
  return s;
}

std::vector<Site> sites_of(model::Decoder& decoder, const std::vector<std::string>& modules) {
  std::map<std::string, model::Linear*> linears;
  for (auto& [name, lin] : decoder.named_linears()) linears[name] = lin;
  std::vector<Site> sites;
  for (const auto& m : modules) {
    auto it = linears.find(m);
    if (it == linears.end()) throw Error("orth: the model has no linear layer '" + m + "'");
    sites.push_back(site_of(m, it->second));
  }
  std::stable_sort(sites.begin(), sites.end(), [](const Site& a, const Site& b) { return a.layer < b.layer; });
  return sites;
}

std::vector<std::string> targeted_modules(model::Decoder& decoder, const model::LoraConfig& lora) {
  std::vector<std::string> out;
  for (auto& [name, lin] : decoder.named_linears())
    if (module_targeted(name, lora.target_modules)) out.push_back(name);
  return out;
}

// Consecutive layers grouped so that each group's statistics (bytes_of_layer) stay below the budget.
std::vector<std::vector<Site>> group_layers(const std::vector<Site>& sites, int64_t budget,
                                            const std::function<int64_t(const std::vector<Site>&)>& bytes_of_layer) {
  std::vector<std::vector<Site>> groups;
  int64_t group_bytes = 0;
  for (size_t i = 0; i < sites.size();) {
    size_t j = i;
    while (j < sites.size() && sites[j].layer == sites[i].layer) ++j;
    const std::vector<Site> layer(sites.begin() + static_cast<std::ptrdiff_t>(i), sites.begin() + static_cast<std::ptrdiff_t>(j));
    const int64_t bytes = bytes_of_layer(layer);
    if (groups.empty() || group_bytes + bytes > budget) {
      groups.emplace_back();
      group_bytes = 0;
    }
    groups.back().insert(groups.back().end(), layer.begin(), layer.end());
    group_bytes += bytes;
    i = j;
  }
  return groups;
}

// A seeded subsample of `n` records, sorted by length (less padding per batch).
std::vector<data::Example> basis_subset(const std::vector<data::Example>& examples, int64_t n, uint64_t seed) {
  const std::vector<int64_t> order = data::seeded_permutation(static_cast<int64_t>(examples.size()), seed);
  std::vector<data::Example> out;
  for (size_t i = 0; i < order.size() && static_cast<int64_t>(out.size()) < n; ++i)
    out.push_back(examples[static_cast<size_t>(order[i])]);
  std::stable_sort(out.begin(), out.end(),
                   [](const data::Example& a, const data::Example& b) { return a.ids.size() < b.ids.size(); });
  return out;
}

// The LoRA init seed of stage `stage_index`: the run's seed for the first stage, a splitmix64 mix after.
uint64_t adapter_seed(uint64_t seed, int64_t stage_index) {
  if (stage_index == 0) return seed;
  uint64_t z = seed + static_cast<uint64_t>(stage_index) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The last (covariance, old basis, tag) -> result: the modules sharing an input (q/k/v, gate/up; the sinks
// see them one after another with the same covariance tensor) and an old basis share one eigendecomposition.
class LastResult {
 public:
  template <typename Compute>
  at::Tensor get(const at::Tensor& covariance, const at::Tensor& old, int64_t tag, Compute compute) {
    const bool same_old = old.defined() ? (old_.defined() && old_.sizes() == old.sizes() && at::equal(old_, old))
                                        : !old_.defined();
    if (!covariance_.defined() || !covariance_.is_same(covariance) || !same_old || tag != tag_) {
      result_ = compute();
      covariance_ = covariance;
      old_ = old;
      tag_ = tag;
    }
    return result_;
  }

 private:
  at::Tensor covariance_, old_, result_;
  int64_t tag_ = 0;
};

using CovarianceSink = std::function<void(const Site&, const at::Tensor& covariance)>;

// gpm: X^T X [in, in] fp32 over the real tokens of the examples, per (hook point, layer) of the group's
// sites, accumulated on the decoder's device by an activation hook; one forward pass per group.
void activation_covariances(model::Decoder& decoder, const std::vector<Site>& sites,
                            const std::vector<data::Example>& examples, int64_t batch_size, int64_t pad_id,
                            int64_t budget, const CovarianceSink& sink) {
  const at::Device device = decoder.device();
  auto bytes = [](const std::vector<Site>& layer) {
    std::set<int> points;
    int64_t b = 0;
    for (const auto& s : layer)
      if (points.insert(static_cast<int>(s.point)).second) b += s.in() * s.in() * 4;
    return b;
  };
  for (const auto& group : group_layers(sites, budget, bytes)) {
    std::map<std::pair<int, int64_t>, at::Tensor> cov;  // (hook point, layer) -> [in, in] fp32
    for (const auto& s : group) {
      auto& c = cov[{static_cast<int>(s.point), s.layer}];
      if (!c.defined())  // on the layer's device (pipeline placement)
        c = at::zeros({s.in(), s.in()}, at::TensorOptions().dtype(at::kFloat).device(decoder.layer_device(s.layer)));
    }
    at::Tensor real_rows;  // [N] flat indices of the current batch's real tokens; undefined = all
    model::ActivationHook hook = [&](model::HookPoint point, int64_t layer, const at::Tensor& live) {
      auto it = cov.find({static_cast<int>(point), layer});
      if (it == cov.end()) return;
      at::Tensor X = live.detach().reshape({-1, live.size(-1)});  // [B*T, in]
      if (real_rows.defined()) X = X.index_select(0, real_rows.to(X.device()));  // [N, in]
      X = X.to(at::kFloat);
      it->second.addmm_(X.t(), X);
    };
    at::NoGradGuard no_grad;
    for (size_t b = 0; b < examples.size(); b += static_cast<size_t>(batch_size)) {
      if (!dist::owns(static_cast<int64_t>(b) / batch_size)) continue;  // data parallel: batches round-robin
      const size_t e = std::min(examples.size(), b + static_cast<size_t>(batch_size));
      data::Batch batch = data::make_batch(examples, b, e, pad_id);
      model::ForwardInput in;
      in.input_ids = batch.input_ids.to(device);  // [B, T]
      real_rows = at::Tensor();
      if (batch.num_tokens != batch.input_ids.numel()) {
        in.attention_mask = batch.attention_mask.to(device);                      // [B, T]
        real_rows = batch.attention_mask.reshape({-1}).nonzero().squeeze(1).to(device);  // [N]
      }
      model::ForwardOptions opt;
      opt.logits = false;
      opt.hook = &hook;
      decoder.forward(in, opt);
    }
    for (const auto& s : group) {
      at::Tensor& c = cov.at({static_cast<int>(s.point), s.layer});
      dist::all_reduce_sum(c);  // X^T X is a sum over tokens: the ranks' parts add up
      sink(s, c);
    }
  }
}

// For a gradient pass: only the given weights require grad (every other parameter and every attached LoRA
// delta is frozen); restores all flags and drops the .grad tensors on destruction.
class WeightGradScope {
 public:
  WeightGradScope(model::Decoder& decoder, const std::vector<Site>& sites) : sites_(sites) {
    for (auto& [name, p] : decoder.named_parameters()) saved_.push_back({p, p->requires_grad()});
    for (auto& [name, lin] : decoder.named_linears())
      for (auto& d : lin->lora) {
        saved_.push_back({&d.A, d.A.requires_grad()});
        saved_.push_back({&d.B, d.B.requires_grad()});
      }
    for (auto& [p, flag] : saved_)
      if (flag) p->set_requires_grad(false);
    for (const auto& s : sites_) s.linear->weight.set_requires_grad(true);
  }
  ~WeightGradScope() {
    for (const auto& s : sites_) {
      s.linear->weight.mutable_grad().reset();
      s.linear->weight.set_requires_grad(false);
    }
    for (auto& [p, flag] : saved_) p->set_requires_grad(flag);
  }
  WeightGradScope(const WeightGradScope&) = delete;
  WeightGradScope& operator=(const WeightGradScope&) = delete;

 private:
  std::vector<Site> sites_;
  std::vector<std::pair<at::Tensor*, bool>> saved_;
};

// gradients: G = dL/dW [out, in] summed over the examples' loss tokens (one backward per batch, only the
// group's weights require grad), accumulated in fp32; C = G^T G.
void gradient_covariances(model::Decoder& decoder, const std::vector<Site>& sites,
                          const std::vector<data::Example>& examples, int64_t batch_size, int64_t pad_id,
                          int64_t budget, const CovarianceSink& sink) {
  const at::Device device = decoder.device();
  auto bytes = [](const std::vector<Site>& layer) {
    int64_t b = 0;
    for (const auto& s : layer) b += s.out() * s.in() * 8 + s.in() * s.in() * 4;  // grad + accumulator + C
    return b;
  };
  for (const auto& group : group_layers(sites, budget, bytes)) {
    std::vector<at::Tensor> acc;  // per site [out, in] fp32
    for (const auto& s : group)
      acc.push_back(at::zeros({s.out(), s.in()}, at::TensorOptions().dtype(at::kFloat).device(s.linear->weight.device())));
    WeightGradScope scope(decoder, group);
    at::AutoGradMode grad_mode(true);  // even if the caller runs under a NoGradGuard
    for (size_t b = 0; b < examples.size(); b += static_cast<size_t>(batch_size)) {
      if (!dist::owns(static_cast<int64_t>(b) / batch_size)) continue;  // data parallel: batches round-robin
      const size_t e = std::min(examples.size(), b + static_cast<size_t>(batch_size));
      data::Batch batch = data::make_batch(examples, b, e, pad_id);
      if (batch.num_label_tokens == 0) continue;
      model::ForwardInput in;
      in.input_ids = batch.input_ids.to(device);            // [B, T]
      in.attention_mask = batch.attention_mask.to(device);  // [B, T]
      model::ForwardOptions fo;
      fo.logits = false;  // the loss comes from the last hidden states a chunk at a time
      model::ForwardOutput out = decoder.forward(in, fo);
      // The sum over the batch's loss tokens: the accumulated gradient is that of the total loss.
      at::Tensor loss = model::chunked_causal_lm_loss(out.last_hidden, decoder.head_weight(), batch.labels) *
                        static_cast<double>(batch.num_label_tokens);
      out = {};
      loss.backward();
      for (size_t i = 0; i < group.size(); ++i) {
        at::Tensor& w = group[i].linear->weight;
        if (w.grad().defined()) acc[i].add_(w.grad().to(at::kFloat));
        w.mutable_grad().reset();
      }
    }
    for (size_t i = 0; i < group.size(); ++i) {
      at::NoGradGuard no_grad;
      dist::all_reduce_sum(acc[i]);  // the total loss's gradient: the ranks' parts add up
      const at::Tensor G = acc[i];
      acc[i] = at::Tensor();
      sink(group[i], G.t().mm(G));  // [in, in]
    }
  }
}

// deltas: D = scale * B A [out, in] of the stage's adapter (read from `stage_dir`); C = D^T D.
void delta_covariances(model::Decoder& decoder, const std::vector<Site>& sites, const model::LoraAdapter& adapter,
                       const fs::path& stage_dir, const CovarianceSink& sink) {
  for (const auto& s : sites) {
    auto it = adapter.weights.find(s.module);
    if (it == adapter.weights.end())
      throw Error((stage_dir / "adapter_model.safetensors").string() + ": no LoRA weights for module '" + s.module +
                  "' (orth.basis=deltas needs the stage's adapter of every adapted layer)");
    at::NoGradGuard no_grad;
    const auto dopt = at::TensorOptions().dtype(at::kDouble).device(s.linear->weight.device());
    const at::Tensor A = it->second.first.to(dopt), B = it->second.second.to(dopt);  // [r, in], [out, r]
    const at::Tensor D = B.mm(A) * adapter.config.scale_for(s.module);                 // [out, in]
    sink(s, D.t().mm(D));
  }
}

std::map<std::string, at::Tensor> load_tensors_with_prefix(const std::map<std::string, at::Tensor>& all,
                                                           const std::string& prefix) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [k, v] : all)
    if (k.rfind(prefix, 0) == 0) out[k.substr(prefix.size())] = v;
  return out;
}

}  // namespace

// ---- names --------------------------------------------------------------------------------------------

OrthBasis parse_orth_basis(const std::string& name) {
  if (name == "gpm") return OrthBasis::Gpm;
  if (name == "gradients") return OrthBasis::Gradients;
  if (name == "deltas") return OrthBasis::Deltas;
  throw Error("orth.basis: unknown basis '" + name + "' (expected gpm, gradients or deltas)");
}

OrthMode parse_orth_mode(const std::string& name) {
  if (name == "project") return OrthMode::Project;
  if (name == "init") return OrthMode::Init;
  if (name == "regularize") return OrthMode::Regularize;
  throw Error("orth.mode: unknown mode '" + name + "' (expected project, init or regularize)");
}

std::string orth_basis_name(OrthBasis basis) {
  switch (basis) {
    case OrthBasis::Gpm: return "gpm";
    case OrthBasis::Gradients: return "gradients";
    case OrthBasis::Deltas: return "deltas";
  }
  return "?";
}

std::string orth_mode_name(OrthMode mode) {
  switch (mode) {
    case OrthMode::Project: return "project";
    case OrthMode::Init: return "init";
    case OrthMode::Regularize: return "regularize";
  }
  return "?";
}

// ---- linear algebra -------------------------------------------------------------------------------------

namespace {

// The fp64 pieces shared by gpm_extend and inflora_down: symmetrised C, U (k may be 0), and the residual
// covariance (I - U U^T) C (I - U U^T).
struct Residual {
  at::Tensor C, U, R;  // [in, in], [in, k], [in, in] fp64 on C's device
  double total = 0.0;  // trace(C) = ||R_task||^2
};

Residual residual_of(const at::Tensor& U, const at::Tensor& covariance, const char* who) {
  if (!covariance.defined() || covariance.dim() != 2 || covariance.size(0) != covariance.size(1))
    throw Error(std::string(who) + ": the covariance must be a square [in, in] matrix, got " +
                (covariance.defined() ? shape_of(covariance) : std::string("an undefined tensor")));
  const int64_t in = covariance.size(0);
  const auto dopt = at::TensorOptions().dtype(at::kDouble).device(covariance.device());
  Residual r;
  if (U.defined() && U.numel() > 0) {
    if (U.dim() != 2 || U.size(0) != in)
      throw Error(std::string(who) + ": basis " + shape_of(U) + " does not fit the covariance " + shape_of(covariance));
    r.U = U.to(dopt);
  } else {
    r.U = at::zeros({in, 0}, dopt);
  }
  at::NoGradGuard no_grad;
  r.C = covariance.to(dopt);
  r.C = (r.C + r.C.t()) * 0.5;
  r.total = r.C.trace().item<double>();
  if (r.U.size(1) == 0) {
    r.R = r.C;
  } else {
    const at::Tensor P = at::eye(in, dopt) - r.U.mm(r.U.t());  // [in, in]
    r.R = P.mm(r.C).mm(P);
    r.R = (r.R + r.R.t()) * 0.5;
  }
  return r;
}

// Eigen-decomposition of a symmetric fp64 matrix, descending. The decomposition itself runs in fp32
// (4-6x faster than fp64 on a CPU; its eigenvalue error, ~1e-7 of the largest, is below kNullEnergy), the
// results come back as fp64; callers re-orthogonalise the vectors they keep in fp64.
std::pair<at::Tensor, at::Tensor> eigh_descending(const at::Tensor& symmetric) {
  auto [values, vectors] = at::linalg_eigh(symmetric.to(at::kFloat));  // ascending
  return {values.flip(0).to(at::kDouble), vectors.flip(1).to(at::kDouble)};
}

// Columns V [in, n] made orthogonal to U and orthonormal (fp64).
at::Tensor orthonormal_complement(const at::Tensor& V, const at::Tensor& U) {
  at::Tensor W = V - U.mm(U.t().mm(V));
  return std::get<0>(at::linalg_qr(W, "reduced"));
}

}  // namespace

at::Tensor gpm_extend(const at::Tensor& U, const at::Tensor& covariance, double energy) {
  if (!(energy > 0.0 && energy <= 1.0)) throw Error("orth.energy: must be in (0, 1], got " + std::to_string(energy));
  Residual r = residual_of(U, covariance, "gpm_extend");
  at::NoGradGuard no_grad;
  const int64_t in = r.C.size(0), k = r.U.size(1);
  if (!(r.total > 0.0) || k >= in) return r.U.to(at::kFloat);
  // ||U^T R||^2 = trace(U^T C U): what the existing basis already captures of this task.
  const double captured = (r.C.mm(r.U) * r.U).sum().item<double>();
  auto [values, vectors] = eigh_descending(r.R);
  const at::Tensor top = values.to(at::kCPU).contiguous();
  const double* v = top.data_ptr<double>();
  const double target = energy * r.total * (1.0 - 1e-12), noise = kNullEnergy * r.total;
  int64_t add = 0;
  double acc = captured;
  while (add < in - k && acc < target && v[add] > noise) acc += v[add++];
  if (add == 0) return r.U.to(at::kFloat);
  const at::Tensor V = vectors.narrow(1, 0, add);  // [in, add]
  return at::cat({r.U, orthonormal_complement(V, r.U)}, 1).to(at::kFloat);
}

at::Tensor inflora_down(const at::Tensor& U, const at::Tensor& covariance, int64_t r) {
  Residual res = residual_of(U, covariance, "inflora_down");
  at::NoGradGuard no_grad;
  const int64_t in = res.C.size(0), k = res.U.size(1);
  if (r < 1 || in - k < r)
    throw Error("orth.mode=init: only " + std::to_string(in - k) + " input directions remain outside the earlier tasks' " +
                "basis, fewer than the LoRA rank " + std::to_string(r) + " (lower orth.energy or lora.r)");
  // Push span(U) below every complement direction, so that a complement of low energy still yields r
  // directions outside U.
  const at::Tensor shifted = res.R - (res.total + 1.0) * res.U.mm(res.U.t());
  auto [values, vectors] = eigh_descending((shifted + shifted.t()) * 0.5);
  const at::Tensor V = orthonormal_complement(vectors.narrow(1, 0, r), res.U);  // [in, r]
  const at::Tensor A = (V.t() / std::sqrt(3.0)).to(at::kFloat);                          // [r, in]
  return project_out(A, res.U.to(at::kFloat));
}

at::Tensor project_out(const at::Tensor& A, const at::Tensor& U) {
  if (!U.defined() || U.numel() == 0) return A;
  if (U.dim() != 2 || A.dim() != 2 || U.size(0) != A.size(1))
    throw Error("project_out: A " + shape_of(A) + " and basis " + shape_of(U) + " do not fit");
  const at::Tensor u = U.to(A.device(), A.scalar_type());
  return A - A.mm(u).mm(u.t());
}

std::map<std::string, at::Tensor> input_covariances(model::Decoder& decoder, const std::vector<std::string>& modules,
                                                    const std::vector<data::Example>& examples, int64_t batch_size,
                                                    int64_t pad_id, int64_t memory_budget) {
  if (batch_size < 1) throw Error("input_covariances: batch_size must be >= 1");
  std::map<std::string, at::Tensor> out;
  activation_covariances(decoder, sites_of(decoder, modules), examples, batch_size, pad_id, memory_budget,
                         [&](const Site& s, const at::Tensor& c) { out[s.module] = c; });
  return out;
}

std::map<std::string, at::Tensor> load_orth_bases(const fs::path& stage_dir) {
  const fs::path file = stage_dir / kBasesFile;
  if (!fs::exists(file))
    throw Error(file.string() + ": missing (the earlier stage's orth bases; was that stage trained with method orth "
                "and finished?)");
  std::map<std::string, at::Tensor> bases = io::load_safetensors(file);
  for (auto& [m, U] : bases) {
    if (U.dim() != 2 || U.scalar_type() != at::kFloat)
      throw Error(file.string() + ": tensor '" + m + "' must be a [in, k] float32 basis, got " + shape_of(U));
  }
  return bases;
}

// ---- the method ---------------------------------------------------------------------------------------

OrthMethod::OrthMethod(model::LoraConfig lora, OrthOptions options, const std::vector<data::Example>& stage_examples,
                       const fs::path& previous_stage)
    : LoraMethod(std::move(lora), adapter_seed(options.seed, options.stage_index)), options_(options) {
  if (options_.stage_index < 0) throw Error("orth: stage_index must be >= 0");
  if (!(options_.energy > 0.0 && options_.energy <= 1.0))
    throw Error("orth.energy: must be in (0, 1], got " + std::to_string(options_.energy));
  if (options_.lambda < 0.0) throw Error("orth.lambda: must be >= 0");
  if (options_.basis_samples < 1) throw Error("orth.basis_samples: must be >= 1");
  if (options_.batch_size < 1) throw Error("train.batch_size: must be >= 1");
  if (options_.mode == OrthMode::Init) {
    if (stage_examples.empty())
      throw Error("orth.mode=init: needs the stage's training examples (InfLoRA builds A from their activations)");
    init_examples_ = basis_subset(stage_examples, options_.basis_samples, options_.seed);
  }
  if (!previous_stage.empty()) {
    bases_ = load_orth_bases(previous_stage);
    const fs::path prev_a = previous_stage / kPreviousAFile;
    if (fs::exists(prev_a)) {
      previous_A_ = io::load_safetensors(prev_a);
    } else if (options_.mode == OrthMode::Regularize) {
      throw Error(prev_a.string() + ": missing (orth.mode=regularize needs the earlier stages' A matrices)");
    }
    int64_t dims = 0;
    for (const auto& [m, U] : bases_) dims += U.size(1);
    log::info("orth: ", bases_.size(), " bases (", dims, " directions in all) from ", previous_stage.string());
  }
}

void OrthMethod::refresh_device_copies(at::Device device) {
  device_bases_.clear();
  device_previous_A_.clear();
  for (const auto& m : modules_) {
    // Each module's copies live with its adapter (its layer's device under pipeline placement).
    const at::Device dev = A_.count(m) ? A_.at(m).device() : device;
    if (auto it = bases_.find(m); it != bases_.end()) device_bases_[m] = it->second.to(dev, at::kFloat);
    if (auto it = previous_A_.find(m); it != previous_A_.end()) device_previous_A_[m] = it->second.to(dev, at::kFloat);
  }
}

NamedTensors OrthMethod::setup(model::Decoder& decoder) {
  modules_ = targeted_modules(decoder, config());
  const std::vector<Site> sites = sites_of(decoder, modules_);
  for (const auto& s : sites) {
    if (auto it = bases_.find(s.module); it != bases_.end() && it->second.size(0) != s.in())
      throw Error("orth: the basis of '" + s.module + "' is " + shape_of(it->second) + ", but the layer has " +
                  std::to_string(s.in()) + " input features (bases of another model?)");
    if (auto it = previous_A_.find(s.module); it != previous_A_.end() && it->second.size(1) != s.in())
      throw Error("orth: the earlier A of '" + s.module + "' is " + shape_of(it->second) + ", but the layer has " +
                  std::to_string(s.in()) + " input features");
  }

  // InfLoRA: A from the new task's activations through the model as it is before this stage's adapter.
  std::map<std::string, at::Tensor> init_A;
  if (options_.mode == OrthMode::Init) {
    LastResult last;
    activation_covariances(decoder, sites, init_examples_, options_.batch_size, options_.pad_id,
                           options_.memory_budget, [&](const Site& s, const at::Tensor& c) {
                             auto it = bases_.find(s.module);
                             const at::Tensor U = it == bases_.end() ? at::Tensor() : it->second;
                             const int64_t r = config().rank_for(s.module);
                             init_A[s.module] = last.get(c, U, r, [&] { return inflora_down(U, c, r).to(at::kCPU); });
                           });
  }

  NamedTensors lora = LoraMethod::setup(decoder);
  std::map<std::string, model::Linear*> linears;
  for (auto& [name, lin] : decoder.named_linears()) linears[name] = lin;
  A_.clear();
  B_.clear();
  for (const auto& m : modules_) {
    model::LoraDelta& d = linears.at(m)->lora.back();
    A_[m] = d.A;  // shares the decoder's tensor
    B_[m] = d.B;
  }
  refresh_device_copies(decoder.device());

  at::NoGradGuard no_grad;
  NamedTensors params;
  switch (options_.mode) {
    case OrthMode::Project:
      for (const auto& [m, U] : device_bases_) A_.at(m).copy_(project_out(A_.at(m), U));
      params = lora;
      break;
    case OrthMode::Init:
      for (const auto& m : modules_) {
        A_.at(m).copy_(init_A.at(m));
        A_.at(m).set_requires_grad(false);  // frozen: only B trains
      }
      for (const auto& p : lora)
        if (p.first.find(".lora_B.") != std::string::npos) params.push_back(p);
      break;
    case OrthMode::Regularize:
      params = lora;
      break;
  }
  log::info("orth ", orth_mode_name(options_.mode), ": ", modules_.size(), " adapted layers, ", device_bases_.size(),
            " with an earlier basis");
  return params;
}

void OrthMethod::before_optimizer_step(model::Decoder& /*decoder*/, int64_t /*step*/) {
  if (options_.mode != OrthMode::Project) return;
  at::NoGradGuard no_grad;
  for (const auto& [m, U] : device_bases_) {
    at::Tensor& grad = A_.at(m).mutable_grad();
    if (grad.defined()) grad.sub_(grad.mm(U).mm(U.t()));  // dA <- dA (I - U U^T)
  }
}

void OrthMethod::after_optimizer_step(model::Decoder& /*decoder*/, int64_t /*step*/) {
  if (options_.mode != OrthMode::Project) return;
  at::NoGradGuard no_grad;
  for (const auto& [m, U] : device_bases_) {
    at::Tensor& A = A_.at(m);
    A.sub_(A.mm(U).mm(U.t()));  // A <- A (I - U U^T): Adam's per-element scaling leaves the complement
  }
}

at::Tensor OrthMethod::extra_loss(model::Decoder& /*decoder*/, int64_t /*step*/) {
  if (options_.mode != OrthMode::Regularize || options_.lambda == 0.0) return {};
  at::Tensor total;
  for (const auto& [m, prev] : device_previous_A_) {
    const at::Tensor term = prev.mm(A_.at(m).t()).abs().sum();  // |[A_1; ...; A_{t-1}] A_t^T|_1
    total = total.defined() ? total + term : term;
  }
  if (!total.defined()) return {};
  return total * options_.lambda;
}

void OrthMethod::save_state(const fs::path& dir) const {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [m, U] : bases_) tensors.push_back({"basis." + m, U});
  for (const auto& [m, A] : previous_A_) tensors.push_back({"previous_A." + m, A});
  if (options_.mode == OrthMode::Init)
    for (const auto& [m, A] : A_) tensors.push_back({"A." + m, A.detach()});
  io::save_safetensors(dir / kStateFile, tensors,
                       {{"mode", orth_mode_name(options_.mode)}, {"basis", orth_basis_name(options_.basis)}});
}

void OrthMethod::load_state(const fs::path& dir) {
  const fs::path file = dir / kStateFile;
  if (!fs::exists(file)) throw Error(file.string() + ": missing (a checkpoint of method orth holds its bases there)");
  const auto meta = io::SafetensorsFile::open(file)->metadata();
  if (auto it = meta.find("mode"); it == meta.end() || it->second != orth_mode_name(options_.mode))
    throw Error(file.string() + ": checkpoint of another orth.mode (resume needs orth.mode=" +
                orth_mode_name(options_.mode) + ")");
  const std::map<std::string, at::Tensor> all = io::load_safetensors(file);
  bases_ = load_tensors_with_prefix(all, "basis.");
  previous_A_ = load_tensors_with_prefix(all, "previous_A.");
  if (options_.mode == OrthMode::Init) {
    const auto saved = load_tensors_with_prefix(all, "A.");
    at::NoGradGuard no_grad;
    for (auto& [m, A] : A_) {
      auto it = saved.find(m);
      if (it == saved.end() || it->second.sizes() != A.sizes())
        throw Error(file.string() + ": missing or misshapen frozen A of '" + m + "'");
      A.copy_(it->second);
    }
  }
  if (!A_.empty()) refresh_device_copies(A_.begin()->second.device());
}

void OrthMethod::finish_stage(model::Decoder& decoder, const std::vector<data::Example>& examples,
                              const fs::path& stage_dir) {
  const std::vector<std::string> modules = targeted_modules(decoder, config());
  const std::vector<Site> sites = sites_of(decoder, modules);
  const fs::path adapter_file = stage_dir / "adapter_model.safetensors";
  if (!fs::exists(adapter_file))
    throw Error(adapter_file.string() + ": missing (orth's finish_stage reads the stage's adapter; save_output first)");
  const model::LoraAdapter adapter = model::LoraAdapter::load(stage_dir);

  const std::vector<data::Example> samples = basis_subset(examples, options_.basis_samples, options_.seed);
  if (options_.basis != OrthBasis::Deltas && samples.empty())
    throw Error("orth.basis=" + orth_basis_name(options_.basis) + ": finish_stage needs the stage's examples");

  json per_module = json::object();
  int64_t added = 0;
  LastResult last;
  CovarianceSink extend = [&](const Site& s, const at::Tensor& c) {
    auto it = bases_.find(s.module);
    const at::Tensor old = it == bases_.end() ? at::Tensor() : it->second;
    const int64_t k_before = old.defined() ? old.size(1) : 0;
    const at::Tensor U = last.get(c, old, 0, [&] { return gpm_extend(old, c, options_.energy); });  // [in, k]
    const at::Tensor Cd = c.to(at::kDouble), Ud = U.to(at::kDouble);
    const double total = Cd.trace().item<double>();
    const double captured = total > 0 ? (Cd.mm(Ud) * Ud).sum().item<double>() / total : 0.0;
    if (U.size(1) > 0) bases_[s.module] = U.to(at::kCPU).contiguous();
    per_module[s.module] = {{"in", s.in()}, {"k", U.size(1)}, {"k_before", k_before}, {"energy", captured}};
    added += U.size(1) - k_before;
  };
  switch (options_.basis) {
    case OrthBasis::Gpm:
      activation_covariances(decoder, sites, samples, options_.batch_size, options_.pad_id, options_.memory_budget,
                             extend);
      break;
    case OrthBasis::Gradients:
      gradient_covariances(decoder, sites, samples, options_.batch_size, options_.pad_id, options_.memory_budget,
                           extend);
      break;
    case OrthBasis::Deltas:
      delta_covariances(decoder, sites, adapter, stage_dir, extend);
      break;
  }

  // This stage's A joins the earlier ones (O-LoRA's penalty in later stages; kept for every mode).
  for (const auto& [m, ab] : adapter.weights) {
    const at::Tensor A = ab.first.to(at::kCPU, at::kFloat);  // [r, in]
    auto it = previous_A_.find(m);
    previous_A_[m] = it == previous_A_.end() ? A.contiguous() : at::cat({it->second, A}, 0);
  }

  std::vector<std::pair<std::string, at::Tensor>> bases, prev;
  for (const auto& [m, U] : bases_) bases.push_back({m, U});
  for (const auto& [m, A] : previous_A_) prev.push_back({m, A});
  const std::map<std::string, std::string> meta = {{"producer", "sparsecl " SPARSECL_VERSION},
                                                   {"basis", orth_basis_name(options_.basis)}};
  const json info = {{"basis", orth_basis_name(options_.basis)},
                     {"energy", options_.energy},
                     {"mode", orth_mode_name(options_.mode)},
                     {"samples", samples.size()},
                     {"modules", per_module}};
  if (dist::is_main()) {  // every rank computed the same bases; one writes them
    io::save_safetensors(stage_dir / kBasesFile, bases, meta);
    io::save_safetensors(stage_dir / kPreviousAFile, prev, meta);
    write_file_atomic(stage_dir / kInfoFile, info.dump(2) + "\n");
  }
  dist::barrier();
  log::info("orth: extended the bases of ", sites.size(), " layers by ", added, " directions (",
            orth_basis_name(options_.basis), ", energy ", options_.energy, ") into ", (stage_dir / kBasesFile).string());
}

std::unique_ptr<Method> make_orth_method(const config::Config& cfg, const StageContext& ctx) {
  OrthOptions o;
  o.basis = parse_orth_basis(cfg.get<std::string>("orth.basis"));
  o.mode = parse_orth_mode(cfg.get<std::string>("orth.mode"));
  o.energy = cfg.get<double>("orth.energy");
  o.lambda = cfg.get<double>("orth.lambda");
  o.basis_samples = cfg.get<int64_t>("orth.basis_samples");
  o.batch_size = cfg.get<int64_t>("train.batch_size");
  o.pad_id = ctx.pad_id;
  o.seed = ctx.seed;
  o.stage_index = static_cast<int64_t>(ctx.previous.size());
  static const std::vector<data::Example> none;
  return std::make_unique<OrthMethod>(lora_config_from(cfg), o, ctx.examples ? *ctx.examples : none,
                                      ctx.previous.empty() ? fs::path() : ctx.previous.back());
}

}  // namespace sparsecl::train
