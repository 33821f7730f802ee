// Representation drift (docs/DESIGN.md "Evaluation and continual-learning metrics", docs/report.md
// "Representation drift"): how far the hidden states of a fixed general-knowledge probe set
// (data.general.probe, eval.drift_samples records) move between the base model and the model after a
// stage, per hidden-state index (0 = the embeddings, L = after the final norm: Decoder::forward's
// hidden_states, L+1 tensors [B,T,H]).
//
// Representation: one row per real TOKEN, the same seeded sample of tokens at every layer and for every
// model (the sample depends only on the examples and the seed, never on the model, so the rows of
// base and after are paired token by token), capped at `max_tokens` rows (default 1024). Why tokens and
// not one mean-pooled vector per sequence: 128 records would give N = 128 points in H = 576..4096
// dimensions; with N << H the centred Gram matrices of any two representations are both close to a
// multiple of the centring matrix, so linear CKA is biased towards 1 even for unrelated features, and
// the 90%-energy PCA subspace could have at most N - 1 directions. Tokens give N in the thousands at the
// same cost of forwards; the cap bounds the memory (an 8B model, H = 4096, 33 hidden states:
// 33 x 1024 x 4096 x 4 B = 0.55 GB per model on the host, fp32) and the Gram/eigen work. The first token
// of every sequence is left out: it is the attention sink whose "massive activations" (a few dimensions
// hundreds of times larger than the rest) would otherwise dominate the variance, hence both the PCA
// subspace and CKA.
//
// Per hidden-state index, with X = base rows, Y = after rows ([N, H], same tokens):
//   cka                  linear CKA (Kornblith et al. 2019) of the column-centred X and Y:
//                        ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) = HSIC(K,L)/sqrt(HSIC(K,K) HSIC(L,L))
//                        with K = X X^T, L = Y Y^T (computed in whichever of feature or sample space is
//                        smaller; fp64). 1 = the same up to rotation and isotropic scaling.
//   subspace_similarity  the top-k PCA subspaces of Xc and of Yc, each with k at `energy` of its variance
//                        (k = smallest number of leading singular values whose squares reach energy x the
//                        total; from the eigen-decomposition of the smaller of XcᵀXc and XcXcᵀ): the mean of cos^2 over the min(k, k_after) principal angles
//                        (Björck & Golub) = ||U^T V||_F^2 / min(k, k_after) for orthonormal bases U, V. 1 =
//                        one subspace contains the other, 0 = orthogonal. k and k_after are reported.
//   inside_share         the share of the displacement D = Y - X (raw, not centred: a shift of the mean is
//                        part of how far the tokens moved) that lies in the BASE model's top-k subspace:
//                        ||D U||_F^2 / ||D||_F^2. NaN (null in JSON) when D = 0: nothing moved. Read it
//                        beside relative_displacement: a displacement at rounding level (two forwards of
//                        the same weights with different batching/padding: ~1e-7 in fp32) has a share
//                        too, and it means nothing. Collect base and after with the same batch size.
//   relative_displacement  ||D||_F / ||X||_F (0 when nothing moved).
// NaN results (zero variance, zero displacement) become null in JSON and are skipped in the means.
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
namespace sparsecl::text {
class Tokenizer;
}

namespace sparsecl::eval {

struct Representations {
  std::vector<at::Tensor> layers;  // [N, H] fp32 CPU per hidden-state index (L+1 entries)
  at::Tensor tokens;               // [N, 2] int64 CPU: (example index, position) of each row, ascending
  at::Tensor token_ids;            // [N] int64 CPU: the input id at that position (checks the pairing)
  int64_t examples = 0;            // examples the tokens were drawn from
  int64_t eligible_tokens = 0;     // tokens the sample was drawn from (before the cap)
  std::string model;               // the decoder's source directory (for messages)
};

struct CollectOptions {
  int64_t max_tokens = 1024;      // rows kept per layer (seeded sample); 0 = every eligible token
  bool skip_first_token = true;   // leave position 0 (the attention sink) out of the sample
};

// Runs `examples` through `decoder` (no autograd, batches of `batch_size` right-padded with `pad_id`)
// and keeps the sampled tokens' hidden states at every index. The token sample is a seeded
// Fisher-Yates permutation (std::mt19937_64(probe::derive_seed(seed, "drift/tokens"))) of the eligible
// tokens, the first max_tokens kept, in (example, position) order. Throws sparsecl::Error for no
// examples or no eligible token.
Representations collect_representations(const model::Decoder& decoder, const std::vector<data::Example>& examples,
                                        int64_t batch_size, int64_t pad_id, uint64_t seed,
                                        const CollectOptions& options = {});

// The probe-set examples: the first `max_samples` records of `file` (file order, so every seed and stage
// sees the same records; 0 = all). Multiple-choice records {"question","choices","answer"} (the
// bundled data/general/mmlu_probe.jsonl) become the text "Question: <q>\nAnswer: <correct choice>"
// (the eval's MC prompt plus its answer) encoded with the tokenizer's specials; any other record form
// goes through data::load_jsonl (plain chat fallback on). Sequences keep their first `max_length` tokens
// (0 = no limit). `tokenizer` may be null only for {"ids"} files.
std::vector<data::Example> drift_examples(const std::filesystem::path& file, const text::Tokenizer* tokenizer,
                                          int64_t max_samples, int64_t max_length);

// Per hidden-state index: {"layer", "cka", "subspace_similarity", "inside_share", "relative_displacement",
// "k", "k_after"}; plus "mean_cka", "mean_subspace_similarity", "mean_inside_share" (over the layers with
// a finite value), "energy", "tokens" (N), "examples". Throws sparsecl::Error when the two were not
// collected on the same tokens (shape, token positions or ids differ) or energy is not in (0, 1].
nlohmann::json drift(const Representations& base, const Representations& after, double energy);

// The three measures on plain matrices (exposed for tests and for analysis of saved representations).
// X [N, p], Y [N, q] on any device/dtype; computed in fp64 on the CPU. NaN when a side has no variance.
double linear_cka(const at::Tensor& X, const at::Tensor& Y);
// Orthonormal basis [H, k] (fp64) of the top-k principal directions of the column-centred X [N, H],
// k = the smallest count whose squared singular values reach `energy` of the total (0 when X has no
// variance).
at::Tensor pca_basis(const at::Tensor& X, double energy);
// Mean cos^2 of the principal angles between span(U) and span(V) (U [H, a], V [H, b] orthonormal
// columns): ||U^T V||_F^2 / min(a, b). NaN when a or b is 0.
double subspace_similarity(const at::Tensor& U, const at::Tensor& V);
// ||D U||_F^2 / ||D||_F^2 for D [N, H], U [H, k] orthonormal; NaN when D = 0 (or k = 0 with D = 0).
double inside_share(const at::Tensor& D, const at::Tensor& U);

// safetensors with "layer.<i>" [N,H] F32, "tokens" [N,2] I64, "token_ids" [N] I64 and metadata
// (producer, layers, examples, eligible_tokens, model); written atomically. Loading validates the
// producer, every layer's presence and shape, and names the file in errors.
void save_representations(const Representations& reps, const std::filesystem::path& path);
Representations load_representations(const std::filesystem::path& path);

}  // namespace sparsecl::eval
