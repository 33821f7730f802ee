// `sparsecl bench model` (include/sparsecl/bench/workloads.h): the LoRA training step through the real
// trainer, the probe's forward pass, greedy generation and the GPU-vs-CPU-reference check, on a random
// decoder of any shape. Timings synchronise the device; memory peaks come from the CUDA caching
// allocator (reset before each workload) and getrusage.
#include "sparsecl/bench/workloads.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <torch/cuda.h>
#include <unistd.h>

#ifdef SPARSECL_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/data/dataset.h"
#include "sparsecl/io/provenance.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/loss.h"
#include "sparsecl/model/generate.h"
#include "sparsecl/model/lora.h"
#include "sparsecl/probe/probe.h"
#include "sparsecl/train/methods.h"
#include "sparsecl/train/trainer.h"

namespace sparsecl::bench {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::vector<std::string> kProjections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

void synchronize(at::Device device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.has_index() ? device.index() : -1);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The process's resident-set high-water mark: VmHWM from /proc/self/status, which
// reset_peak_rss() sets back to the current RSS (Linux clear_refs "5"), so that a workload's peak
// excludes what building the model touched before it; getrusage's lifetime maximum where /proc is
// unavailable.
int64_t peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // "VmHWM:  123 kB"
  struct rusage usage {};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }

// The distinct devices a decoder's tensors live on (one, or the GPUs of a pipeline placement).
std::vector<at::Device> devices_of(const model::Decoder& decoder) {
  std::vector<at::Device> out;
  const model::Placement& p = decoder.placement();
  std::vector<at::Device> all = {p.embed_device};
  all.insert(all.end(), p.layer_devices.begin(), p.layer_devices.end());
  all.push_back(p.head_device);
  for (const at::Device& d : all)
    if (std::find(out.begin(), out.end(), d) == out.end()) out.push_back(d);
  return out;
}

void synchronize(const std::vector<at::Device>& devices) {
  for (const at::Device& d : devices) synchronize(d);
}

// Peak memory of one workload over the decoder's devices: on CUDA each caching allocator's cache is
// emptied and its peaks reset when the workload starts (so "reserved" is this workload's own), and
// read when it ends; the result sums the devices' peaks (each device's in peak_per_device when there
// are several). The process's peak RSS (the CPU's figure) is reset when the workload starts too.
class PeakMemory {
 public:
  explicit PeakMemory(const model::Decoder& decoder) : devices_(devices_of(decoder)) {
    synchronize(devices_);
    reset_peak_rss();
#ifdef SPARSECL_WITH_CUDA
    bool emptied = false;
    for (const at::Device& d : devices_) {
      if (!d.is_cuda()) continue;
      if (!emptied) c10::cuda::CUDACachingAllocator::emptyCache();  // every GPU's cache
      emptied = true;
      c10::cuda::CUDACachingAllocator::resetPeakStats(index(d));
    }
#endif
  }
  void record(WorkloadResult& r) const {
    synchronize(devices_);
#ifdef SPARSECL_WITH_CUDA
    json per_device = json::object();
    for (const at::Device& d : devices_) {
      if (!d.is_cuda()) continue;
      const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index(d));
      constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
      r.peak_allocated_bytes = std::max<int64_t>(r.peak_allocated_bytes, 0) + stats.allocated_bytes[all].peak;
      r.peak_reserved_bytes = std::max<int64_t>(r.peak_reserved_bytes, 0) + stats.reserved_bytes[all].peak;
      per_device[d.str()] = {{"peak_allocated_bytes", stats.allocated_bytes[all].peak},
                             {"peak_reserved_bytes", stats.reserved_bytes[all].peak}};
    }
    if (per_device.size() > 1) r.peak_per_device = per_device;
#endif
    r.peak_rss_bytes = peak_rss_bytes();
  }

 private:
#ifdef SPARSECL_WITH_CUDA
  static c10::DeviceIndex index(at::Device d) { return d.has_index() ? d.index() : at::cuda::current_device(); }
#endif
  std::vector<at::Device> devices_;
};

