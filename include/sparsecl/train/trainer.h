// The one trainer behind every fine-tuning method (DESIGN.md "Fine-tuning methods", docs/train.md).
//
// A method decides WHAT is trainable and may reshape gradients / parameters around the optimizer step;
// the trainer owns everything else: the seeded data order, micro-batching with gradient accumulation,
// the loss (response tokens only, as data::make_batch labels them), AdamW (decoupled weight decay, our
// own implementation so that its state is plain tensors in a safetensors checkpoint), warmup + cosine
// learning rate, global-norm clipping, bf16 autocast on CUDA, the JSON Lines step log, the progress bar,
// atomic resumable checkpoints and the stage manifest.
//
// Data parallel (torchrun / srun, dist.h): a step has grad_accum x world micro-batches, micro-batch m
// on rank m % world; gradients are summed over the ranks in buckets during the last backward
// (dist::GradientReducer), so W ranks with grad_accum A take the steps one process takes with A x W.
// Rank 0 writes the log, checkpoints (with every rank's generator states) and outputs; a resume needs
// the same number of processes.
//
// Step order (one optimizer step = grad_accum micro-batches):
//   for each micro-batch m:  loss_m = chunked_causal_lm_loss(forward(m).last_hidden, head) [+ extra_loss()]
//                            backward(loss_m * label_tokens_m / label_tokens_step)   (token-weighted mean)
//   method.before_optimizer_step()   gradient masking / projection
//   clip the global gradient norm (train.clip)
//   AdamW update with lr(step)
//   method.after_optimizer_step()    re-projection of the parameters
//
// Determinism: on the CPU, one seed gives the same loss curve bit for bit, including across a
// checkpoint + resume (the checkpoint holds the trainable tensors, the AdamW moments, the step, the
// data cursor and the CPU/CUDA generator states).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "sparsecl/common/progress.h"
#include "sparsecl/data/dataset.h"
#include "sparsecl/model/decoder.h"

namespace sparsecl::config {
class Config;
}

namespace sparsecl::train {

// A trainable tensor: its stable name (the key it has in checkpoints) and the fp32 leaf itself
// (requires_grad; the trainer reads .grad() and updates it in place under NoGradGuard).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor*>>;

// The plug-in interface of a fine-tuning method. Only setup() is required.
class Method {
 public:
  virtual ~Method() = default;
  virtual std::string name() const = 0;

  // Makes the decoder trainable the method's way (attaches adapters, marks weights) and returns the
  // trainable fp32 leaves, in a fixed order. Called once, after at::manual_seed(train.seed), before
  // any checkpoint is restored (a restore then overwrites the values by name).
  virtual NamedTensors setup(model::Decoder& decoder) = 0;

  // After the gradients of a whole step are accumulated, before clipping and the AdamW update:
  // gradient masking (mask, MIGU) or projection (orth `project`). `step` is 0-based.
  virtual void before_optimizer_step(model::Decoder& /*decoder*/, int64_t /*step*/) {}
  // After the AdamW update: re-projection of the parameters (orth `project`).
  virtual void after_optimizer_step(model::Decoder& /*decoder*/, int64_t /*step*/) {}
  // A differentiable scalar added to the loss of the first micro-batch of every step (e.g. the O-LoRA
  // penalty lambda * sum_i |A_i A_t^T|); undefined tensor = none. It is not part of the logged loss.
  virtual at::Tensor extra_loss(model::Decoder& /*decoder*/, int64_t /*step*/) { return {}; }
  // An activation hook installed in every training forward (MIGU's activation norms); nullptr = none.
  virtual const model::ActivationHook* activation_hook() { return nullptr; }
  // Once per train() call, after setup() and (on a resume) after the checkpoint and load_state() were
  // restored, before the first step: preparation a resume must not redo (mask: probe the stage's data
  // and select its neurons, unless load_state() restored the selection).
  virtual void before_training(model::Decoder& /*decoder*/) {}
  // With every micro-batch (host tensors, as data::make_batch built them) just before its forward pass
  // (MIGU: which positions are real tokens, from batch.attention_mask).
  virtual void before_forward(const data::Batch& /*batch*/) {}

  // Method state beyond the trainable tensors (masks, bases, ...) in a checkpoint directory. The
  // trainer saves and restores the trainable tensors and the optimizer itself.
  virtual void save_state(const std::filesystem::path& /*dir*/) const {}
  virtual void load_state(const std::filesystem::path& /*dir*/) {}

  // The stage's final product, written at the top level of the output directory (the PEFT adapter for
  // lora, a loadable HF checkpoint for full). Must write atomically (files via temporaries).
  virtual void save_output(model::Decoder& decoder, const std::filesystem::path& dir) const = 0;

  // Which peak learning rate the method uses: train.lr (adapters) or train.lr_dense (base weights).
  virtual bool dense() const { return false; }

