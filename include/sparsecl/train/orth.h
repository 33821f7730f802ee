// The `orth` fine-tuning method (DESIGN.md "Fine-tuning methods", Approach B; docs/train.md "orth"):
// LoRA whose down-projection A [r, in] lives in the complement of the input-space subspace that earlier
// tasks used, so that the new task's update B A x barely moves the outputs the old tasks rely on.
//
// Per adapted linear layer the method keeps an orthonormal basis U [in, k] (fp32) of earlier tasks'
// subspace, spanned by the top eigenvectors of a per-task covariance [in, in]:
//   gpm        the layer's input activations X [N, in] over real tokens:  C = X^T X      (Saha et al. 2021)
//   gradients  the accumulated gradient G = dL/dW [out, in] of the layer: C = G^T G
//   deltas     the trained weight delta D = scale * B A [out, in]:        C = D^T D
// (the eigenvectors of C are the right singular vectors of X, G or D). After a task, gpm_extend adds the
// directions of that task's C that U does not yet cover until `energy` of C's trace is captured.
//
// How the new task's A respects U (orth.mode):
//   project     A's init, its gradient (before each optimizer step) and A itself (after each step) are
//               projected onto the complement: A <- A (I - U U^T). Max |A U| stays at fp32 round-off.
//   init        InfLoRA (Liang & Li, CVPR 2024): A = the top-r eigenvectors of (I - U U^T) C_t (I - U U^T),
//               C_t the new task's input covariance, as rows, scaled by 1/sqrt(3), then frozen; only B
//               (zero init) trains. 1/sqrt(3) is the expected row norm of PEFT's kaiming_uniform(a=sqrt(5))
//               init (entries U(-1/sqrt(in), 1/sqrt(in)), variance 1/(3 in)) and the scale InfLoRA's
//               reference code uses (lora_A.weight = U[:, :r].T / sqrt(3)).
//   regularize  O-LoRA (Wang et al. 2023): loss += lambda * sum_{i<t} sum_layers |A_i A_t^T|_1, with the
//               earlier tasks' A_i saved by every stage (merging the adapter into the base loses them).
//
// Files a finished stage writes next to its adapter (finish_stage):
//   orth_bases.safetensors       module name -> U [in, k] fp32 (modules with k = 0 are absent)
//   orth_previous_A.safetensors  module name -> the A of every stage so far, stacked [sum_i r_i, in] fp32
//   orth.json                    basis kind, energy, mode, samples, and per module in, k, the share of the
//                                finished task's energy the new U captures
// The next stage reads the newest earlier stage's files (StageContext::previous.back()).
//
// Memory: the per-layer covariances are accumulated in fp32 on the model's device (activations are
// never kept), a group of layers at a time so that at most kBasisMemoryBudget bytes of statistics exist
// at once (one pass over the samples per group). Traces, projections and re-orthogonalisation are fp64;
// the eigendecompositions themselves fp32 (4-6x faster on a CPU, error below the 1e-6 noise floor), one
// per distinct (input, old basis): q/k/v and gate/up share theirs when their bases agree (always, for gpm).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sparsecl/data/dataset.h"
#include "sparsecl/train/methods.h"

namespace sparsecl::config {
class Config;
}

