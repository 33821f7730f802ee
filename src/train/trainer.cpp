// The shared trainer (trainer.h): data order, micro-batches + gradient accumulation, AdamW, warmup +
// cosine, clipping, bf16 autocast on CUDA, step log, progress, atomic resumable checkpoints, manifest.
#include "sparsecl/train/trainer.h"

#include <ATen/ATen.h>
#include <sys/stat.h>
#include <unistd.h>
#include <ATen/autocast_mode.h>
#include <torch/version.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <mutex>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/common/progress.h"
#include "sparsecl/config/options.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/io/provenance.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/loss.h"

namespace sparsecl::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr double kPi = 3.14159265358979323846;

// bf16 autocast for the forward + loss on CUDA (fp32 masters, bf16 matmuls); a no-op on the CPU.
class AutocastGuard {
 public:
  explicit AutocastGuard(at::Device device) : on_(device.is_cuda()) {
    if (!on_) return;
    prev_enabled_ = at::autocast::is_autocast_enabled(at::kCUDA);
    prev_dtype_ = at::autocast::get_autocast_dtype(at::kCUDA);
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
  }
  ~AutocastGuard() {
    if (!on_) return;
    at::autocast::set_autocast_enabled(at::kCUDA, prev_enabled_);
    at::autocast::set_autocast_dtype(at::kCUDA, prev_dtype_);
    at::autocast::clear_cache();
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_ = false, prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

// The default generators whose state a checkpoint keeps: CPU always, the CUDA one of the device.
std::vector<std::pair<std::string, at::Generator>> generators(at::Device device) {
  std::vector<std::pair<std::string, at::Generator>> g;
  g.push_back({"cpu", at::globalContext().defaultGenerator(at::kCPU)});
  if (device.is_cuda()) {
    const at::Device d(at::kCUDA, device.has_index() ? device.index() : 0);
    g.push_back({"cuda", at::globalContext().defaultGenerator(d)});
  }
  return g;
}

struct Adam {
  std::vector<at::Tensor> m, v;  // per trainable tensor, fp32, its shape
  int64_t t = 0;                 // updates done
};


fs::path checkpoint_root(const fs::path& out) { return out / "checkpoints"; }

// The key of generator `name`'s state of rank `rank` in rng.safetensors: rank 0 keeps the plain name, so
// that a one-process checkpoint reads the same as before data parallelism existed.
std::string rng_key(const std::string& name, int rank) {
  return rank == 0 ? name : name + ".rank" + std::to_string(rank);
}

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}

// The newest complete checkpoint directory (step-N), or empty.
fs::path newest_checkpoint(const fs::path& out) {
  const fs::path root = checkpoint_root(out);
  if (!fs::is_directory(root)) return {};
  fs::path best;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (!e.is_directory() || n.rfind("step-", 0) != 0) continue;
    if (!fs::exists(e.path() / "state.json")) continue;
    if (best.empty() || n > best.filename().string()) best = e.path();
  }
  return best;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------

double learning_rate(const TrainOptions& o, int64_t step) {
  if (step < o.warmup_steps) return o.lr * static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, o.warmup_steps));
  const double progress = static_cast<double>(step - o.warmup_steps) /
                          static_cast<double>(std::max<int64_t>(1, o.steps - o.warmup_steps));
  return o.lr * std::max(0.0, 0.5 * (1.0 + std::cos(kPi * progress)));
}

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  // splitmix64 of the epoch, so that epochs of nearby seeds do not share orders.
  uint64_t z = static_cast<uint64_t>(epoch) + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return data::seeded_permutation(n, seed ^ z);
}

