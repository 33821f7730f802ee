// The H1 probe (DESIGN.md, "Probing"): do different domains use different MLP neurons?
//
// One streaming pass per (model, domain) through the Decoder's ActivationHook at
// HookPoint::MlpIntermediate (h = act(gate(x)) * up(x), [B,T,I], the input of down_proj) collects, per
// layer and on the model's device (nothing goes to the host per batch; activations are never kept):
//   - sum |h_j| and top-k membership counts over real tokens (kernels::accumulate_neuron_stats),
//     giving mean_abs[j] and freq[j] (k = top_ratio * I);
//   - per-SEQUENCE sums of |h_j| ([n_seq, I] fp32) and token counts, for the permutation null;
//   - a seeded reservoir of per-token top-k bitsets ([R, I/64] int64), for token-level overlap;
//   - optionally dL/dW_down accumulated over the batches (gradient overlap).
// Analysis then gives, per layer: each domain's top-K set S(d,l) (K = top_ratio * I, largest score,
// ties -> lower index), and per domain pair the IoU, its analytic random expectation K/(2I-K), the
// ratio, and a permutation null over sequences (see permutation_test); token-pair IoUs within and across
// domains; gradient-mass top-K IoU and gradient cosine.
//
// run_probe() drives several models x several domains and writes probe.json + probe_stats.safetensors
// (schema in docs/probe.md). The pieces are exposed separately for tests and for the trainer's
// activation-mask method, which needs the same top-K sets.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "sparsecl/data/dataset.h"

namespace sparsecl::model {
class Decoder;
}
namespace sparsecl::config {
class Config;
}

namespace sparsecl::probe {

enum class Score { MeanAbs, Freq };
Score parse_score(const std::string& name);  // "mean_abs" | "freq"; Error otherwise
std::string score_name(Score s);

struct Settings {
  double top_ratio = 0.05;        // K = round(top_ratio * I) for domain sets, k likewise per token
  Score score = Score::MeanAbs;   // what ranks neurons for the domain set S(d,l)
  int64_t max_samples = 256;      // sequences per domain (seeded subsample; 0 = all)
  int64_t batch_size = 8;
  int64_t max_length = 512;       // tokens per sequence (truncated; 0 = no limit)
  int64_t permutations = 100;     // permutation null draws per (layer, pair); 0 = skip
  int64_t token_pairs = 2000;     // sampled token pairs per (layer, domain) and per (layer, pair); 0 = skip
  int64_t token_reservoir = 4096; // per-token bitsets kept per (domain, layer)
  bool gradient_overlap = false;  // also accumulate dL/dW_down per domain
  uint64_t seed = 0;
  std::string device = "cpu";     // cpu | cuda | cuda:N
  std::string device_map;         // pipeline placement over several devices ("", "auto", "cuda:0,cuda:1")
  std::string dtype = "float32";  // float32 | bfloat16 | float16
  bool progress = true;           // progress bar on stderr

  nlohmann::json to_json() const;
  void validate() const;  // Error naming the setting ("probe.top_ratio" ...) on a bad value
  // probe.{top_ratio, score, max_samples, batch_size, max_length, permutations, token_pairs, gradients},
  // seed = seeds[0], device, dtype from a resolved config (the one mapping; CLI flags override the keys).
  static Settings from_config(const config::Config& cfg);
};

struct Domain {
  std::string name;  // [A-Za-z0-9_-]+ (it becomes part of tensor names)
  std::filesystem::path file;
};

// K = round(ratio * I), at least 1 and at most I.
int64_t top_count(double ratio, int64_t I);
// E[IoU] of two independent uniformly random K-subsets of I, ~ K / (2I - K).
double random_iou(int64_t K, int64_t I);

// ---- streaming collection -------------------------------------------------------------------------

struct LayerStats {
  at::Tensor sum_abs;     // [I] float64: sum over real tokens of |h_j|
  at::Tensor topk_count;  // [I] int64: real tokens whose top-k contains j
  at::Tensor seq_sum;     // [n_seq, I] float32: per-sequence sum of |h_j| (score mean_abs) or of
                          // top-k membership (score freq): the exchangeable units of the permutation null
  at::Tensor reservoir;   // [R, ceil(I/64)] int64: per-token top-k bitsets of sampled tokens
  at::Tensor grad;        // [H, I] float32: mean over loss tokens of dL/dW_down (gradient overlap only)
};

struct DomainStats {
  std::string name;
  int64_t intermediate_size = 0, k = 0;
  int64_t num_sequences = 0, num_tokens = 0;
  at::Tensor seq_tokens;                  // [n_seq] float32 on the device: real tokens per sequence
  std::vector<int64_t> reservoir_seq;     // sequence index of each filled reservoir slot (host)
  double loss = 0.0;                      // mean LM loss (gradient overlap only)
  int64_t loss_tokens = 0;
  double seconds = 0.0;
  std::vector<LayerStats> layers;