namespace sparsecl::train {

enum class OrthBasis { Gpm, Gradients, Deltas };
enum class OrthMode { Project, Init, Regularize };
OrthBasis parse_orth_basis(const std::string& name);  // "gpm" | "gradients" | "deltas"; Error naming orth.basis
OrthMode parse_orth_mode(const std::string& name);    // "project" | "init" | "regularize"; Error naming orth.mode
std::string orth_basis_name(OrthBasis basis);
std::string orth_mode_name(OrthMode mode);

// Statistics of the basis passes kept in memory at once (bytes); layers are grouped to stay below it.
inline constexpr int64_t kBasisMemoryBudget = int64_t{4} << 30;

struct OrthOptions {
  OrthBasis basis = OrthBasis::Gpm;
  OrthMode mode = OrthMode::Project;
  double energy = 0.97;        // orth.energy: share of a task's covariance trace the basis must capture
  double lambda = 0.5;         // orth.lambda: weight of the O-LoRA penalty
  int64_t basis_samples = 128; // orth.basis_samples: records (seeded subsample) of a task's data per basis pass
  int64_t batch_size = 4;      // sequences per forward in the basis passes (train.batch_size)
  int64_t pad_id = 0;
  uint64_t seed = 0;           // the subsample and the LoRA init (train.seed)
  int64_t stage_index = 0;     // earlier stages of the sequence (StageContext::previous.size()). Stage 0
                               // draws A like lora with `seed`; stage t > 0 from a seed mixed with t, so
                               // that the tasks' As do not all start equal (one train.seed per run would
                               // otherwise give every stage the same init: O-LoRA's penalty at its maximum)
  int64_t memory_budget = kBasisMemoryBudget;  // bytes of statistics per pass (a group of layers each)
};

// GPM's basis extension (Saha et al. 2021, "Gradient Projection Memory"): U [in, k] orthonormal (k may be
// 0; an undefined tensor counts as k = 0), `covariance` [in, in] = R R^T of a task's representations R
// [in, N]. Adds the top eigenvectors of (I - U U^T) C (I - U U^T) (the residual's left singular vectors)
// until ||U^T R||^2 + sum of their eigenvalues >= energy * ||R||^2 = energy * trace(C). Directions with
// less than 1e-6 of trace(C) are treated as numerical noise and never added. Computed on C's
// device; returns [in, k'] fp32 on C's device, k' >= k, the first k columns equal to U, orthonormal.
at::Tensor gpm_extend(const at::Tensor& U, const at::Tensor& covariance, double energy);

// InfLoRA's A [r, in] (fp32, on C's device): the top-r eigenvectors of (I - U U^T) C (I - U U^T) as rows,
// exactly orthogonal to U (re-projected), each row of norm 1/sqrt(3). Error when fewer than r directions
// remain outside U.
at::Tensor inflora_down(const at::Tensor& U, const at::Tensor& covariance, int64_t r);

// A (I - U U^T): the rows of A [r, in] without their components in span(U [in, k]). U may be undefined or
// have k = 0 (A is returned as is).
at::Tensor project_out(const at::Tensor& A, const at::Tensor& U);

// The input covariance X^T X [in, in] (fp32, on the decoder's device) of every module in `modules`
// ("model.layers.0.self_attn.q_proj", ...), over the real (non-padding) tokens of `examples` through the
// decoder as it is (adapters included, no dropout). Modules that share an input (q/k/v, gate/up) share the
// tensor. This is the GPM statistic; exposed for tests. Computed a group of layers per pass (memory_budget),
// but all of them are returned.
std::map<std::string, at::Tensor> input_covariances(model::Decoder& decoder, const std::vector<std::string>& modules,
                                                    const std::vector<data::Example>& examples, int64_t batch_size,
                                                    int64_t pad_id, int64_t memory_budget = kBasisMemoryBudget);

// Reads `stage_dir`/orth_bases.safetensors: module name -> U [in, k] fp32 CPU.
std::map<std::string, at::Tensor> load_orth_bases(const std::filesystem::path& stage_dir);

class OrthMethod : public LoraMethod {
 public:
  // `stage_examples`: the new task's records, used by mode init (InfLoRA) for its activations (a seeded
  // subsample of basis_samples of them is kept). `previous_stage`: the newest earlier stage's output
  // directory, whose bases (and earlier As) this stage respects; empty for the first stage.
  OrthMethod(model::LoraConfig lora, OrthOptions options, const std::vector<data::Example>& stage_examples = {},
             const std::filesystem::path& previous_stage = {});

  std::string name() const override { return "orth"; }
  NamedTensors setup(model::Decoder& decoder) override;
  void before_optimizer_step(model::Decoder& decoder, int64_t step) override;
  void after_optimizer_step(model::Decoder& decoder, int64_t step) override;
  at::Tensor extra_loss(model::Decoder& decoder, int64_t step) override;
  void save_state(const std::filesystem::path& dir) const override;
  void load_state(const std::filesystem::path& dir) override;
  // Extends the bases with the finished task's subspace (basis kind per options) over a seeded subsample
  // of `examples`, appends this stage's A (read from the adapter in `stage_dir`, which save_output wrote)
  // to the earlier ones, and writes orth_bases.safetensors, orth_previous_A.safetensors and orth.json
  // into `stage_dir`. The decoder is the model after the stage (its adapter attached or merged).
  void finish_stage(model::Decoder& decoder, const std::vector<data::Example>& examples,
                    const std::filesystem::path& stage_dir) override;
  // merge_into_base and save_output: LoraMethod's (model::merge_lora; the PEFT adapter).

  const OrthOptions& options() const { return options_; }
  // Earlier tasks' bases, module -> U [in, k] fp32 CPU (after finish_stage: including this task's).
  const std::map<std::string, at::Tensor>& bases() const { return bases_; }
  // Earlier tasks' A matrices stacked per module, [sum_i r_i, in] fp32 CPU (after finish_stage: with this one).
  const std::map<std::string, at::Tensor>& previous_A() const { return previous_A_; }

 private:
  OrthOptions options_;
  std::vector<data::Example> init_examples_;          // mode init: the new task's subsample
  std::map<std::string, at::Tensor> bases_;           // module -> U [in, k] fp32 CPU (k > 0 only)
  std::map<std::string, at::Tensor> previous_A_;      // module -> [sum_i r_i, in] fp32 CPU
  // Set by setup(): the adapted modules, their trainable A / B (handles sharing the decoder's tensors),
  // and device copies of what the steps use.
  std::vector<std::string> modules_;
  std::map<std::string, at::Tensor> A_, B_;
  std::map<std::string, at::Tensor> device_bases_, device_previous_A_;
  void refresh_device_copies(at::Device device);
};

// orth.* + lora.* + train.batch_size from the resolved config; the stage's examples and the newest
// earlier stage's directory from `ctx`.
std::unique_ptr<Method> make_orth_method(const config::Config& cfg, const StageContext& ctx);

}  // namespace sparsecl::train
