// Representation drift between two models on the same probe tokens: collection of per-layer hidden
// states (a seeded token sample, host fp32), linear CKA, principal-angle similarity of the PCA
// subspaces and the in-subspace share of the displacement (definitions: include/sparsecl/eval/drift.h).
#include "sparsecl/eval/drift.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/eval/cl_metrics.h"
#include "sparsecl/eval/scoring.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/probe/probe.h"
#include "sparsecl/text/tokenizer.h"

namespace sparsecl::eval {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr const char* kProducer = "sparsecl drift representations";

at::Tensor host_double(const at::Tensor& x) { return x.to(at::kCPU, at::kDouble).contiguous(); }

at::Tensor centred(const at::Tensor& x) {  // [N, p] -> columns minus their means
  return x - x.mean(0, /*keepdim=*/true);
}

double squared_norm(const at::Tensor& x) { return x.square().sum().item<double>(); }

}  // namespace

// ---- the measures -------------------------------------------------------------------------------------

namespace {

// Top principal directions of a centred xc [N, H] from the eigen-decomposition of whichever second-moment
// matrix is smaller: the covariance xcᵀxc [H, H] (its eigenvectors are the directions) or the Gram matrix
// xc xcᵀ [N, N] (direction i = xcᵀ u_i / sqrt(λ_i)). Both cost far less than an SVD of xc when one side is
// small (N = 1024 tokens against H = 4096 for an 8B model; H = 576 against N = 1024 for SmolLM2).
// `second_moment` is that matrix when the caller has it already (undefined otherwise).
at::Tensor top_directions(const at::Tensor& xc, double energy, at::Tensor second_moment = {}) {
  const int64_t N = xc.size(0), H = xc.size(1);
  const bool gram = N <= H;
  if (!second_moment.defined()) second_moment = gram ? at::matmul(xc, xc.t()) : at::matmul(xc.t(), xc);
  auto [values, vectors] = at::linalg_eigh(second_moment);  // ascending
  values = values.flip(0).clamp_min(0);                      // descending, rounding below 0 removed
  vectors = vectors.flip(1);
  const double total = values.sum().item<double>();
  if (!(total > 0)) return at::zeros({H, 0}, at::kDouble);
  const auto cumulative = values.cumsum(0);
  const auto* c = cumulative.data_ptr<double>();
  // Relative tolerance so that energy = 1 does not ask for more than the rank because of rounding.
  const double target = energy * total * (1 - 1e-12);
  int64_t k = cumulative.size(0);
  for (int64_t i = 0; i < cumulative.size(0); ++i)
    if (c[i] >= target) {
      k = i + 1;
      break;
    }
  if (!gram) return vectors.slice(1, 0, k).contiguous();  // [H, k]
  const auto directions = at::matmul(xc.t(), vectors.slice(1, 0, k));  // [H, k], column norms sqrt(λ_i)
  return (directions / directions.norm(2, 0, /*keepdim=*/true)).contiguous();
}

// CKA of the centred x [N, p], y [N, q]. In sample space (N <= max(p, q)) from the Gram matrices
// Mx = x xᵀ, My = y yᵀ; in feature space from Mx = xᵀx, My = yᵀy. Either is computed here when undefined.
double cka_centred(const at::Tensor& x, const at::Tensor& y, at::Tensor Mx = {}, at::Tensor My = {}) {
  const int64_t n = x.size(0), p = x.size(1), q = y.size(1);
  double cross;
  if (n <= std::max(p, q)) {
    // HSIC numerators tr(K L) = <K, L>_F (K, L symmetric).
    if (!Mx.defined()) Mx = at::matmul(x, x.t());
    if (!My.defined()) My = at::matmul(y, y.t());
    cross = (Mx * My).sum().item<double>();
  } else {
    // ||yᵀx||_F^2 with ||xᵀx||_F, ||yᵀy||_F ([q,p], [p,p], [q,q]).
    if (!Mx.defined()) Mx = at::matmul(x.t(), x);
    if (!My.defined()) My = at::matmul(y.t(), y);
    cross = squared_norm(at::matmul(y.t(), x));
  }
  const double xx = squared_norm(Mx), yy = squared_norm(My);
  if (!(xx > 0) || !(yy > 0)) return kNaN;
  return cross / std::sqrt(xx * yy);
}

}  // namespace

double linear_cka(const at::Tensor& X, const at::Tensor& Y) {
  if (X.dim() != 2 || Y.dim() != 2 || X.size(0) != Y.size(0))
    throw Error("linear_cka: expected X [N, p] and Y [N, q] with the same N");
  return cka_centred(centred(host_double(X)), centred(host_double(Y)));
}