  at::Tensor mean_abs(int64_t layer) const;  // [I] float32
  at::Tensor freq(int64_t layer) const;      // [I] float32
  at::Tensor score(int64_t layer, Score s) const;
  at::Tensor grad_mass(int64_t layer) const;  // [I] float32: ||dL/dW_down[:, j]|| (undefined without gradients)
};

// Runs `examples` through `decoder` in batches of settings.batch_size and collects DomainStats.
// Without settings.gradient_overlap it runs under NoGradGuard with no LM head; with it, only the
// down_proj weights require grad (every other parameter's flag is cleared and all are restored after).
DomainStats collect_domain_stats(model::Decoder& decoder, const std::vector<data::Example>& examples,
                                 const std::string& name, const Settings& settings, int64_t pad_id,
                                 uint64_t seed);

// ---- analysis --------------------------------------------------------------------------------------

// The K neurons with the largest score ([I], any float dtype, non-negative), ties -> lower index.
// Returns int64 [K] in ascending index order, on score's device.
at::Tensor top_set(const at::Tensor& score, int64_t K);

// IoU of two index sets (int [K] each, any device) over I neurons.
double set_iou(const at::Tensor& a, const at::Tensor& b, int64_t I);

struct PermutationResult {
  double observed = 0.0;  // IoU of the two groups' top-K sets as given
  double mean = 0.0, std = 0.0, p_value = 1.0;
  int64_t permutations = 0;
};

// Permutation null for the overlap of two domains' top-K sets, over SEQUENCES (tokens inside one
// sequence are dependent; sequences are the exchangeable unit under H0 "the domain label does not
// matter"). seq_a [na, I], seq_b [nb, I]: per-sequence sums of the score quantity (|h| or top-k
// membership) in float32; tok_a [na], tok_b [nb]: real tokens per sequence. Each draw pools the na+nb
// sequences, assigns na of them to group A at random (the rest to B), recomputes both groups'
// token-weighted means ([P,n] x [n,I] matmuls, chunked), their top-K sets and the IoU.
// p_value = (1 + #{perm IoU <= observed}) / (1 + P): ONE-SIDED for LOW overlap (H1 says domains
// overlap less than chance reassignment would give); compared via exact intersection counts.
// `observed_iou` < 0 means: compute it from the given groups.
PermutationResult permutation_test(const at::Tensor& seq_a, const at::Tensor& tok_a, const at::Tensor& seq_b,
                                   const at::Tensor& tok_b, int64_t K, int64_t permutations, uint64_t seed,
                                   double observed_iou = -1.0);

struct TokenOverlap {
  double mean = 0.0, std = 0.0;
  int64_t pairs = 0;
};
// Mean IoU of per-token top-k sets for `pairs` token pairs sampled (seeded) from two reservoirs
// ([Ra, W], [Rb, W] int64 bitsets; seq_* the sequence of each row). When `same` (one domain), pairs
// are of two different rows from different sequences where the reservoir allows it.
TokenOverlap token_overlap(const at::Tensor& bits_a, const std::vector<int64_t>& seq_a, const at::Tensor& bits_b,
                           const std::vector<int64_t>& seq_b, bool same, int64_t pairs, uint64_t seed);

// Seed for a named sub-stream (SplitMix64 of seed and the stream's FNV-1a hash): every random choice
// of the probe derives from Settings::seed through it, so results do not depend on evaluation order.
uint64_t derive_seed(uint64_t seed, const std::string& stream);

// The per-layer JSON of one model from its domains' stats ("layer", "top", "pairs", "token_overlap",
// "gradient"); see docs/probe.md. Also appends the raw tensors for probe_stats.safetensors under
// "<prefix><domain>.layer<i>.*".
nlohmann::json analyze(const std::vector<DomainStats>& domains, const Settings& settings, uint64_t seed,
                       std::vector<std::pair<std::string, at::Tensor>>* raw, const std::string& prefix);

// ---- the whole run ----------------------------------------------------------------------------------

struct RunInfo {
  nlohmann::json config = nullptr;  // the resolved config (or CLI arguments) for provenance
  std::string config_hash;          // provenance.config_hash; FNV-1a 64 of config.dump() when empty
};

// Probes every model on every domain and writes DIR/probe.json and DIR/probe_stats.safetensors
// atomically. Returns the probe.json document.
nlohmann::json run_probe(const std::vector<std::filesystem::path>& models, const std::vector<Domain>& domains,
                         const Settings& settings, const std::filesystem::path& output_dir,
                         const RunInfo& info = {});

}  // namespace sparsecl::probe
