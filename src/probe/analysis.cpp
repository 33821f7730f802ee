// The probe's statistics over collected DomainStats (DESIGN.md, "Probing"): top-K domain sets, set
// IoU beside its analytic random expectation and a permutation null over sequences, token-pair IoU of
// per-token top-k sets, and gradient-mass overlap. Everything heavy stays on the statistics' device
// (batched matmuls, top-k and popcount kernels); only scalars and the top-K id lists come back.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/iou.h"
#include "sparsecl/kernels/topk.h"
#include "sparsecl/probe/probe.h"

namespace sparsecl::probe {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::vector<int64_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// Intersection size of two K-sets from their IoU (iou = x / (2K - x)); exact for any K we meet.
int64_t intersection_from_iou(double iou, int64_t K) {
  return static_cast<int64_t>(std::llround(iou * 2.0 * static_cast<double>(K) / (1.0 + iou)));
}

// Per-row top-K sets of non-negative scores [P, I] as bitsets [P, W].
at::Tensor top_bits(const at::Tensor& scores, int64_t K) {
  return kernels::indices_to_bitset(kernels::topk_abs_indices(scores, K), scores.size(1));
}

std::pair<double, double> mean_std(const at::Tensor& x) {
  const at::Tensor d = x.to(at::kDouble);
  if (d.numel() == 0) return {0.0, 0.0};
  const double m = d.mean().item<double>();
  const double s = d.numel() > 1 ? d.std(/*unbiased=*/false).item<double>() : 0.0;
  return {m, s};
}

}  // namespace

Score parse_score(const std::string& name) {
  if (name == "mean_abs") return Score::MeanAbs;
  if (name == "freq") return Score::Freq;
  throw Error("probe.score: expected mean_abs or freq, got '" + name + "'");
}

std::string score_name(Score s) { return s == Score::MeanAbs ? "mean_abs" : "freq"; }

int64_t top_count(double ratio, int64_t I) {
  return std::clamp<int64_t>(static_cast<int64_t>(std::llround(ratio * static_cast<double>(I))), 1, I);
}

double random_iou(int64_t K, int64_t I) {
  return static_cast<double>(K) / static_cast<double>(2 * I - K);
}

uint64_t derive_seed(uint64_t seed, const std::string& stream) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64
  for (unsigned char c : stream) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return splitmix64(splitmix64(seed) ^ h);
}

at::Tensor top_set(const at::Tensor& score, int64_t K) {
  if (score.dim() != 1) throw Error("top_set: score must be [I]");
  at::Tensor s = score.scalar_type() == at::kDouble ? score.to(at::kFloat) : score;
  return kernels::topk_abs_indices(s.reshape({1, -1}), K).reshape({K}).to(at::kLong);  // [K] ascending
}

double set_iou(const at::Tensor& a, const at::Tensor& b, int64_t I) {
  const at::Tensor ba = kernels::indices_to_bitset(a.reshape({1, -1}), I);                  // [1, W]
  const at::Tensor bb = kernels::indices_to_bitset(b.reshape({1, -1}).to(a.device()), I);  // [1, W]
  // Exact counts (popcounts), so that the IoU is the exact rational in double precision.
  const at::Tensor both = at::cat({ba, bb});                                                // [2, W]
  const at::Tensor c = kernels::intersection_counts(both, both).to(at::kCPU, at::kLong);   // [2, 2]
  const int64_t inter = c[0][1].item<int64_t>(), uni = c[0][0].item<int64_t>() + c[1][1].item<int64_t>() - inter;
  return uni > 0 ? static_cast<double>(inter) / static_cast<double>(uni) : 0.0;
}