at::Tensor pca_basis(const at::Tensor& X, double energy) {
  if (X.dim() != 2) throw Error("pca_basis: expected X [N, H]");
  if (!(energy > 0 && energy <= 1)) throw Error("pca_basis: energy must be in (0, 1], got " + std::to_string(energy));
  return top_directions(centred(host_double(X)), energy);
}

double subspace_similarity(const at::Tensor& U, const at::Tensor& V) {
  if (U.dim() != 2 || V.dim() != 2 || U.size(0) != V.size(0))
    throw Error("subspace_similarity: expected bases U [H, a] and V [H, b] with the same H");
  const int64_t m = std::min(U.size(1), V.size(1));
  if (m == 0) return kNaN;
  // The singular values of U^T V are the cosines of the principal angles; their squares sum to ||U^T V||_F^2.
  return squared_norm(at::matmul(host_double(U).t(), host_double(V))) / static_cast<double>(m);
}

double inside_share(const at::Tensor& D, const at::Tensor& U) {
  if (D.dim() != 2 || U.dim() != 2 || D.size(1) != U.size(0))
    throw Error("inside_share: expected D [N, H] and U [H, k] with the same H");
  const auto d = host_double(D);
  const double total = squared_norm(d);
  if (!(total > 0)) return kNaN;
  if (U.size(1) == 0) return 0.0;
  return squared_norm(at::matmul(d, host_double(U))) / total;  // ||D U||^2 = ||P D^T||^2 for P = U U^T
}

// ---- collection ---------------------------------------------------------------------------------------

Representations collect_representations(const model::Decoder& decoder, const std::vector<data::Example>& examples,
                                        int64_t batch_size, int64_t pad_id, uint64_t seed,
                                        const CollectOptions& options) {
  if (examples.empty()) throw Error("drift: no probe examples to collect representations from");
  if (batch_size < 1) throw Error("drift: batch_size must be >= 1");
  const int64_t first = options.skip_first_token ? 1 : 0;

  // Eligible tokens in (example, position) order; the sample indexes into this list.
  std::vector<int64_t> offset(examples.size() + 1, 0);
  for (size_t e = 0; e < examples.size(); ++e)
    offset[e + 1] = offset[e] + std::max<int64_t>(0, static_cast<int64_t>(examples[e].ids.size()) - first);
  const int64_t eligible = offset.back();
  if (eligible == 0) throw Error("drift: the probe examples have no eligible token (each needs more than one token)");
  std::vector<int64_t> chosen;
  if (options.max_tokens > 0 && eligible > options.max_tokens) {
    const auto perm = data::seeded_permutation(eligible, probe::derive_seed(seed, "drift/tokens"));
    chosen.assign(perm.begin(), perm.begin() + options.max_tokens);
    std::sort(chosen.begin(), chosen.end());
  } else {
    chosen.resize(eligible);
    for (int64_t i = 0; i < eligible; ++i) chosen[i] = i;
  }
  const auto N = static_cast<int64_t>(chosen.size());

  Representations reps;
  reps.examples = static_cast<int64_t>(examples.size());
  reps.eligible_tokens = eligible;
  reps.model = decoder.source().string();
  reps.tokens = at::empty({N, 2}, at::kLong);
  reps.token_ids = at::empty({N}, at::kLong);
  auto* tok = reps.tokens.data_ptr<int64_t>();
  auto* ids = reps.token_ids.data_ptr<int64_t>();
  {
    size_t e = 0;
    for (int64_t r = 0; r < N; ++r) {
      while (offset[e + 1] <= chosen[r]) ++e;
      const int64_t pos = first + (chosen[r] - offset[e]);
      tok[2 * r] = static_cast<int64_t>(e);
      tok[2 * r + 1] = pos;
      ids[r] = examples[e].ids[pos];
    }
  }

  const int64_t num_states = decoder.config().num_hidden_layers + 1;
  std::vector<std::vector<at::Tensor>> chunks(num_states);
  at::NoGradGuard no_grad;
  int64_t row = 0;
  for (size_t begin = 0; begin < examples.size(); begin += batch_size) {
    const size_t end = std::min(examples.size(), begin + static_cast<size_t>(batch_size));
    // The sampled rows that fall in this batch: [row, row_end).
    int64_t row_end = row;
    while (row_end < N && tok[2 * row_end] < static_cast<int64_t>(end)) ++row_end;
    if (row_end == row) continue;
    const auto batch = data::make_batch(examples, begin, end, pad_id);
    model::ForwardInput in;
    in.input_ids = batch.input_ids.to(decoder.device());            // [B, T]
    in.attention_mask = batch.attention_mask.to(decoder.device());  // [B, T]
    model::ForwardOptions fo;
    fo.logits = false;
    fo.hidden_states = true;
    const auto out = decoder.forward(in, fo);  // hidden_states: (L+1) x [B, T, H]
    if (static_cast<int64_t>(out.hidden_states.size()) != num_states)
      throw Error("drift: the decoder returned " + std::to_string(out.hidden_states.size()) + " hidden states, expected " +
                  std::to_string(num_states));
    const auto sel = reps.tokens.slice(0, row, row_end);                                       // [n, 2]
    const auto batch_rows = sel.select(1, 0) - static_cast<int64_t>(begin);  // [n]
    const auto positions = sel.select(1, 1);                                  // [n]
    for (int64_t i = 0; i < num_states; ++i) {
      const at::Device dev = out.hidden_states[i].device();  // states of different layers may sit on different GPUs
      chunks[i].push_back(out.hidden_states[i].index({batch_rows.to(dev), positions.to(dev)}).to(at::kCPU, at::kFloat));  // [n, H]
    }
    row = row_end;
  }
  for (int64_t i = 0; i < num_states; ++i) reps.layers.push_back(at::cat(chunks[i], 0).contiguous());  // [N, H]
  log::debug("drift: ", N, " of ", eligible, " probe tokens x ", num_states, " hidden states from ", reps.model);
  return reps;
}