  // ---- sequential stages (the `run` driver and the finetune-* commands call these after train()) ----
  // After the stage's training finished and its output was written: record what later stages must
  // respect (orth: extend the basis of earlier tasks' subspace with this task's; mask: the neurons
  // used) into `stage_dir`, from the stage's own training examples. Default: nothing.
  virtual void finish_stage(model::Decoder& /*decoder*/, const std::vector<data::Example>& /*examples*/,
                            const std::filesystem::path& /*stage_dir*/) {}
  // Folds the stage's trained state into the decoder's base weights and removes any extra structure
  // (lora / orth: merge the adapter; mask: add the deltas into their rows / columns), so that the
  // decoder is plainly "the model after this stage". full / migu train the weights in place: nothing.
  virtual void merge_into_base(model::Decoder& /*decoder*/) {}
};

struct TrainOptions {
  int64_t steps = 100;          // optimizer steps of the stage (the schedule's length)
  int64_t batch_size = 4;       // sequences per micro-batch
  int64_t grad_accum = 1;       // micro-batches per optimizer step
  double lr = 2e-4;             // peak learning rate
  int64_t warmup_steps = 0;     // linear warmup from 0 (HF get_cosine_schedule_with_warmup), then cosine to 0
  double weight_decay = 0.0;    // AdamW decoupled weight decay
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double clip = 1.0;            // global gradient-norm clip; 0 = off
  int64_t checkpoint_every = 0; // resumable checkpoint every N steps (0: only the final one)
  int64_t log_every = 1;        // steps between step-log lines (the last step is always logged)
  uint64_t seed = 0;            // data order, adapter init, dropout
  bool resume = false;          // continue from the newest checkpoint in output/checkpoints
  int64_t stop_after = 0;       // > 0: stop (after checkpointing) once this many steps are done, as if
                                // the job had been cut off; for tests and time-limited jobs
  bool progress = true;         // progress bar on stderr (shows the last step's loss and lr)
  int64_t pad_id = 0;           // padding id of the batches (masked anyway)
  // Packing (train.packing): a micro-batch is batch_size rows of up to max_length tokens, each holding
  // several whole examples (data::pack_first_fit, data::make_packed_batch; the decoder keeps them
  // apart). The micro-batch takes examples from the data cursor in order, each into the first row with
  // room, until the next example fits in no row (it opens the next micro-batch): the cursor counts
  // examples, with and without packing, so checkpoints resume exactly.
  bool packing = false;
  int64_t max_length = 0;       // row length with packing (train.max_length); 0 = the longest example
  // Activation checkpointing (train.activation_checkpointing): every training forward recomputes each
  // decoder layer in backward (model::ForwardOptions::checkpoint_layers): activation memory of one layer
  // instead of all, for one more forward of the layers (~+33% per step for full, ~+50% for LoRA).
  bool activation_checkpointing = false;
  // With activation_checkpointing: only the first checkpoint_layers layers are recomputed (-1: all;
  // train.checkpoint_layers), a memory / speed trade between the two ends
  // (model::ForwardOptions::checkpoint_layer_count).
  int64_t checkpoint_layers = -1;
  // Set by from_config for train.epochs with packing, where the steps of an epoch depend on how the
  // examples pack: train() then sets steps = ceil(epochs * packed micro-batches of epoch 0 / grad_accum)
  // and, when warmup_ratio > 0 (train.warmup_steps = 0), warmup_steps = ceil(warmup_ratio * steps).
  double packed_epochs = 0;
  double warmup_ratio = 0;
  // Data parallel (dist.h): the gradient all-reduce bucket size (train.bucket_mb).
  int64_t bucket_bytes = 25 << 20;

  // From the resolved config: train.* keys (steps / epochs over `num_examples`, warmup ratio or steps,
  // lr or lr_dense per `dense`, packing + max_length, activation checkpointing). train.dtype other
  // than float32 is a sparsecl::Error naming the key.
  static TrainOptions from_config(const config::Config& cfg, bool dense, int64_t num_examples);
  nlohmann::json to_json() const;
};

// Provenance written into manifest.json and checked on resume.
struct RunInfo {
  nlohmann::json config;     // the resolved config
  std::string config_hash;   // its hash (a resume with a different hash is refused)
  std::string base_model;    // the model directory trained from
};

struct TrainResult {
  int64_t steps_done = 0;       // optimizer steps completed (all runs of a resumed stage)
  double last_loss = 0.0;       // the loss of the last step
  int64_t tokens = 0;           // real tokens processed in this invocation
  double seconds = 0.0;         // wall time of this invocation's steps
  double tokens_per_s = 0.0;
  bool finished = false;        // false when stop_after cut it short
};

// Trains `decoder` with `method` on `examples` (already tokenized and truncated by data::load_jsonl,
// in any order: the trainer shuffles per epoch with the seed) and writes into `output_dir`:
//   train_log.jsonl       {"step","loss","lr","tokens","tokens_per_s","grad_norm"} per logged step
//   checkpoints/step-N/   trainable.safetensors, optimizer.safetensors, rng.safetensors, state.json,
//                         + the method's state (written to a temporary dir, then renamed; older
//                         checkpoints are removed after the rename)
//   manifest.json         config (resolved + hash), base model, seed, method, versions, result
//   + the method's output (save_output) when the stage finishes.
TrainResult train(model::Decoder& decoder, Method& method, const std::vector<data::Example>& examples,
                  const TrainOptions& options, const std::filesystem::path& output_dir, const RunInfo& info);

// The learning rate of (0-based) step `step`: HF's cosine schedule with linear warmup.
double learning_rate(const TrainOptions& options, int64_t step);

// Token-weighted mean next-token loss over every label token of `examples` (no autograd, fp32 loss),
// in batches of `batch_size`, in the given order, dealt round-robin to the ranks of a data-parallel job.
// The one held-out loss: finetune --heldout and eval (eval::heldout_loss) both use it. From the last
// hidden states a chunk at a time (model::chunked_causal_lm_loss), never the [B, T, V] logits.
struct HeldoutLoss {
  double loss = 0;           // NaN when there is no label token
  int64_t label_tokens = 0;  // over all ranks
};
HeldoutLoss heldout_loss(const model::Decoder& decoder, const std::vector<data::Example>& examples, int64_t batch_size,
                         int64_t pad_id, Progress* progress = nullptr);

// The order of sample slot `index` within epoch `epoch`: seeded_permutation(n, seed ^ mix(epoch)).
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace sparsecl::train