PermutationResult permutation_test(const at::Tensor& seq_a, const at::Tensor& tok_a, const at::Tensor& seq_b,
                                   const at::Tensor& tok_b, int64_t K, int64_t permutations, uint64_t seed,
                                   double observed_iou) {
  if (seq_a.dim() != 2 || seq_b.dim() != 2 || seq_a.size(1) != seq_b.size(1))
    throw Error("permutation_test: per-sequence sums must be [na, I] and [nb, I]");
  if (tok_a.numel() != seq_a.size(0) || tok_b.numel() != seq_b.size(0))
    throw Error("permutation_test: token counts must have one entry per sequence");
  const int64_t na = seq_a.size(0), nb = seq_b.size(0), n = na + nb, I = seq_a.size(1);
  const at::Device dev = seq_a.device();
  const at::Tensor S = at::cat({seq_a.to(at::kFloat), seq_b.to(dev, at::kFloat)});                     // [n, I]
  const at::Tensor tok = at::cat({tok_a.to(dev, at::kFloat).reshape({-1}), tok_b.to(dev, at::kFloat).reshape({-1})});  // [n]

  PermutationResult res;
  if (observed_iou < 0) {
    const at::Tensor ma = seq_a.to(at::kFloat).sum(0) / tok_a.to(dev, at::kFloat).sum();  // [I]
    const at::Tensor mb = seq_b.to(dev, at::kFloat).sum(0) / tok_b.to(dev, at::kFloat).sum();
    observed_iou = set_iou(top_set(ma, K), top_set(mb, K), I);
  }
  res.observed = observed_iou;
  if (permutations <= 0) return res;
  const int64_t observed_inter = intersection_from_iou(observed_iou, K);

  std::mt19937_64 rng(seed);
  std::vector<int64_t> perm(n);
  std::vector<double> ious;
  ious.reserve(permutations);
  int64_t at_most = 0;
  // Chunk so that [chunk, I] float32 temporaries stay around 64 MiB.
  const int64_t chunk = std::clamp<int64_t>((int64_t{16} << 20) / std::max<int64_t>(I, 1), 1, 1024);
  for (int64_t done = 0; done < permutations; done += chunk) {
    const int64_t P = std::min(chunk, permutations - done);
    at::Tensor M = at::zeros({P, n}, at::kFloat);  // [P, n]: 1 where the sequence goes to group A
    float* m = M.data_ptr<float>();
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t i = 0; i < n; ++i) perm[i] = i;
      // The first na entries of a Fisher-Yates shuffle (partial shuffle suffices).
      for (int64_t i = 0; i < na; ++i) std::swap(perm[i], perm[i + data::uniform_below(rng, n - i)]);
      for (int64_t i = 0; i < na; ++i) m[p * n + perm[i]] = 1.0f;
    }
    M = M.to(dev);
    const at::Tensor Mb = 1.0f - M;                                       // [P, n]
    const at::Tensor mean_a = M.mm(S) / M.mv(tok).unsqueeze(1);          // [P, I]
    const at::Tensor mean_b = Mb.mm(S) / Mb.mv(tok).unsqueeze(1);        // [P, I]
    const at::Tensor iou = kernels::pair_iou(top_bits(mean_a, K), top_bits(mean_b, K)).to(at::kCPU, at::kDouble);  // [P]
    const double* ip = iou.data_ptr<double>();
    for (int64_t p = 0; p < P; ++p) {
      ious.push_back(ip[p]);
      if (intersection_from_iou(ip[p], K) <= observed_inter) ++at_most;
    }
  }
  double sum = 0, sq = 0;
  for (double v : ious) sum += v;
  res.mean = sum / static_cast<double>(ious.size());
  for (double v : ious) sq += (v - res.mean) * (v - res.mean);
  res.std = std::sqrt(sq / static_cast<double>(ious.size()));
  res.permutations = permutations;
  res.p_value = static_cast<double>(1 + at_most) / static_cast<double>(1 + permutations);
  return res;
}