TrainOptions TrainOptions::from_config(const config::Config& cfg, bool dense, int64_t num_examples) {
  if (cfg.get<std::string>("train.dtype") != "float32")
    throw Error("train.dtype: only float32 master parameters are implemented (got '" + cfg.get<std::string>("train.dtype") + "')");
  TrainOptions o;
  o.batch_size = cfg.get<int64_t>("train.batch_size");
  o.grad_accum = cfg.get<int64_t>("train.grad_accum");
  o.steps = cfg.get<int64_t>("train.steps");
  const double epochs = cfg.get<double>("train.epochs");
  if (epochs > 0) {
    const double per_step = static_cast<double>(o.batch_size * o.grad_accum * dist::world_size());
    o.steps = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(epochs * static_cast<double>(num_examples) / per_step)));
  }
  o.lr = cfg.get<double>(dense ? "train.lr_dense" : "train.lr");
  o.warmup_steps = cfg.get<int64_t>("train.warmup_steps");
  if (o.warmup_steps == 0)
    o.warmup_steps = static_cast<int64_t>(std::ceil(cfg.get<double>("train.warmup_ratio") * static_cast<double>(o.steps)));
  o.weight_decay = cfg.get<double>("train.weight_decay");
  o.clip = cfg.get<double>("train.clip");
  o.checkpoint_every = cfg.get<int64_t>("train.checkpoint_every");
  o.log_every = cfg.get<int64_t>("train.log_every");
  o.seed = static_cast<uint64_t>(cfg.get<int64_t>("train.seed"));
  o.packing = cfg.get<bool>("train.packing");
  o.max_length = cfg.get<int64_t>("train.max_length");
  o.activation_checkpointing = cfg.get<bool>("train.activation_checkpointing");
  o.checkpoint_layers = cfg.get<int64_t>("train.checkpoint_layers");
  o.bucket_bytes = cfg.get<int64_t>("train.bucket_mb") << 20;
  if (o.packing && epochs > 0) {  // train() counts the packed micro-batches of an epoch
    o.packed_epochs = epochs;
    if (cfg.get<int64_t>("train.warmup_steps") == 0) o.warmup_ratio = cfg.get<double>("train.warmup_ratio");
  }
  return o;
}

json TrainOptions::to_json() const {
  return {{"steps", steps},           {"batch_size", batch_size}, {"grad_accum", grad_accum},
          {"lr", lr},                 {"warmup_steps", warmup_steps}, {"weight_decay", weight_decay},
          {"betas", {beta1, beta2}},  {"eps", eps},               {"clip", clip},
          {"checkpoint_every", checkpoint_every}, {"log_every", log_every}, {"seed", seed},
          {"packing", packing},       {"max_length", max_length}, {"activation_checkpointing", activation_checkpointing},
          {"checkpoint_layers", checkpoint_layers}};
}

HeldoutLoss heldout_loss(const model::Decoder& decoder, const std::vector<data::Example>& examples, int64_t batch_size,
                         int64_t pad_id, Progress* progress) {
  if (batch_size < 1) throw Error("heldout_loss: batch_size must be >= 1");
  at::NoGradGuard no_grad;
  double sum = 0.0;
  int64_t count = 0;
  for (size_t b = 0; b < examples.size(); b += static_cast<size_t>(batch_size)) {
    if (!dist::owns(static_cast<int64_t>(b) / batch_size)) continue;  // batches dealt round-robin to the ranks
    const size_t e = std::min(examples.size(), b + static_cast<size_t>(batch_size));
    data::Batch batch = data::make_batch(examples, b, e, pad_id);
    if (batch.num_label_tokens > 0) {
      model::ForwardInput in;
      in.input_ids = batch.input_ids.to(decoder.device());  // [B, T] right-padded: causal attention alone suffices
      model::ForwardOptions fo;
      fo.logits = false;
      const at::Tensor hidden = decoder.forward(in, fo).last_hidden;  // [B, T, H]
      const double loss = model::chunked_causal_lm_loss(hidden, decoder.head_weight(), batch.labels).item<double>();
      sum += loss * static_cast<double>(batch.num_label_tokens);
      count += batch.num_label_tokens;
    }
    if (progress) progress->update(static_cast<int64_t>(e - b), batch.num_tokens);
  }
  sum = dist::sum(sum);
  count = dist::sum(count);
  return {count > 0 ? sum / static_cast<double>(count) : std::nan(""), count};
}