void finish(WorkloadResult& r) {
  r.tokens_per_s = r.seconds > 0 ? static_cast<double>(r.tokens) / r.seconds : 0.0;
  r.tflops_per_s = r.seconds > 0 ? r.flops / r.seconds / 1e12 : 0.0;
}

// `count` sequences of `length` uniformly random ids in [0, vocab), every token a loss target.
std::vector<data::Example> random_examples(int64_t count, int64_t length, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<data::Example> out(static_cast<size_t>(count));
  for (auto& e : out) {
    e.ids.resize(static_cast<size_t>(length));
    for (auto& id : e.ids) id = static_cast<int64_t>(data::uniform_below(rng, static_cast<uint64_t>(vocab)));
    e.loss_mask.assign(static_cast<size_t>(length), 1);
  }
  return out;
}


model::LoraConfig all_projections_lora(int64_t r, double alpha) {
  model::LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.dropout = 0.0;
  c.target_modules = kProjections;
  return c;
}

void remove_adapters(model::Decoder& decoder) {
  for (auto& [name, lin] : decoder.named_linears()) lin->lora.clear();
}

std::string shape_key(const model::ModelConfig& c) {
  return c.model_type + " L" + std::to_string(c.num_hidden_layers) + " H" + std::to_string(c.hidden_size) + " I" +
         std::to_string(c.intermediate_size) + " V" + std::to_string(c.vocab_size);
}

}  // namespace

// ---- options --------------------------------------------------------------------------------------

const std::vector<std::string>& model_workload_names() {
  static const std::vector<std::string> names = {"lora-step", "lora-step-ckpt", "probe-forward", "generate"};
  return names;
}

void ModelBenchOptions::validate() const {
  if (model_config.empty()) throw Error("bench model: --model-config is required (e.g. configs/models/llama-3-8b.json)");
  if (batch < 1 || seq < 2) throw Error("bench model: --batch must be >= 1 and --seq >= 2");
  if (gen_batch < 1 || prompt_len < 1 || new_tokens < 1)
    throw Error("bench model: --gen-batch, --prompt-len and --new-tokens must be >= 1");
  if (warmup < 0 || iters < 1 || gen_iters < 1) throw Error("bench model: --warmup must be >= 0, --iters and --gen-iters >= 1");
  if (lora_r < 1 || !(lora_alpha > 0)) throw Error("bench model: --lora-r must be >= 1 and --lora-alpha > 0");
  if (checkpoint_layers < -1) throw Error("bench model: --checkpoint-layers must be -1 (all) or >= 0");
  if (!(top_ratio > 0 && top_ratio <= 1)) throw Error("bench model: --top-ratio must be in (0, 1]");
  if (workloads.empty()) throw Error("bench model: --workload names no workload");
  const auto& known = model_workload_names();
  for (const auto& w : workloads) {
    if (std::find(known.begin(), known.end(), w) != known.end()) continue;
    std::string list;
    for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
    throw Error("bench model: unknown workload '" + w + "' in --workload (known: " + list +
                "; activation checkpointing only matters with a backward pass, hence lora-step-ckpt)");
  }
}

json ModelBenchOptions::to_json() const {
  return {{"model_config", model_config.string()}, {"device", device},         {"dtype", dtype},
          {"batch", batch},                        {"seq", seq},               {"workloads", workloads},
          {"gen_batch", gen_batch},                {"prompt_len", prompt_len}, {"new_tokens", new_tokens},
          {"warmup", warmup},                      {"iters", iters},           {"gen_iters", gen_iters},
          {"device_map", device_map},
          {"lora_r", lora_r},                      {"lora_alpha", lora_alpha}, {"checkpoint_layers", checkpoint_layers},
          {"top_ratio", top_ratio},
          {"seed", seed}};
}

// ---- FLOP model -----------------------------------------------------------------------------------

int64_t layer_matmul_parameters(const model::ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  return c.num_hidden_layers * (H * q + 2 * H * kv + q * H + 3 * H * I);
}