TokenOverlap token_overlap(const at::Tensor& bits_a, const std::vector<int64_t>& seq_a, const at::Tensor& bits_b,
                           const std::vector<int64_t>& seq_b, bool same, int64_t pairs, uint64_t seed) {
  TokenOverlap r;
  const int64_t Ra = bits_a.size(0), Rb = bits_b.size(0);
  if (pairs <= 0 || Ra == 0 || Rb == 0 || (same && Ra < 2)) return r;
  std::mt19937_64 rng(seed);
  std::vector<int64_t> ia(pairs), ib(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t i = static_cast<int64_t>(data::uniform_below(rng, Ra));
    int64_t j = static_cast<int64_t>(data::uniform_below(rng, Rb));
    if (same) {
      // Two different tokens, from different sequences when the reservoir has more than one.
      for (int tries = 0; tries < 64 && (j == i || seq_a[i] == seq_a[j]); ++tries)
        j = static_cast<int64_t>(data::uniform_below(rng, Rb));
      if (j == i) j = (i + 1) % Ra;
    }
    ia[p] = i;
    ib[p] = j;
  }
  const auto opts = at::TensorOptions().dtype(at::kLong);
  const at::Tensor xa = bits_a.index_select(0, at::tensor(ia, opts).to(bits_a.device()));  // [pairs, W]
  const at::Tensor xb = bits_b.index_select(0, at::tensor(ib, opts).to(bits_b.device()));  // [pairs, W]
  auto [m, s] = mean_std(kernels::pair_iou(xa, xb.to(xa.device())));
  r.mean = m;
  r.std = s;
  r.pairs = pairs;
  return r;
}