// ---------------------------------------------------------------------------------------------------

namespace {

struct RunState {
  int64_t step = 0;          // optimizer steps done
  int64_t samples_seen = 0;  // data cursor: global sample slots consumed
  int64_t tokens = 0;        // real tokens consumed (cumulative over the run)
};

// Every rank calls it (the ranks' generator states are gathered); rank 0 writes, then all wait for the
// checkpoint to be complete.
void save_checkpoint(const fs::path& out, const RunState& st, const NamedTensors& params, const Adam& adam,
                     const Method& method, const RunInfo& info, const TrainOptions& o, at::Device device) {
  std::vector<std::pair<std::string, at::Tensor>> rng;
  for (auto& [gname, gen] : generators(device)) {
    at::Tensor state;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      state = gen.get_state();  // [n] uint8
    }
    const at::Tensor all = dist::all_gather(state);  // [world, n]
    for (int r = 0; r < dist::world_size(); ++r) rng.push_back({rng_key(gname, r), all[r].clone()});
  }
  if (!dist::is_main()) {
    dist::barrier();
    return;
  }
  const fs::path root = checkpoint_root(out);
  fs::create_directories(root);
  const std::string name = step_dir_name(st.step);
  const fs::path tmp = root / (".tmp-" + name);
  const fs::path final_dir = root / name;
  remove_tree(tmp);
  fs::create_directories(tmp);

  std::vector<std::pair<std::string, at::Tensor>> trainable, optim;
  for (size_t i = 0; i < params.size(); ++i) {
    trainable.push_back({params[i].first, params[i].second->detach()});
    optim.push_back({"exp_avg." + params[i].first, adam.m[i]});
    optim.push_back({"exp_avg_sq." + params[i].first, adam.v[i]});
  }
  io::save_safetensors(tmp / "trainable.safetensors", trainable, {{"producer", "sparsecl " SPARSECL_VERSION}});
  io::save_safetensors(tmp / "optimizer.safetensors", optim, {{"producer", "sparsecl " SPARSECL_VERSION}});
  io::save_safetensors(tmp / "rng.safetensors", rng);
  method.save_state(tmp);
  const json state = {{"step", st.step},
                      {"samples_seen", st.samples_seen},
                      {"tokens", st.tokens},
                      {"adam_t", adam.t},
                      {"world_size", dist::world_size()},
                      {"method", method.name()},
                      {"config_hash", info.config_hash},
                      {"options", o.to_json()},
                      {"versions", io::software_versions()}};
  write_file_atomic(tmp / "state.json", state.dump(2) + "\n");
  remove_tree(final_dir);
  fs::rename(tmp, final_dir);
  // Older checkpoints are superseded once the new one is in place.
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step-", 0) == 0 && n != name) remove_tree(e.path());
  }
  dist::barrier();
}