int64_t lm_head_parameters(const model::ModelConfig& c) { return c.vocab_size * c.hidden_size; }

int64_t lora_parameters(const model::ModelConfig& c, int64_t r) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  // r * (in + out) for q, k, v, o, gate, up, down
  return c.num_hidden_layers * r * ((H + q) + 2 * (H + kv) + (q + H) + 3 * (H + I));
}

double lora_step_flops_per_token(const model::ModelConfig& c, int64_t seq, int64_t r) {
  const double N = static_cast<double>(layer_matmul_parameters(c) + lm_head_parameters(c));
  const double q = static_cast<double>(c.num_attention_heads * c.head_dim);
  return 4.0 * N + 6.0 * static_cast<double>(lora_parameters(c, r)) +
         12.0 * static_cast<double>(c.num_hidden_layers) * static_cast<double>(seq) * q;
}

double probe_forward_flops_per_token(const model::ModelConfig& c, int64_t seq) {
  const double q = static_cast<double>(c.num_attention_heads * c.head_dim);
  return 2.0 * static_cast<double>(layer_matmul_parameters(c)) +
         4.0 * static_cast<double>(c.num_hidden_layers) * static_cast<double>(seq) * q;
}

double generate_flops(const model::ModelConfig& c, int64_t batch, int64_t prompt_len, int64_t new_tokens) {
  const double Nl = static_cast<double>(layer_matmul_parameters(c)), Nh = static_cast<double>(lm_head_parameters(c));
  const double attn = 4.0 * static_cast<double>(c.num_hidden_layers) * static_cast<double>(c.num_attention_heads * c.head_dim);
  const double P = static_cast<double>(prompt_len), n = static_cast<double>(new_tokens);
  double per_row = P * (2.0 * Nl + attn * P) + n * 2.0 * Nh;
  // decoding steps i = 2..n, context P + i - 1: sum of contexts = (n - 1) * P + (1 + ... + (n - 1))
  per_row += (n - 1.0) * 2.0 * Nl + attn * ((n - 1.0) * P + n * (n - 1.0) / 2.0);
  return static_cast<double>(batch) * per_row;
}

json WorkloadResult::to_json() const {
  json j = {{"name", name},
            {"tokens", tokens},
            {"seconds", seconds},
            {"tokens_per_s", tokens_per_s},
            {"flops", flops},
            {"tflops_per_s", tflops_per_s},
            {"peak_allocated_bytes", peak_allocated_bytes < 0 ? json(nullptr) : json(peak_allocated_bytes)},
            {"peak_reserved_bytes", peak_reserved_bytes < 0 ? json(nullptr) : json(peak_reserved_bytes)},
            {"peak_rss_bytes", peak_rss_bytes}};
  if (!peak_per_device.empty()) j["peak_per_device"] = peak_per_device;
  for (const auto& [k, v] : details.items()) j[k] = v;
  return j;
}

// ---- workloads ------------------------------------------------------------------------------------