std::vector<data::Example> drift_examples(const fs::path& file, const text::Tokenizer* tokenizer, int64_t max_samples,
                                          int64_t max_length) {
  std::ifstream in(file);
  if (!in) throw Error("drift: cannot open probe file " + file.string());
  std::string first_line;
  while (std::getline(in, first_line) && first_line.find_first_not_of(" \t\r") == std::string::npos) {
  }
  in.close();
  json first;
  try {
    first = json::parse(first_line);
  } catch (const std::exception& e) {
    throw Error("drift: probe file " + file.string() + ": first record is not JSON: " + e.what());
  }
  if (!(first.is_object() && first.contains("choices"))) {
    data::LoadOptions lo;
    lo.max_length = max_length;
    lo.max_samples = max_samples;
    lo.shuffle = false;
    lo.plain_chat_fallback = true;
    return data::load_jsonl(file, tokenizer, lo);
  }
  if (!tokenizer) throw Error("drift: probe file " + file.string() + " holds text records and needs a tokenizer");
  std::vector<data::Example> out;
  for (const auto& r : load_mc(file, max_samples)) {
    data::Example e;
    e.kind = data::RecordKind::Text;
    e.line = static_cast<int64_t>(out.size()) + 1;
    e.ids = tokenizer->encode(mc_context(r) + mc_continuation(r.choices.at(r.answer)), true);
    if (max_length > 0 && static_cast<int64_t>(e.ids.size()) > max_length) {
      e.ids.resize(max_length);
      e.truncated = true;
    }
    e.loss_mask.assign(e.ids.size(), 1);
    out.push_back(std::move(e));
  }
  return out;
}

// ---- drift --------------------------------------------------------------------------------------------

json drift(const Representations& base, const Representations& after, double energy) {
  if (!(energy > 0 && energy <= 1)) throw Error("drift: eval.drift_energy must be in (0, 1], got " + std::to_string(energy));
  if (base.layers.empty()) throw Error("drift: the base representations are empty");
  if (base.layers.size() != after.layers.size())
    throw Error("drift: base has " + std::to_string(base.layers.size()) + " hidden states, after has " +
                std::to_string(after.layers.size()) + " (different architectures?)");
  if (!base.tokens.defined() || !after.tokens.defined() || !base.tokens.equal(after.tokens) ||
      !base.token_ids.defined() || !after.token_ids.defined() || !base.token_ids.equal(after.token_ids))
    throw Error("drift: base and after were collected on different probe tokens (examples, seed or max_tokens "
                "differ); their rows would not be paired");

  json layers = json::array();
  std::vector<double> ckas, sims, shares;
  for (size_t i = 0; i < base.layers.size(); ++i) {
    const auto& X = base.layers[i];
    const auto& Y = after.layers[i];
    if (X.dim() != 2 || !X.sizes().equals(Y.sizes()))
      throw Error("drift: hidden state " + std::to_string(i) + " has shape " + std::to_string(X.size(0)) + "x" +
                  std::to_string(X.dim() == 2 ? X.size(1) : -1) + " in base but not in after");
    const auto x = host_double(X), y = host_double(Y);  // [N, H]
    const auto xc = centred(x), yc = centred(y);
    // One second-moment matrix per side serves both CKA and PCA: the Gram matrices when N <= H.
    const bool gram = xc.size(0) <= xc.size(1);
    const auto Mx = gram ? at::matmul(xc, xc.t()) : at::matmul(xc.t(), xc);
    const auto My = gram ? at::matmul(yc, yc.t()) : at::matmul(yc.t(), yc);
    const auto U = top_directions(xc, energy, Mx);  // [H, k]
    const auto V = top_directions(yc, energy, My);  // [H, k_after]
    const auto D = y - x;
    const double base_norm = squared_norm(x);
    const double cka = cka_centred(xc, yc, Mx, My);
    const double sim = subspace_similarity(U, V);
    const double share = inside_share(D, U);
    const double rel = base_norm > 0 ? std::sqrt(squared_norm(D) / base_norm) : kNaN;
    ckas.push_back(cka);
    sims.push_back(sim);
    shares.push_back(share);
    layers.push_back({{"layer", i},
                      {"cka", number_or_null(cka)},
                      {"subspace_similarity", number_or_null(sim)},
                      {"inside_share", number_or_null(share)},
                      {"relative_displacement", number_or_null(rel)},
                      {"k", U.size(1)},
                      {"k_after", V.size(1)}});
  }
  return {{"layers", layers},
          {"mean_cka", number_or_null(finite_mean(ckas))},
          {"mean_subspace_similarity", number_or_null(finite_mean(sims))},
          {"mean_inside_share", number_or_null(finite_mean(shares))},
          {"energy", energy},
          {"tokens", base.tokens.size(0)},
          {"examples", base.examples}};
}

