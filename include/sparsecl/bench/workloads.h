// `sparsecl bench model`: the model-level workloads of issue #7, on a decoder of any shape with random
// weights (model::Decoder::random; a config.json is all it needs), through the code paths the commands
// use, so that the figures are those of sparsecl itself and move with every optimisation:
//   lora-step       train::train with train::LoraMethod (r, alpha on all 7 projections): forward,
//                   causal_lm_loss, backward, clipping, AdamW: the finetune-lora step, timed per step
//                   from its step log
//   lora-step-ckpt  the same with activation checkpointing (TrainOptions::activation_checkpointing)
//   probe-forward   probe::collect_domain_stats: the probe's forward pass (no LM head) with the top-k
//                   statistics on every MLP intermediate
//   generate        model::greedy_generate: prefill + KV-cache decoding, every row to new_tokens
// Each reports tokens/s (new tokens for generate), achieved TFLOP/s under the FLOP model below, the
// peak memory (CUDA caching allocator peaks on CUDA; process peak RSS always) and wall time.
// scripts/bench_hf.py runs the same workloads through HF transformers + PEFT with the same formulas;
// scripts/bench_compare.sh runs both and prints the ratios (docs/bench.md).
//
// FLOP model (model FLOPs: the useful work of the algorithm; recomputation is not counted, so a
// checkpointed step reports the same FLOPs per token as a plain one). With L layers, hidden H,
// intermediate I, vocab V, q = heads * head_dim, kv = kv_heads * head_dim, T the sequence length:
//   N_layers = L * (H*q + 2*H*kv + q*H + 3*H*I)   matmul weights of the decoder layers (biases ignored)
//   N_head   = V * H                               the LM head (tied or not)
//   N_lora   = sum over adapted projections of r * (in + out)
//   attention per token per layer: 2*T*q FLOPs for Q K^T and 2*T*q for P V over the full T (PaLM's
//   convention: the causal mask's halving is not credited), i.e. 4*L*T*q per token forward.
// Per token:
//   lora-step (and -ckpt): 4*(N_layers + N_head) + 6*N_lora + 12*L*T*q
//       forward 2N + backward through the frozen weights 2N (input gradients only: no weight
//       gradients, which is what makes it 4N and not full fine-tuning's 6N); the adapters' own
//       forward + both backward products 6*N_lora; attention forward 4LTq + backward 8LTq.
//   probe-forward: 2*N_layers + 4*L*T*q   (no LM head: the probe does not compute logits)
// generate (B rows, prompt P, n new tokens; the LM head only where its logits are used):
//   B * [ P*(2*N_layers + 4*L*P*q) + n*2*N_head + sum_{i=2..n} (2*N_layers + 4*L*(P+i-1)*q) ]
//   (prefill; one LM-head row per new token; the decoding steps, each over its context P+i-1).
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "sparsecl/model/config.h"

namespace sparsecl::model {
class Decoder;
}

namespace sparsecl::bench {

// The workload names, in the order they run by default.
const std::vector<std::string>& model_workload_names();

struct ModelBenchOptions {
  std::filesystem::path model_config;  // a HF config.json (configs/models/*.json)
  std::string device = "cuda";         // cpu | cuda | cuda:N
  std::string device_map;              // layers over several devices (model::parse_device_map): auto | cuda:0,cuda:1,...
  std::string dtype = "bfloat16";      // the decoder's weights and compute
  int64_t batch = 4;                   // sequences per step (lora-step*, probe-forward)
  int64_t seq = 2048;                  // tokens per sequence
  std::vector<std::string> workloads = model_workload_names();
  int64_t gen_batch = 64, prompt_len = 256, new_tokens = 256;  // generate
  int64_t warmup = 1;                  // untimed steps / batches before the timed ones
  int64_t iters = 3;                   // timed optimizer steps (lora-step*) and batches (probe-forward)
  int64_t gen_iters = 1;               // timed greedy_generate calls (after one short warm-up call)
  int64_t lora_r = 16;
  double lora_alpha = 32.0;
  int64_t checkpoint_layers = -1;      // lora-step-ckpt: recompute only the first N layers (-1: all)
  double top_ratio = 0.05;             // probe-forward: k = top_ratio * I per token (the probe's default)
  uint64_t seed = 0;                   // weights, token ids, adapter init