WorkloadResult run_lora_step(model::Decoder& decoder, const ModelBenchOptions& o, bool checkpointing) {
  const model::ModelConfig& c = decoder.config();
  const int64_t steps = o.warmup + o.iters;
  const auto examples = random_examples(steps * o.batch, o.seq, c.vocab_size, o.seed + 1);
  train::LoraMethod method(all_projections_lora(o.lora_r, o.lora_alpha), o.seed);
  train::TrainOptions to;
  to.steps = steps;
  to.batch_size = o.batch;
  to.grad_accum = 1;
  to.lr = 1e-4;
  to.warmup_steps = 0;
  to.clip = 1.0;
  to.seed = o.seed;
  to.progress = false;
  to.activation_checkpointing = checkpointing;
  to.checkpoint_layers = o.checkpoint_layers;
  train::RunInfo info;
  info.config = o.to_json();
  info.config_hash = "bench";
  info.base_model = decoder.source().string();
  const fs::path out = fs::temp_directory_path() / ("sparsecl-bench-" + std::to_string(::getpid()) + "-lora");
  remove_tree(out);

  WorkloadResult r;
  r.name = checkpointing ? "lora-step-ckpt" : "lora-step";
  PeakMemory memory(decoder);
  train::TrainResult tr;
  try {
    tr = train::train(decoder, method, examples, to, out, info);
  } catch (...) {
    remove_adapters(decoder);
    remove_tree(out);
    throw;
  }
  memory.record(r);
  remove_adapters(decoder);

  // Per-step wall time from the step log (each step's tokens / its tokens_per_s): the warm-up steps
  // (allocator growth, kernel selection) are left out; the end-of-run checkpoint is not in any step.
  std::ifstream log_file(out / "train_log.jsonl");
  std::string line;
  while (std::getline(log_file, line)) {
    if (line.empty()) continue;
    const json j = json::parse(line);
    if (j.at("step").get<int64_t>() <= o.warmup) continue;
    const double tps = j.at("tokens_per_s").get<double>();
    const int64_t step_tokens = o.batch * o.seq;
    r.tokens += step_tokens;
    r.seconds += tps > 0 ? static_cast<double>(step_tokens) / tps : 0.0;
  }
  remove_tree(out);
  if (r.tokens != o.iters * o.batch * o.seq)
    throw Error("bench model: the step log of the " + r.name + " run holds " + std::to_string(r.tokens) +
                " timed tokens, expected " + std::to_string(o.iters * o.batch * o.seq));
  r.flops = lora_step_flops_per_token(c, o.seq, o.lora_r) * static_cast<double>(r.tokens);
  r.details = {{"batch", o.batch},          {"seq", o.seq},          {"iters", o.iters},
               {"warmup", o.warmup},        {"lora_r", o.lora_r},    {"lora_alpha", o.lora_alpha},
               {"loss", tr.last_loss},      {"activation_checkpointing", checkpointing},
               {"checkpoint_layers", checkpointing ? o.checkpoint_layers : 0},
               {"trainable_parameters", lora_parameters(c, o.lora_r)}};
  finish(r);
  return r;
}

WorkloadResult run_probe_forward(model::Decoder& decoder, const ModelBenchOptions& o) {
  const model::ModelConfig& c = decoder.config();
  probe::Settings settings;
  settings.top_ratio = o.top_ratio;
  settings.batch_size = o.batch;
  settings.max_length = o.seq;
  settings.progress = false;
  settings.seed = o.seed;
  const auto warm = random_examples(std::max<int64_t>(o.warmup, 1) * o.batch, o.seq, c.vocab_size, o.seed + 11);
  const auto timed = random_examples(o.iters * o.batch, o.seq, c.vocab_size, o.seed + 12);
  if (o.warmup > 0) probe::collect_domain_stats(decoder, warm, "warmup", settings, 0, o.seed);

  WorkloadResult r;
  r.name = "probe-forward";
  PeakMemory memory(decoder);
  const auto t0 = std::chrono::steady_clock::now();
  probe::DomainStats st = probe::collect_domain_stats(decoder, timed, "bench", settings, 0, o.seed);
  synchronize(devices_of(decoder));
  r.seconds = seconds_since(t0);
  memory.record(r);
  r.tokens = st.num_tokens;
  r.flops = probe_forward_flops_per_token(c, o.seq) * static_cast<double>(r.tokens);
  r.details = {{"batch", o.batch}, {"seq", o.seq}, {"iters", o.iters}, {"warmup", o.warmup},
               {"k", st.k},        {"top_ratio", o.top_ratio}};
  finish(r);
  return r;
}

