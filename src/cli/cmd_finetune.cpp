// `sparsecl finetune-<method>` (lora, mask, orth, full, migu): one fine-tuning stage on one JSONL file with
// the shared trainer (include/sparsecl/train/trainer.h, docs/train.md); the method comes from
// train::make_method, the one name -> Method mapping the `run` driver uses too.
//
// Settings come from one resolved config: the schema's defaults, then `-c CONFIG` (YAML), then
// `key=value` overrides, then any flag given explicitly (each flag is the config key it names:
// --steps = train.steps, --lr = train.lr for lora / train.lr_dense for full, --batch-size =
// train.batch_size, --max-length = train.max_length, --seed = train.seed, --model = model,
// --output = output, --device = device, --dtype = dtype). The data file is --data, or, without it,
// data.<first of stages>.train. --heldout FILE adds the held-out loss before and after training
// (heldout.json). --resume continues the run in --output from its newest checkpoint.
// --previous DIR (repeatable, oldest first) names earlier stages' output directories: each is applied to
// the base model (train::apply_stage_output, its method read from its manifest.json) before training,
// and the method sees them (mask.exclude_previous, orth's bases) as the `run` driver would pass them.
#include <fstream>

#include "sparsecl/cli/commands.h"
#include "sparsecl/cli/distributed.h"
#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/schema.h"
#include "sparsecl/data/dataset.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/text/tokenizer.h"
#include "sparsecl/train/methods.h"
#include "sparsecl/train/trainer.h"

