// The `mask` fine-tuning method (Approach A, activation-mask tuning; DESIGN.md "Fine-tuning methods",
// docs/train.md "mask"): before training task t, probe task t's data with the H1 probe and, per layer,
// pick the top `mask.ratio` MLP neurons S_t by the probe's score (probe.score, mean_abs by default).
// Only those neurons change: rows j in S_t of gate_proj and up_proj, columns j in S_t of down_proj.
// With mask.heads, the attention heads with the largest output norm are trained too (their rows of
// q_proj and columns of o_proj).
//
// The update is stored compactly: per projection a dense delta of |S_t| rows ([K, in]) or columns
// ([out, K]) plus the indices (model::IndexedDelta on the Linear), not a full-size masked copy. The
// base weights stay frozen, so every weight outside the selection is bit for bit the base model's
// after merging. The selection reuses the probe's own code (probe::collect_domain_stats,
// DomainStats::score, probe::top_set), so the trained neurons are exactly the probe's domain set.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "sparsecl/probe/probe.h"
#include "sparsecl/train/methods.h"
#include "sparsecl/train/trainer.h"

namespace sparsecl::config {
class Config;
}

namespace sparsecl::train {

struct MaskOptions {
  double ratio = 0.05;            // mask.ratio: K = probe::top_count(ratio, intermediate_size) neurons per layer
  bool exclude_previous = false;  // mask.exclude_previous: never reuse neurons (and heads) of earlier stages
  bool heads = false;             // mask.heads: also train the heads with the largest output norm
  double head_ratio = 0.1;        // mask.head_ratio: Kh = probe::top_count(head_ratio, num_attention_heads)
  probe::Settings probe;          // probe.* (score, max_samples, batch_size, max_length), top_ratio = ratio

  // mask.* and probe.* from a resolved config (probe::Settings::from_config, then top_ratio = mask.ratio;
  // the permutation null, token pairs and gradients are not computed for a selection).
  static MaskOptions from_config(const config::Config& cfg);
};

// What one stage trains, per layer (int64 CPU tensors, ascending).
struct MaskSelection {
  std::vector<at::Tensor> neurons;  // [K]: MLP neurons (gate/up rows, down columns)
  std::vector<at::Tensor> heads;    // [Kh]: attention heads (q_proj rows, o_proj columns); empty without heads
  nlohmann::json to_json() const;   // {"layers": [{"layer", "k", "neurons", "heads"}]}
  // Validates the structure; `source` names the file in errors.
  static MaskSelection from_json(const nlohmann::json& j, const std::string& source);
};

// The probe examples of a stage: all of `examples` in their order when there are at most
// settings.max_samples (or max_samples is 0), else a seeded subsample of max_samples
// (data::seeded_permutation with probe::derive_seed(seed, "mask/probe")); each truncated to
// settings.max_length tokens (0 = no limit).
std::vector<data::Example> mask_probe_examples(const std::vector<data::Example>& examples,
                                               const probe::Settings& settings, uint64_t seed);

// Per layer, the mean over real tokens of the L2 norm of each head's slice of the o_proj input
// (HookPoint::AttnOutput, [B, T, nh*D] viewed as [B, T, nh, D]): [nh] float32 CPU per layer. One
// no-grad forward pass over `examples` in batches of `batch_size` (no LM head).
std::vector<at::Tensor> attention_head_norms(const model::Decoder& decoder, const std::vector<data::Example>& examples,
                                             int64_t batch_size, int64_t pad_id);

class MaskMethod : public Method {
 public:
  // `context.examples` (the stage's training examples) must outlive the method; `context.previous`
  // names the earlier stages' output directories (their mask.json, for exclude_previous).
  MaskMethod(MaskOptions options, StageContext context);

  std::string name() const override { return "mask"; }
  // Zero fp32 deltas of the selection's shapes (K rows of gate/up_proj, K columns of down_proj, Kh*D
  // rows of q_proj / columns of o_proj), named "<module>.delta"; attached by before_training().
  NamedTensors setup(model::Decoder& decoder) override;
  // Selects (probe) unless load_state() restored a selection, then attaches the deltas to the Linears.
  void before_training(model::Decoder& decoder) override;
  // The selection (mask_selection.json) into / out of a checkpoint directory.
  void save_state(const std::filesystem::path& dir) const override;
  void load_state(const std::filesystem::path& dir) override;
  // mask_deltas.safetensors ("<module>.index" int64 [K], "<module>.delta" fp32) + mask.json.
  void save_output(model::Decoder& decoder, const std::filesystem::path& dir) const override;
  bool dense() const override { return true; }  // the deltas are base-weight updates: train.lr_dense
  // W[index, :] += delta (rows) / W[:, index] += delta (columns); the deltas leave the Linears.
  void merge_into_base(model::Decoder& decoder) override;

  // Probes the stage's examples and chooses the neurons (and heads) per layer, excluding those of the
  // earlier stages with exclude_previous. before_training() calls it when no checkpoint gave a selection.
  void select(model::Decoder& decoder);
  const MaskSelection& selection() const { return selection_; }
  bool selected() const { return selected_; }
  bool probed() const { return probed_; }  // select() ran in this object (false on a resumed run)
  const MaskOptions& options() const { return options_; }

 private:
  struct Target {
    std::string module;  // "model.layers.0.mlp.gate_proj"
    int64_t layer = 0;
    bool heads = false;    // indexed by the head selection (q_proj / o_proj), else by the neurons
    bool columns = false;  // down_proj / o_proj
    at::Tensor delta;      // fp32 leaf: [K, in] or [out, K]
  };
  at::Tensor target_index(const Target& t) const;  // [K] int64 CPU: rows / columns of the target
  nlohmann::json output_json() const;              // mask.json

  MaskOptions options_;
  StageContext context_;
  MaskSelection selection_;
  bool selected_ = false, probed_ = false;
  int64_t head_dim_ = 0, probe_examples_ = 0, probe_tokens_ = 0;
  std::vector<Target> targets_;
};

// The exported entry points (the driver and the CLI call these).
std::unique_ptr<Method> make_mask_method(const config::Config& cfg, const StageContext& ctx);
// Loads a finished mask stage's mask_deltas.safetensors + mask.json from `stage_dir`, validates them
// against the decoder, and folds the deltas into the base weights.
void apply_mask_output(model::Decoder& decoder, const std::filesystem::path& stage_dir);

}  // namespace sparsecl::train