void load_checkpoint(const fs::path& dir, RunState& st, const NamedTensors& params, Adam& adam, Method& method,
                     const RunInfo& info, at::Device device) {
  const fs::path state_path = dir / "state.json";
  const json state = read_json_file(state_path, "checkpoint state");
  try {
    if (state.at("method").get<std::string>() != method.name())
      throw Error(state_path.string() + ": checkpoint of method '" + state.at("method").get<std::string>() +
                  "', but this run trains '" + method.name() + "'");
    if (state.at("config_hash").get<std::string>() != info.config_hash)
      throw Error(state_path.string() + ": checkpoint of config " + state.at("config_hash").get<std::string>() +
                  ", but this run's config hashes to " + info.config_hash + " (resume needs the same config)");
    const int world = state.value("world_size", 1);
    if (world != dist::world_size())
      throw Error(state_path.string() + ": checkpoint of a " + std::to_string(world) + "-process run; resume it with " +
                  std::to_string(world) + " processes (this job has " + std::to_string(dist::world_size()) + ")");
    st.step = state.at("step").get<int64_t>();
    st.samples_seen = state.at("samples_seen").get<int64_t>();
    st.tokens = state.at("tokens").get<int64_t>();
    adam.t = state.at("adam_t").get<int64_t>();
  } catch (const json::exception& e) {
    throw Error(state_path.string() + ": malformed checkpoint state (" + e.what() + ")");
  }
  const fs::path tfile = dir / "trainable.safetensors", ofile = dir / "optimizer.safetensors";
  auto trainable = io::load_safetensors(tfile);
  auto optim = io::load_safetensors(ofile);
  auto take = [](std::map<std::string, at::Tensor>& from, const fs::path& file, const std::string& key,
                 const at::Tensor& like) -> at::Tensor {
    auto it = from.find(key);
    if (it == from.end()) throw Error(file.string() + ": missing tensor '" + key + "'");
    if (it->second.sizes() != like.sizes() || it->second.scalar_type() != like.scalar_type())
      throw Error(file.string() + ": tensor '" + key + "' does not match the trainable tensor's shape/dtype");
    return it->second;
  };
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& [name, p] = params[i];
    p->copy_(take(trainable, tfile, name, *p));
    adam.m[i].copy_(take(optim, ofile, "exp_avg." + name, adam.m[i]));
    adam.v[i].copy_(take(optim, ofile, "exp_avg_sq." + name, adam.v[i]));
  }
  if (trainable.size() != params.size())
    throw Error(tfile.string() + ": holds " + std::to_string(trainable.size()) + " tensors, the method trains " +
                std::to_string(params.size()));
  auto rng = io::load_safetensors(dir / "rng.safetensors");
  for (auto& [gname, gen] : generators(device)) {
    const std::string key = rng_key(gname, dist::rank());
    auto it = rng.find(key);
    if (it == rng.end()) throw Error((dir / "rng.safetensors").string() + ": missing generator state '" + key + "'");
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(it->second);
  }
  method.load_state(dir);
}

// Keeps the step-log lines up to `step` (a run cut off after its last checkpoint logged more).
void truncate_log(const fs::path& log_path, int64_t step) {
  if (!fs::exists(log_path)) return;
  std::ifstream in(log_path);
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step")) throw Error(log_path.string() + ": malformed step-log line '" + line + "'");
    if (j["step"].get<int64_t>() <= step) kept += line + "\n";
  }
  write_file_atomic(log_path, kept);
}

void write_manifest(const fs::path& out, const Method& method, const RunInfo& info, const TrainOptions& o,
                    const std::string& status, const json& result) {
  json m = {{"method", method.name()},
            {"status", status},
            {"base_model", info.base_model},
            {"seed", o.seed},
            {"config", info.config},
            {"config_hash", info.config_hash},
            {"train", o.to_json()},
            {"world_size", dist::world_size()},
            {"versions", io::software_versions()}};
  if (!result.is_null()) m["result"] = result;
  write_file_atomic(out / "manifest.json", m.dump(2) + "\n");
}

}  // namespace