WorkloadResult run_generate(const model::Decoder& decoder, const ModelBenchOptions& o) {
  const model::ModelConfig& c = decoder.config();
  std::vector<std::vector<int64_t>> prompts;
  for (auto& e : random_examples(o.gen_batch, o.prompt_len, c.vocab_size, o.seed + 21)) prompts.push_back(std::move(e.ids));
  model::GenerateOptions warm;
  warm.max_new_tokens = std::min<int64_t>(o.new_tokens, 4);  // prefill + a few steps: kernels chosen, allocator grown
  model::greedy_generate(decoder, prompts, warm);

  model::GenerateOptions go;
  go.max_new_tokens = o.new_tokens;  // no stop ids: every row decodes new_tokens
  WorkloadResult r;
  r.name = "generate";
  PeakMemory memory(decoder);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < o.gen_iters; ++i) {
    const auto out = model::greedy_generate(decoder, prompts, go);
    for (const auto& row : out) r.tokens += static_cast<int64_t>(row.size());
  }
  synchronize(devices_of(decoder));
  r.seconds = seconds_since(t0);
  memory.record(r);
  if (r.tokens != o.gen_iters * o.gen_batch * o.new_tokens)
    throw Error("bench model: generate produced " + std::to_string(r.tokens) + " tokens, expected " +
                std::to_string(o.gen_iters * o.gen_batch * o.new_tokens));
  r.flops = static_cast<double>(o.gen_iters) * generate_flops(c, o.gen_batch, o.prompt_len, o.new_tokens);
  r.details = {{"batch", o.gen_batch},
               {"prompt_len", o.prompt_len},
               {"new_tokens", o.new_tokens},
               {"iters", o.gen_iters},
               {"decode_mode", model::decode_mode_name(model::resolve_decode_mode(decoder, go.mode))}};
  finish(r);
  return r;
}

std::string device_name(at::Device device) {
#ifdef SPARSECL_WITH_CUDA
  if (device.is_cuda()) return at::cuda::getDeviceProperties(device.has_index() ? device.index() : at::cuda::current_device())->name;
#endif
  if (device.is_cuda()) return "cuda";
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, model = "cpu";
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  }
  return model + " (" + std::to_string(at::get_num_threads()) + " threads)";
}

json run_model_bench(const ModelBenchOptions& o, const std::string& command) {
  o.validate();
  const model::ModelConfig config = model::ModelConfig::load(o.model_config);
  const at::Device device = model::parse_device(o.device);
  const at::ScalarType dtype = model::parse_dtype(o.dtype);
  const std::string name = device_name(device);
  const double params_b = static_cast<double>(config.parameter_count()) / 1e9;
  std::printf("sparsecl bench model: %s (%s, %.3gB parameters), %s on %s (%s)\n", o.model_config.string().c_str(),
              shape_key(config).c_str(), params_b, o.dtype.c_str(), device.str().c_str(), name.c_str());
  std::fflush(stdout);
  const auto t_build = std::chrono::steady_clock::now();
  model::Decoder decoder = model::Decoder::random(config, dtype, model::resolve_placement(config, o.device_map, device, dtype), o.seed);
  synchronize(devices_of(decoder));
  if (!decoder.placement().is_single()) std::printf("placement: %s\n", decoder.placement().describe().c_str());
  log::info("random decoder built in ", seconds_since(t_build), " s");

  std::printf("%-15s %12s %10s %14s %14s %12s %9s\n", "workload", "tokens/s", "TFLOP/s", "peak alloc GiB",
              "peak resv GiB", "peak RSS GiB", "seconds");
  std::fflush(stdout);
  json results = json::array();
  const double gib = 1024.0 * 1024.0 * 1024.0;
  for (const auto& w : o.workloads) {
    WorkloadResult r;
    if (w == "lora-step") r = run_lora_step(decoder, o, false);
    else if (w == "lora-step-ckpt") r = run_lora_step(decoder, o, true);
    else if (w == "probe-forward") r = run_probe_forward(decoder, o);
    else r = run_generate(decoder, o);
    auto fmt_gib = [&](int64_t b) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.2f", static_cast<double>(b) / gib);
      return b < 0 ? std::string("-") : std::string(buf);
    };
    std::printf("%-15s %12.1f %10.3g %14s %14s %12.2f %9.3f\n", r.name.c_str(), r.tokens_per_s, r.tflops_per_s,
                fmt_gib(r.peak_allocated_bytes).c_str(), fmt_gib(r.peak_reserved_bytes).c_str(),
                static_cast<double>(r.peak_rss_bytes) / gib, r.seconds);
    std::fflush(stdout);
    results.push_back(r.to_json());
  }
  json model_j = config.to_json();
  model_j["parameters"] = config.parameter_count();
  model_j["layer_matmul_parameters"] = layer_matmul_parameters(config);
  model_j["lm_head_parameters"] = lm_head_parameters(config);
  return {{"tool", "sparsecl"},
          {"device", device.str()},
          {"device_name", name},
          {"dtype", o.dtype},
          {"model_config", o.model_config.string()},
          {"model", model_j},
          {"options", o.to_json()},
          {"threads", at::get_num_threads()},
          {"versions", io::software_versions()},
          {"command", command},
          {"workloads", results}};
}