// ---- persistence --------------------------------------------------------------------------------------

void save_representations(const Representations& reps, const fs::path& path) {
  if (reps.layers.empty() || !reps.tokens.defined() || !reps.token_ids.defined())
    throw Error("drift: refusing to save empty representations to " + path.string());
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (size_t i = 0; i < reps.layers.size(); ++i)
    tensors.emplace_back("layer." + std::to_string(i), reps.layers[i].to(at::kFloat).contiguous());
  tensors.emplace_back("tokens", reps.tokens);
  tensors.emplace_back("token_ids", reps.token_ids);
  if (!path.parent_path().empty()) fs::create_directories(path.parent_path());
  io::save_safetensors(path, tensors,
                       {{"producer", kProducer},
                        {"layers", std::to_string(reps.layers.size())},
                        {"examples", std::to_string(reps.examples)},
                        {"eligible_tokens", std::to_string(reps.eligible_tokens)},
                        {"model", reps.model}});
}

Representations load_representations(const fs::path& path) {
  const auto file = io::SafetensorsFile::open(path);
  const auto& meta = file->metadata();
  const auto meta_of = [&](const std::string& key) -> std::string {
    const auto it = meta.find(key);
    if (it == meta.end()) throw Error("drift: " + path.string() + " lacks metadata '" + key + "' (not written by sparsecl?)");
    return it->second;
  };
  if (meta_of("producer") != kProducer)
    throw Error("drift: " + path.string() + " was written by '" + meta_of("producer") + "', not by sparsecl drift");
  Representations reps;
  int64_t num_layers = 0;
  try {
    num_layers = std::stoll(meta_of("layers"));
    reps.examples = std::stoll(meta_of("examples"));
    reps.eligible_tokens = std::stoll(meta_of("eligible_tokens"));
  } catch (const std::logic_error&) {
    throw Error("drift: " + path.string() + ": metadata layers/examples/eligible_tokens are not integers");
  }
  reps.model = meta_of("model");
  const auto need = [&](const std::string& name) {
    if (!file->contains(name)) throw Error("drift: " + path.string() + " lacks tensor '" + name + "'");
    return file->tensor(name).clone();  // owned copy: the mapping can go
  };
  reps.tokens = need("tokens");
  reps.token_ids = need("token_ids");
  if (reps.tokens.scalar_type() != at::kLong || reps.tokens.dim() != 2 || reps.tokens.size(1) != 2)
    throw Error("drift: " + path.string() + ": tensor 'tokens' must be [N, 2] I64");
  const int64_t N = reps.tokens.size(0);
  if (reps.token_ids.scalar_type() != at::kLong || reps.token_ids.dim() != 1 || reps.token_ids.size(0) != N)
    throw Error("drift: " + path.string() + ": tensor 'token_ids' must be [" + std::to_string(N) + "] I64");
  for (int64_t i = 0; i < num_layers; ++i) {
    const std::string name = "layer." + std::to_string(i);
    auto t = need(name);
    if (t.scalar_type() != at::kFloat || t.dim() != 2 || t.size(0) != N)
      throw Error("drift: " + path.string() + ": tensor '" + name + "' must be [" + std::to_string(N) + ", H] F32");
    reps.layers.push_back(std::move(t));
  }
  return reps;
}

}  // namespace sparsecl::eval