TrainResult train(model::Decoder& decoder, Method& method, const std::vector<data::Example>& examples,
                  const TrainOptions& options, const fs::path& out, const RunInfo& info) {
  TrainOptions o = options;  // steps / warmup may be resolved below (epochs with packing)
  if (examples.empty()) throw Error("train: no training examples");
  if (o.steps < 1 || o.batch_size < 1 || o.grad_accum < 1 || o.log_every < 1)
    throw Error("train: steps, batch_size, grad_accum and log_every must be >= 1");
  const at::Device device = decoder.device();
  const fs::path log_path = out / "train_log.jsonl";
  fs::create_directories(out);
  const fs::path resume_from = o.resume ? newest_checkpoint(out) : fs::path();
  // Data parallel: every rank checks before rank 0 writes anything (check_all is a collective).
  dist::check_all(o.resume || !(fs::exists(log_path) || fs::exists(checkpoint_root(out))),
                  out.string() + ": already holds a training run (train_log.jsonl / checkpoints); pass --resume to "
                  "continue it or choose another output directory");
  if (o.resume && resume_from.empty()) {
    log::warn(out.string(), ": --resume but no checkpoint there; starting from step 0");
    if (dist::is_main()) ::unlink(log_path.c_str());
  }

  at::manual_seed(o.seed);  // dropout; adapter init uses its own seeded generator
  NamedTensors params = method.setup(decoder);
  // Data parallel: each rank draws its own dropout masks (rank 0's stream is the one-process stream).
  if (dist::rank() > 0) at::manual_seed(o.seed + 0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(dist::rank()));
  if (params.empty()) throw Error("train: method '" + method.name() + "' has nothing to train");
  int64_t numel = 0;
  for (const auto& [name, p] : params) {
    if (p->scalar_type() != at::kFloat || !p->requires_grad())
      throw Error("train: method '" + method.name() + "' returned '" + name + "', which is not an fp32 leaf requiring grad");
    numel += p->numel();
  }
  Adam adam;
  for (const auto& [name, p] : params) {
    adam.m.push_back(at::zeros_like(*p, at::TensorOptions().requires_grad(false)));
    adam.v.push_back(at::zeros_like(*p, at::TensorOptions().requires_grad(false)));
  }
  RunState st;
  if (!resume_from.empty()) {
    load_checkpoint(resume_from, st, params, adam, method, info, device);
    if (dist::is_main()) truncate_log(log_path, st.step);
    log::info("resuming ", out.string(), " from ", resume_from.filename().string(), " (step ", st.step, ")");
  }
  // Data parallel: every rank starts from rank 0's values (they agree already when the seeded init is
  // deterministic; this makes it so), then the summed gradients keep them equal step by step.
  std::vector<at::Tensor*> param_ptrs;
  for (const auto& [name, p] : params) param_ptrs.push_back(p);
  if (dist::active()) {
    at::NoGradGuard no_grad;
    for (at::Tensor* p : param_ptrs) dist::broadcast(*p);
  }
  dist::GradientReducer reducer(param_ptrs, o.bucket_bytes);
  // Examples without a loss target (e.g. a prompt truncated past max_length) only cost compute.
  std::vector<const data::Example*> usable;
  for (const auto& e : examples) {
    bool target = false;
    for (size_t t = 1; t < e.loss_mask.size() && !target; ++t) target = e.loss_mask[t] != 0;
    if (target) usable.push_back(&e);
  }
  if (usable.empty()) throw Error("train: no example has a loss token (are the prompts longer than train.max_length?)");
  if (usable.size() < examples.size())
    log::warn("train: skipping ", examples.size() - usable.size(), " of ", examples.size(),
              " examples without loss tokens (prompt longer than train.max_length?)");
  const int64_t n = static_cast<int64_t>(usable.size());
  int64_t order_epoch = -1;
  std::vector<int64_t> order;
  auto example_at = [&](int64_t slot) -> const data::Example& {
    const int64_t epoch = slot / n;
    if (epoch != order_epoch) {
      order = epoch_order(n, o.seed, epoch);
      order_epoch = epoch;
    }
    return *usable[static_cast<size_t>(order[static_cast<size_t>(slot % n)])];
  };

  // Packing: rows of max_length tokens (default: the longest example). One packed micro-batch takes the
  // examples from sample slot `cursor` on, first-fit into batch_size rows, until one fits in no row;
  // it returns the rows and the number of slots taken (the data cursor advances by that).
  int64_t pack_length = o.max_length;
  if (o.packing) {
    int64_t longest = 0;
    for (const data::Example* e : usable) longest = std::max<int64_t>(longest, static_cast<int64_t>(e->ids.size()));
    if (pack_length <= 0) pack_length = longest;
    if (longest > pack_length)
      throw Error("train.max_length: packing rows of " + std::to_string(pack_length) + " tokens cannot hold an example of " +
                  std::to_string(longest) + " tokens (load the data with the same train.max_length)");
  }
  auto next_packed = [&](int64_t cursor, int64_t& taken) {
    std::vector<const data::Example*> window;  // the examples from the cursor: more tokens than the rows hold
    std::vector<int64_t> lengths;
    for (int64_t slot = cursor, total = 0; total <= o.batch_size * pack_length; ++slot) {
      window.push_back(&example_at(slot));
      lengths.push_back(static_cast<int64_t>(window.back()->ids.size()));
      total += lengths.back();
    }
    std::vector<std::vector<const data::Example*>> rows;
    taken = 0;
    for (const auto& row : data::pack_first_fit(lengths, o.batch_size, pack_length)) {
      rows.emplace_back();
      for (size_t i : row) rows.back().push_back(window[i]);
      taken += static_cast<int64_t>(row.size());
    }
    return rows;
  };
  if (o.packing && o.packed_epochs > 0) {
    // train.epochs with packing: count the packed micro-batches that consume epoch 0.
    int64_t micro_batches = 0;
    for (int64_t cursor = 0, taken = 0; cursor < n; cursor += taken, ++micro_batches) next_packed(cursor, taken);
    o.steps = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(o.packed_epochs * static_cast<double>(micro_batches) /
                                                                  static_cast<double>(o.grad_accum * dist::world_size()))));
    if (o.warmup_ratio > 0) o.warmup_steps = static_cast<int64_t>(std::ceil(o.warmup_ratio * static_cast<double>(o.steps)));
    log::info("train: ", o.packed_epochs, " epoch(s) of ", micro_batches, " packed micro-batches: ", o.steps, " steps");
  }
  const int64_t world = dist::world_size();
  log::info("train ", method.name(), ": ", params.size(), " tensors, ", numel, " trainable parameters; ", examples.size(),
            " examples, ", o.steps, " steps x ", o.grad_accum, world > 1 ? " x " + std::to_string(world) + " ranks" : "",
            " x ", o.batch_size,
            o.packing ? " packed rows of " + std::to_string(pack_length) + " tokens" : std::string(" sequences"),
            ", lr ", o.lr,
            !o.activation_checkpointing   ? ""
            : o.checkpoint_layers < 0     ? ", activation checkpointing"
                                          : ", activation checkpointing of " + std::to_string(o.checkpoint_layers) + " layers");
  if (dist::is_main()) write_manifest(out, method, info, o, "running", nullptr);

  method.before_training(decoder);
  std::ofstream log_file;  // rank 0 writes the step log
  if (dist::is_main()) {
    log_file.open(log_path, std::ios::app);
    if (!log_file) throw Error(log_path.string() + ": cannot write");
  }
  const int64_t end_step = o.stop_after > 0 ? std::min(o.steps, o.stop_after) : o.steps;
  Progress bar("train " + method.name(), std::max<int64_t>(0, end_step - st.step), o.progress && dist::is_main(), "steps");
  TrainResult result;
  const auto t_start = std::chrono::steady_clock::now();
  const model::ActivationHook* hook = method.activation_hook();

  while (st.step < end_step) {
    const auto t0 = std::chrono::steady_clock::now();
    // The step's micro-batches (built first: the loss weights need the step's label-token count). With
    // data parallelism the step has grad_accum x world micro-batches, dealt round-robin: micro-batch m is
    // rank m % world's, so W ranks with grad_accum A compute the step one process computes with A x W.
    std::vector<data::Batch> micro;
    int64_t label_tokens = 0, step_tokens = 0;
    for (int64_t m = 0; m < o.grad_accum * world; ++m) {
      if (o.packing) {
        int64_t taken = 0;
        auto rows = next_packed(st.samples_seen, taken);
        st.samples_seen += taken;
        micro.push_back(data::make_packed_batch(rows, o.pad_id));
      } else {
        std::vector<data::Example> rows;
        for (int64_t b = 0; b < o.batch_size; ++b) rows.push_back(example_at(st.samples_seen++));
        micro.push_back(data::make_batch(rows, 0, rows.size(), o.pad_id));
      }
      label_tokens += micro.back().num_label_tokens;
      step_tokens += micro.back().num_tokens;
    }
    for (const auto& [name, p] : params) p->mutable_grad() = at::Tensor();
    // The step's summed loss stays on the device until the gradients are complete: reading it after each
    // forward would stall the host there, before it can queue the backward pass.
    at::Tensor loss_sum_device;  // double scalar on the head device, sum of loss x label tokens
    int64_t last_owned = -1;
    for (int64_t m = 0; m < static_cast<int64_t>(micro.size()); ++m)
      if (dist::owns(m)) last_owned = m;
    for (int64_t m = 0; m < static_cast<int64_t>(micro.size()); ++m) {
      if (!dist::owns(m)) continue;
      if (m == last_owned) reducer.arm();  // its backward completes the step's gradients: sum them meanwhile
      const data::Batch& batch = micro[static_cast<size_t>(m)];
      at::Tensor extra = m == 0 ? method.extra_loss(decoder, st.step) : at::Tensor();
      if (batch.num_label_tokens == 0 && !extra.defined()) continue;
      at::Tensor loss_total;
      method.before_forward(batch);
      {
        AutocastGuard autocast(device);
        model::ForwardInput in;
        in.input_ids = batch.input_ids.to(device);  // [B, T]
        // Rows are right-padded, so causal attention alone is exact for every real token (no mask lets
        // SDPA use its flash kernels); packed rows need their segments' block-diagonal mask.
        if (batch.segment_ids.defined()) {
          in.attention_mask = batch.attention_mask.to(device);  // [B, T]
          in.segment_ids = batch.segment_ids.to(device);        // [B, T]
        }
        model::ForwardOptions fo;
        fo.training = true;
        fo.hook = hook;
        fo.checkpoint_layers = o.activation_checkpointing;
        fo.checkpoint_layer_count = o.checkpoint_layers;
        fo.logits = false;  // the loss comes from last_hidden a chunk at a time, never the [B, T, V] logits
        auto fwd = decoder.forward(in, fo);                                   // last_hidden [B, T, H]
        if (batch.num_label_tokens > 0) {
          at::Tensor loss = model::chunked_causal_lm_loss(fwd.last_hidden, decoder.head_weight(), batch.labels);  // scalar fp32
          const at::Tensor weighted = loss.detach().to(at::kDouble) * static_cast<double>(batch.num_label_tokens);
          loss_sum_device = loss_sum_device.defined() ? loss_sum_device + weighted : weighted;
          loss_total = loss * (static_cast<double>(batch.num_label_tokens) / static_cast<double>(label_tokens));
        }
        if (extra.defined()) loss_total = loss_total.defined() ? loss_total + extra : extra;
      }
      loss_total.backward();
    }
    const int64_t overlapped = reducer.finish();
    if (dist::active())
      log::debug("step ", st.step + 1, ": ", overlapped, " of ", reducer.num_buckets(),
                 " gradient buckets were sent during the backward pass");
    const double loss_sum = dist::sum(loss_sum_device.defined() ? loss_sum_device.item<double>() : 0.0);
    method.before_optimizer_step(decoder, st.step);

    const double lr = learning_rate(o, st.step);
    double grad_norm = 0.0;
    {
      at::NoGradGuard no_grad;
      // The tensors with a gradient this step, as lists for the multi-tensor (_foreach) ops: on CUDA a
      // few kernels for all of them instead of several per tensor (a LoRA of every projection of a
      // 32-layer model has 448); on the CPU they are the same per-tensor ops, in the same order.
      std::vector<at::Tensor> ps, gs, ms, vs;
      for (size_t i = 0; i < params.size(); ++i) {
        const at::Tensor& p = *params[i].second;
        if (!p.grad().defined()) continue;
        ps.push_back(p);
        gs.push_back(p.grad());
        ms.push_back(adam.m[i]);
        vs.push_back(adam.v[i]);
      }
      if (!gs.empty()) {
        std::vector<at::Tensor> norms = at::_foreach_norm(gs, 2, at::kDouble);  // fp64 per tensor
        for (auto& n : norms) n = n.to(device);  // grads may sit on several GPUs
        grad_norm = std::sqrt(at::stack(norms).pow(2).sum().item<double>());
      }
      if (o.clip > 0 && grad_norm > o.clip) at::_foreach_mul_(gs, o.clip / (grad_norm + 1e-6));
      // AdamW (torch.optim.AdamW's update: decoupled decay, bias-corrected moments).
      adam.t += 1;
      const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(adam.t));
      const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(adam.t));
      if (!gs.empty()) {
        if (o.weight_decay > 0) at::_foreach_mul_(ps, 1.0 - lr * o.weight_decay);
        at::_foreach_lerp_(ms, gs, 1.0 - o.beta1);
        at::_foreach_mul_(vs, o.beta2);
        at::_foreach_addcmul_(vs, gs, gs, 1.0 - o.beta2);
        std::vector<at::Tensor> denom = at::_foreach_sqrt(vs);
        at::_foreach_div_(denom, std::sqrt(bc2));
        at::_foreach_add_(denom, o.eps);
        at::_foreach_addcdiv_(ps, ms, denom, -lr / bc1);
      }
    }
    method.after_optimizer_step(decoder, st.step);
    for (const auto& [name, p] : params) p->mutable_grad() = at::Tensor();

    st.step += 1;
    st.tokens += step_tokens;
    const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double loss = label_tokens > 0 ? loss_sum / static_cast<double>(label_tokens) : 0.0;
    result.last_loss = loss;
    result.tokens += step_tokens;
    if (dist::is_main() && (st.step % o.log_every == 0 || st.step == o.steps || st.step == end_step)) {
      const json line = {{"step", st.step},     {"loss", loss}, {"lr", lr},  {"tokens", st.tokens},
                         {"tokens_per_s", step_s > 0 ? static_cast<double>(step_tokens) / step_s : 0.0},
                         {"grad_norm", grad_norm}};
      log_file << line.dump() << "\n";
      log_file.flush();
      log::debug("step ", st.step, "/", o.steps, " loss ", loss, " lr ", lr, " grad_norm ", grad_norm);
    }
    char postfix[64];
    std::snprintf(postfix, sizeof postfix, "loss %.4f lr %.3g", loss, lr);
    bar.set_postfix(postfix);
    bar.update(1, step_tokens);
    const bool periodic = o.checkpoint_every > 0 && st.step % o.checkpoint_every == 0;
    if (periodic || st.step == end_step) save_checkpoint(out, st, params, adam, method, info, o, device);
  }
  bar.finish();
  result.steps_done = st.step;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  result.tokens_per_s = result.seconds > 0 ? static_cast<double>(result.tokens) / result.seconds : 0.0;
  result.finished = st.step >= o.steps;
  const json rj = {{"steps_done", result.steps_done}, {"last_loss", result.last_loss},
                   {"tokens", result.tokens},         {"seconds", result.seconds},
                   {"tokens_per_s", result.tokens_per_s}};
  if (dist::is_main()) {
    if (result.finished) method.save_output(decoder, out);
    write_manifest(out, method, info, o, result.finished ? "finished" : "stopped", rj);
  }
  dist::barrier();  // the stage's files exist for every rank once train() returns
  return result;
}

}  // namespace sparsecl::train