// ---- GPU-vs-CPU-reference check -------------------------------------------------------------------

namespace {

json compare(const std::string& name, const at::Tensor& got, const at::Tensor& want, double tolerance) {
  const at::Tensor g = got.detach().to(at::kCPU, at::kFloat), w = want.detach().to(at::kCPU, at::kFloat);
  if (g.sizes() != w.sizes()) throw Error("bench check: '" + name + "' shapes differ between the device and the CPU");
  const double err = (g - w).abs().max().item<double>();
  const double ref = w.abs().max().item<double>();
  const double rel = ref > 0 ? err / ref : err;
  const bool finite = g.isfinite().all().item<bool>();
  return {{"name", name},   {"max_abs_err", err},         {"max_abs_ref", ref},
          {"rel_err", rel}, {"tolerance", tolerance},     {"passed", finite && rel <= tolerance}};
}

// dL/dB of every adapter, flattened in module order, after one LoRA training forward + backward.
std::pair<at::Tensor, at::Tensor> lora_loss_and_grads(model::Decoder& decoder, const at::Tensor& ids, bool checkpointing) {
  train::LoraMethod method(all_projections_lora(4, 8.0), /*seed=*/7);
  const train::NamedTensors params = method.setup(decoder);
  model::ForwardInput in;
  in.input_ids = ids;
  model::ForwardOptions fo;
  fo.training = true;
  fo.checkpoint_layers = checkpointing;
  fo.logits = false;
  // The trainer's loss (chunked, from the last hidden states): its device numerics are what is checked.
  at::Tensor loss = model::chunked_causal_lm_loss(decoder.forward(in, fo).last_hidden, decoder.head_weight(), ids);
  loss.backward();
  std::vector<at::Tensor> grads;
  for (const auto& [name, p] : params)
    if (name.find("lora_B") != std::string::npos) grads.push_back(p->grad().detach().to(at::kCPU, at::kFloat).flatten());
  remove_adapters(decoder);
  return {loss.detach().reshape({1}), at::cat(grads)};
}

}  // namespace