namespace sparsecl::cli {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct FinetuneArgs {
  std::string method;  // "lora" | "full" | "mask" | "orth" | "migu"
  std::string config_file;
  std::vector<std::string> overrides, previous;
  std::string model, data, heldout, output, device, dtype;
  int64_t steps = 0, batch_size = 0, max_length = 0, seed = 0, heldout_samples = 32;
  double lr = 0;
  bool resume = false, no_progress = false;
  CLI::App* cmd = nullptr;
  bool given(const char* flag) const { return cmd->count(flag) > 0; }
};

// Methods that train base weights or neuron deltas of them: their --lr is train.lr_dense.
bool trains_base_weights(const std::string& method) { return method == "full" || method == "migu" || method == "mask"; }
// Methods whose trainable tensors ARE the base weights: they need fp32 weights (the masters).
bool needs_fp32_weights(const std::string& method) { return method == "full" || method == "migu"; }

void run_finetune(const FinetuneArgs& a) {
  const bool dense = trains_base_weights(a.method);
  config::Config cfg = a.config_file.empty() ? config::Config(config::schema()) : config::load(a.config_file, {});
  cfg.apply_overrides(a.overrides);
  if (a.given("--model")) cfg.set("model", a.model, "--model");
  if (a.given("--steps")) cfg.set("train.steps", a.steps, "--steps");
  if (a.given("--lr")) cfg.set(dense ? "train.lr_dense" : "train.lr", a.lr, "--lr");
  if (a.given("--batch-size")) cfg.set("train.batch_size", a.batch_size, "--batch-size");
  if (a.given("--max-length")) cfg.set("train.max_length", a.max_length, "--max-length");
  if (a.given("--seed")) cfg.set("train.seed", a.seed, "--seed");
  if (a.given("--device")) cfg.set("device", a.device.rfind("cuda", 0) == 0 ? std::string("cuda") : a.device, "--device");
  if (a.given("--dtype")) cfg.set("dtype", a.dtype, "--dtype");
  if (a.given("--output")) cfg.set("output", a.output, "--output");
  const std::string cmd_name = "finetune-" + a.method;
  if (!a.given("--output") && a.config_file.empty() &&
      std::none_of(a.overrides.begin(), a.overrides.end(), [](const std::string& o) { return o.rfind("output=", 0) == 0; }))
    throw Error(cmd_name + ": --output DIR is required (or -c CONFIG / output=DIR)");

  std::string data_file = a.data;
  if (data_file.empty()) {
    const auto stages = cfg.get<config::StringList>("stages");
    if (stages.empty()) throw Error(cmd_name + ": --data FILE.jsonl is required (stages is empty)");
    data_file = cfg.get<std::string>("data." + stages[0] + ".train");
  }
  if (!fs::exists(data_file)) throw Error(cmd_name + ": data file " + data_file + " does not exist");
  const fs::path model_dir = cfg.get<std::string>("model");
  const fs::path out = cfg.get<std::string>("output");

  train::RunInfo info;
  info.config = cfg.to_json();
  const json stage_json = {{"method", a.method}, {"data", data_file}, {"previous", a.previous}};
  info.config["finetune"] = stage_json;
  // The data file and the earlier stages are part of what the run computes, so part of the hash.
  info.config_hash = config::fnv1a64_hex(cfg.to_json(true).dump() + stage_json.dump());
  info.base_model = model_dir.string();

  // Options we do not implement fail here, before the model and the data are loaded.
  (void)train::TrainOptions::from_config(cfg, dense, 1);
  if (!dense) (void)train::lora_config_from(cfg);
  if (needs_fp32_weights(a.method) && cfg.get<std::string>("dtype") != "float32")
    throw Error(cmd_name + ": dtype=" + cfg.get<std::string>("dtype") + ": " + a.method +
                " trains base weights and needs float32 weights (the fp32 masters; cuda computes under bf16 autocast)");
  std::vector<std::pair<std::string, fs::path>> previous;  // (method, dir), oldest first
  for (const auto& p : a.previous) {
    const json manifest = read_json_file(fs::path(p) / "manifest.json", "earlier stage manifest");
    if (manifest.value("status", "") != "finished")
      throw Error(cmd_name + ": --previous " + p + " is not a finished stage (manifest.json status '" +
                  manifest.value("status", "") + "')");
    previous.push_back({manifest.at("method").get<std::string>(), p});
  }
  const std::string device_name = a.given("--device") ? a.device : cfg.get<std::string>("device");
  join_job(device_name);  // torchrun / srun: data parallel over the job's processes
  auto decoder = model::load_decoder(model_dir, model::parse_dtype(cfg.get<std::string>("dtype")), device_name,
                                     cfg.get<std::string>("device_map"));
  for (const auto& [m, dir] : previous) {
    log::info(cmd_name, ": applying earlier stage ", dir.string(), " (", m, ")");
    train::apply_stage_output(decoder, m, dir);
  }
  auto tokenizer = text::Tokenizer::load_if_present(model_dir);
  const int64_t pad_id = data::pad_id_for(tokenizer.get());
  data::LoadOptions lo;
  lo.max_length = cfg.get<int64_t>("train.max_length");
  lo.shuffle = false;  // the trainer shuffles per epoch with train.seed
  const auto examples = data::load_jsonl(data_file, tokenizer.get(), lo);
  const auto summary = data::summarize(examples);
  log::info(cmd_name, ": ", summary.examples, " examples, ", summary.tokens, " tokens (", summary.loss_tokens,
            " loss tokens, ", summary.truncated, " truncated) from ", data_file);

  std::vector<data::Example> heldout;
  json heldout_json;
  if (!a.heldout.empty()) {
    data::LoadOptions ho;
    ho.max_length = lo.max_length;
    ho.shuffle = false;
    ho.max_samples = a.heldout_samples;
    heldout = data::load_jsonl(a.heldout, tokenizer.get(), ho);
    const auto held = train::heldout_loss(decoder, heldout, cfg.get<int64_t>("train.batch_size"), pad_id);
    if (held.label_tokens == 0) throw Error("--heldout " + a.heldout + ": the records have no loss tokens");
    const double before = held.loss;
    heldout_json = {{"file", a.heldout}, {"examples", heldout.size()}, {"before", before}};
    log::info(cmd_name, ": held-out loss before ", before);
  }

  train::TrainOptions o = train::TrainOptions::from_config(cfg, dense, static_cast<int64_t>(examples.size()));
  o.resume = a.resume;
  o.progress = !a.no_progress;
  o.pad_id = pad_id;
  train::StageContext ctx;
  ctx.examples = &examples;
  for (const auto& pr : previous) ctx.previous.push_back(pr.second);
  ctx.pad_id = pad_id;
  ctx.seed = o.seed;
  std::unique_ptr<train::Method> method = train::make_method(a.method, cfg, ctx);
  const auto result = train::train(decoder, *method, examples, o, out, info);
  // What later stages must respect (orth's bases, mask's neurons) goes next to the product.
  if (result.finished) method->finish_stage(decoder, examples, out);
  log::info(cmd_name, ": ", result.steps_done, " steps, last loss ", result.last_loss, ", ", result.tokens_per_s,
            " tokens/s");

  if (!heldout.empty()) {
    const double after = train::heldout_loss(decoder, heldout, cfg.get<int64_t>("train.batch_size"), pad_id).loss;
    heldout_json["after"] = after;
    heldout_json["config_hash"] = info.config_hash;
    heldout_json["tokens_per_s"] = result.tokens_per_s;
    log::info(cmd_name, ": held-out loss after ", after);
    if (dist::is_main()) write_file_atomic(out / "heldout.json", heldout_json.dump(2) + "\n");
  }
}

void add_one(CLI::App& root, const std::string& method, const std::string& help) {
  auto* cmd = root.add_subcommand("finetune-" + method, help);
  auto a = std::make_shared<FinetuneArgs>();
  a->method = method;
  a->cmd = cmd;
  cmd->add_option("-c,--config", a->config_file, "YAML config (train.*, lora.*, model, ...)")->check(CLI::ExistingFile);
  cmd->add_option("overrides", a->overrides, "key=value config overrides (e.g. train.grad_accum=4)");
  cmd->add_option("--model", a->model, "HF model directory (model)");
  cmd->add_option("--data", a->data, "training JSONL (default: data.<first stage>.train)");
  cmd->add_option("--output", a->output, "output directory (output)");
  cmd->add_option("--steps", a->steps, "optimizer steps (train.steps)");
  cmd->add_option("--lr", a->lr, trains_base_weights(method) ? "peak learning rate (train.lr_dense)" : "peak learning rate (train.lr)");
  cmd->add_option("--batch-size", a->batch_size, "sequences per micro-batch (train.batch_size)");
  cmd->add_option("--max-length", a->max_length, "tokens per sequence (train.max_length)");
  cmd->add_option("--seed", a->seed, "seed of data order, init and dropout (train.seed)");
  cmd->add_option("--device", a->device, "cpu or cuda (device)");
  cmd->add_option("--dtype", a->dtype, "dtype of the frozen weights (dtype)")->check(CLI::IsMember({"float32", "bfloat16", "float16"}));
  cmd->add_option("--heldout", a->heldout, "held-out JSONL: loss before and after training into heldout.json");
  cmd->add_option("--heldout-samples", a->heldout_samples, "first N held-out records (0: all)")->capture_default_str();
  cmd->add_option("--previous", a->previous, "earlier stage output directory, applied to the model first (repeat, oldest first)")
      ->allow_extra_args(false);
  cmd->add_flag("--resume", a->resume, "continue the run in --output from its newest checkpoint");
  cmd->add_flag("--no-progress", a->no_progress, "no progress bar on stderr");
  cmd->callback([a] { run_finetune(*a); });
}

}  // namespace

void add_finetune(CLI::App& root) {
  add_one(root, "lora", "Fine-tune new LoRA adapters on one JSONL file (PEFT layout output)");
  add_one(root, "mask", "Approach A: train only each layer's top neurons of the data (compact deltas; mask.*)");
  add_one(root, "orth", "Approach B: LoRA orthogonal to earlier stages' subspace (--previous; orth.*)");
  add_one(root, "full", "Fine-tune every weight on one JSONL file (baseline; fp32 weights)");
  add_one(root, "migu", "MIGU baseline: full fine-tuning with magnitude-gated gradient rows (migu.*)");
}

}  // namespace sparsecl::cli