nlohmann::json analyze(const std::vector<DomainStats>& domains, const Settings& settings, uint64_t seed,
                       std::vector<std::pair<std::string, at::Tensor>>* raw, const std::string& prefix) {
  using json = nlohmann::json;
  if (domains.empty()) throw Error("probe: no domains to analyze");
  const int64_t L = static_cast<int64_t>(domains[0].layers.size());
  const int64_t I = domains[0].intermediate_size;
  const int64_t K = top_count(settings.top_ratio, I), k = domains[0].k;
  const double rnd = random_iou(K, I), rnd_tok = random_iou(k, I);
  const size_t D = domains.size();
  const bool grads = domains[0].layers.empty() ? false : domains[0].layers[0].grad.defined();

  if (raw) {
    for (const auto& d : domains) {
      raw->push_back({prefix + d.name + ".tokens", at::full({1}, d.num_tokens, at::kLong)});
      raw->push_back({prefix + d.name + ".seq_tokens", d.seq_tokens.to(at::kCPU, at::kLong)});
    }
  }

  json layers = json::array();
  for (int64_t l = 0; l < L; ++l) {
    json layer = {{"layer", l}};
    std::vector<at::Tensor> sets(D), gsets(D), gmass(D);
    json top = json::object(), gtop = json::object();
    for (size_t d = 0; d < D; ++d) {
      const DomainStats& ds = domains[d];
      const at::Tensor mean_abs = ds.mean_abs(l), freq = ds.freq(l);  // [I] each
      sets[d] = top_set(settings.score == Score::MeanAbs ? mean_abs : freq, K);
      top[ds.name] = to_vector(sets[d]);
      if (raw) {
        const std::string base = prefix + ds.name + ".layer" + std::to_string(l);
        raw->push_back({base + ".mean_abs", mean_abs.cpu()});
        raw->push_back({base + ".freq", freq.cpu()});
      }
      if (grads) {
        gmass[d] = ds.grad_mass(l);  // [I]
        gsets[d] = top_set(gmass[d], K);
        gtop[ds.name] = to_vector(gsets[d]);
        if (raw) raw->push_back({prefix + ds.name + ".layer" + std::to_string(l) + ".grad_mass", gmass[d].cpu()});
      }
    }
    layer["top"] = std::move(top);

    json pairs = json::array();
    double ratio_sum = 0;
    for (size_t a = 0; a < D; ++a) {
      for (size_t b = a + 1; b < D; ++b) {
        const DomainStats &A = domains[a], &B = domains[b];
        const double iou = set_iou(sets[a], sets[b], I);
        json p = {{"a", A.name}, {"b", B.name}, {"iou", iou}, {"iou_random", rnd}, {"ratio", iou / rnd},
                  {"intersection", intersection_from_iou(iou, K)}};
        if (settings.permutations > 0) {
          const PermutationResult pr = permutation_test(
              A.layers[l].seq_sum, A.seq_tokens.to(A.layers[l].seq_sum.device()), B.layers[l].seq_sum,
              B.seq_tokens.to(B.layers[l].seq_sum.device()), K, settings.permutations,
              derive_seed(seed, "perm/" + A.name + "/" + B.name + "/" + std::to_string(l)), iou);
          p["perm_mean"] = pr.mean;
          p["perm_std"] = pr.std;
          p["p_value"] = pr.p_value;
        } else {
          p["perm_mean"] = nullptr;
          p["perm_std"] = nullptr;
          p["p_value"] = nullptr;
        }
        ratio_sum += iou / rnd;
        pairs.push_back(std::move(p));
      }
    }
    layer["pairs"] = std::move(pairs);
    layer["mean_ratio"] = D > 1 ? ratio_sum / static_cast<double>(D * (D - 1) / 2) : 0.0;

    if (settings.token_pairs > 0) {
      json within = json::object(), across = json::array();
      for (size_t a = 0; a < D; ++a) {
        const DomainStats& A = domains[a];
        const TokenOverlap t =
            token_overlap(A.layers[l].reservoir, A.reservoir_seq, A.layers[l].reservoir, A.reservoir_seq, true,
                          settings.token_pairs, derive_seed(seed, "tok/" + A.name + "/" + std::to_string(l)));
        within[A.name] = {{"mean", t.mean}, {"std", t.std}, {"pairs", t.pairs}, {"ratio", t.mean / rnd_tok}};
        for (size_t b = a + 1; b < D; ++b) {
          const DomainStats& B = domains[b];
          const TokenOverlap u = token_overlap(
              A.layers[l].reservoir, A.reservoir_seq, B.layers[l].reservoir, B.reservoir_seq, false,
              settings.token_pairs, derive_seed(seed, "tok/" + A.name + "/" + B.name + "/" + std::to_string(l)));
          across.push_back({{"a", A.name}, {"b", B.name}, {"mean", u.mean}, {"std", u.std}, {"pairs", u.pairs},
                            {"ratio", u.mean / rnd_tok}});
        }
      }
      layer["token_overlap"] = {{"k", k}, {"iou_random", rnd_tok}, {"within", within}, {"across", across}};
    } else {
      layer["token_overlap"] = nullptr;
    }

    if (grads) {
      json gpairs = json::array();
      for (size_t a = 0; a < D; ++a) {
        for (size_t b = a + 1; b < D; ++b) {
          const double iou = set_iou(gsets[a], gsets[b], I);
          const at::Tensor& ga = domains[a].layers[l].grad;  // [H, I]
          const at::Tensor& gb = domains[b].layers[l].grad;
          const double dot = (ga.to(at::kDouble) * gb.to(at::kDouble)).sum().item<double>();
          const double na = ga.to(at::kDouble).norm().item<double>(), nb = gb.to(at::kDouble).norm().item<double>();
          const double cosine = na > 0 && nb > 0 ? dot / (na * nb) : 0.0;
          gpairs.push_back({{"a", domains[a].name}, {"b", domains[b].name}, {"iou", iou}, {"iou_random", rnd},
                            {"ratio", iou / rnd}, {"cosine", cosine}});
        }
      }
      layer["gradient"] = {{"top", gtop}, {"pairs", gpairs}};
    } else {
      layer["gradient"] = nullptr;
    }
    layers.push_back(std::move(layer));
  }
  return layers;
}

}  // namespace sparsecl::probe