json check_against_cpu(const model::ModelConfig& config, at::Device device, at::ScalarType dtype, uint64_t seed) {
  // bf16 on the CPU measures ~7e-3 relative on the logits, activations and gradients and ~5e-5 on the
  // mean loss for configs/models/tiny.json: the tolerances leave a margin of 4-7x (40x for the loss).
  const bool exact = dtype == at::kFloat;
  const double value_tol = exact ? 1e-3 : 3e-2, loss_tol = exact ? 1e-3 : 2e-3, grad_tol = exact ? 1e-3 : 5e-2;
  model::Decoder dev = model::Decoder::random(config, dtype, device, seed);
  model::Decoder ref = model::Decoder::random(config, at::kFloat, at::kCPU, seed);
  {
    at::NoGradGuard no_grad;  // the reference holds the device's (rounded) weights in float32
    auto dp = dev.named_parameters(), rp = ref.named_parameters();
    for (size_t i = 0; i < rp.size(); ++i) rp[i].second->copy_(dp[i].second->to(at::kCPU, at::kFloat));
  }
  const int64_t B = 2, T = 48;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
  const at::Tensor ids = at::randint(config.vocab_size, {B, T}, gen, at::TensorOptions().dtype(at::kLong));  // [B, T]
  json checks = json::array();

  {
    at::NoGradGuard no_grad;
    model::ForwardInput in;
    in.input_ids = ids;
    const at::Tensor want = ref.forward(in).logits;  // [B, T, V]
    checks.push_back(compare("logits", dev.forward(in).logits, want, value_tol));

    // decode: prefill T-1 tokens into a cache, then one step; its logits are those of position T-1
    model::KVCache cache(config, B, T, dtype, device);
    model::ForwardOptions fo;
    fo.cache = &cache;
    model::ForwardInput prefill, step;
    prefill.input_ids = ids.narrow(1, 0, T - 1).to(device);
    step.input_ids = ids.narrow(1, T - 1, 1).to(device);
    dev.forward(prefill, fo);
    checks.push_back(compare("decode step (KV cache)", dev.forward(step, fo).logits, want.narrow(1, T - 1, 1), value_tol));

    // the same step as a static decoding step (what a CUDA graph replays): written at a device index,
    // attending over the whole capacity under a mask
    model::KVCache fixed_cache(config, B, T + 5, dtype, device);
    model::ForwardOptions fixed;
    fixed.cache = &fixed_cache;
    dev.forward(prefill, fixed);
    model::StaticDecodeStep state;
    const auto long_opts = at::TensorOptions().dtype(at::kLong).device(device);
    state.write_index = at::full({1}, T - 1, long_opts);
    state.attend = at::zeros({B, T + 5}, long_opts.dtype(at::kBool));
    state.attend.narrow(1, 0, T).fill_(true);
    fixed.static_step = &state;
    step.position_ids = at::full({B, 1}, T - 1, long_opts);
    checks.push_back(
        compare("decode step (static, for CUDA graphs)", dev.forward(step, fixed).logits, want.narrow(1, T - 1, 1), value_tol));
  }
  {
    probe::Settings s;
    s.batch_size = B;
    s.progress = false;
    s.token_pairs = 0;
    std::vector<data::Example> examples(B);
    for (int64_t b = 0; b < B; ++b) {
      const at::Tensor row = ids[b].contiguous();
      examples[b].ids.assign(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + T);
      examples[b].loss_mask.assign(T, 1);
    }
    // (mean |h| per neuron [L, I], per-sequence sums of |h| [L, n, I]) of every layer
    auto stats = [&](model::Decoder& d) {
      const probe::DomainStats st = probe::collect_domain_stats(d, examples, "check", s, 0, seed);
      std::vector<at::Tensor> mean_abs, seq_sum;
      for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
        mean_abs.push_back(st.mean_abs(l).to(at::kCPU));
        seq_sum.push_back(st.layers[l].seq_sum.to(at::kCPU));
      }
      return std::make_pair(at::stack(mean_abs), at::stack(seq_sum));
    };
    const auto [dev_mean_abs, dev_seq_sum] = stats(dev);
    const auto [ref_mean_abs, ref_seq_sum] = stats(ref);
    checks.push_back(compare("probe mean_abs", dev_mean_abs, ref_mean_abs, value_tol));
    checks.push_back(compare("probe per-sequence sums", dev_seq_sum, ref_seq_sum, value_tol));
  }
  {
    const auto [ref_loss, ref_grads] = lora_loss_and_grads(ref, ids, false);
    for (bool ckpt : {false, true}) {
      const auto [loss, grads] = lora_loss_and_grads(dev, ids.to(device), ckpt);
      const std::string suffix = ckpt ? " (activation checkpointing)" : "";
      checks.push_back(compare("lora loss" + suffix, loss, ref_loss, loss_tol));
      checks.push_back(compare("lora dL/dB" + suffix, grads, ref_grads, grad_tol));
    }
  }
  bool passed = true;
  for (const auto& c : checks) passed = passed && c["passed"].get<bool>();
  return {{"passed", passed}, {"device", device.str()}, {"dtype", c10::toString(dtype)}, {"checks", checks}};
}

}  // namespace sparsecl::bench