  void validate() const;  // sparsecl::Error naming the option (--batch, --workload, ...)
  nlohmann::json to_json() const;
};

// FLOP model (see the header comment).
int64_t layer_matmul_parameters(const model::ModelConfig& c);  // N_layers
int64_t lm_head_parameters(const model::ModelConfig& c);       // N_head
int64_t lora_parameters(const model::ModelConfig& c, int64_t r); // N_lora, all 7 projections
double lora_step_flops_per_token(const model::ModelConfig& c, int64_t seq, int64_t r);
double probe_forward_flops_per_token(const model::ModelConfig& c, int64_t seq);
double generate_flops(const model::ModelConfig& c, int64_t batch, int64_t prompt_len, int64_t new_tokens);

struct WorkloadResult {
  std::string name;
  int64_t tokens = 0;        // tokens of the timed part (new tokens for generate)
  double seconds = 0.0;      // wall time of the timed part (device synchronised)
  double tokens_per_s = 0.0;
  double flops = 0.0;        // model FLOPs of the timed part
  double tflops_per_s = 0.0;
  int64_t peak_allocated_bytes = -1;  // CUDA caching allocator peaks during the workload (-1: not CUDA),
  int64_t peak_reserved_bytes = -1;   // summed over the devices of a pipeline placement
  nlohmann::json peak_per_device = nlohmann::json::object();  // {"cuda:0": {...}, ...} with several GPUs
  int64_t peak_rss_bytes = 0;         // the process's peak resident set so far (getrusage; never reset)
  nlohmann::json details = nlohmann::json::object();  // shapes, loss, k, ...

  nlohmann::json to_json() const;
};

// The workloads one by one, on a decoder built by the caller (Decoder::random of the options' config).
// lora-step attaches adapters and removes them again, so the workloads can share one decoder.
WorkloadResult run_lora_step(model::Decoder& decoder, const ModelBenchOptions& options, bool checkpointing);
WorkloadResult run_probe_forward(model::Decoder& decoder, const ModelBenchOptions& options);
WorkloadResult run_generate(const model::Decoder& decoder, const ModelBenchOptions& options);

// Whole run: builds the random decoder, runs options.workloads in order, prints one line per workload
// to stdout and returns the document `--json` writes: {"tool": "sparsecl", "device", "device_name",
// "dtype", "model_config", "model": {...shape, parameters}, "options", "versions", "command",
// "workloads": [WorkloadResult...]}.
nlohmann::json run_model_bench(const ModelBenchOptions& options, const std::string& command);

// The GPU-vs-CPU-reference check: a decoder of `config` with random weights in `dtype` on `device`
// against the same (rounded) weights in float32 on the CPU, on a [2, 48] batch of random ids:
//   logits          the full causal forward (the fast SDPA path)
//   decode          one KV-cache decoding step after a prefill (generate's path)
//   probe mean_abs  collect_domain_stats' mean |h| per layer and neuron (the probe's hook path)
//   lora loss/grad  the LoRA training forward + backward: the loss and dL/dB of every adapter, with
//                   and without activation checkpointing
// Each compares max |device - cpu| / max |cpu| with a tolerance for the dtype (float32: 1e-3; bf16/fp16:
// 3e-2 for logits and activations, 2e-3 for the mean loss, 5e-2 for gradients). Returns {"passed", "device", "dtype", "checks": [{"name",
// "max_abs_err", "max_abs_ref", "rel_err", "tolerance", "passed"}...]}.
nlohmann::json check_against_cpu(const model::ModelConfig& config, at::Device device, at::ScalarType dtype, uint64_t seed);

// "NVIDIA H200" for a CUDA device, the CPU model name (and thread count) for the CPU.
std::string device_name(at::Device device);

}  // namespace sparsecl::bench
