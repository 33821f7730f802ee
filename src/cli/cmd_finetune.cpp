// `sparsecl finetune-lora` and `sparsecl finetune-full`: one fine-tuning stage on one JSONL file with the
// shared trainer (include/sparsecl/train/trainer.h, docs/train.md).
//
// Settings come from one resolved config: the schema's defaults, then `-c CONFIG` (YAML), then
// `key=value` overrides, then any flag given explicitly (each flag is the config key it names:
// --steps = train.steps, --lr = train.lr for lora / train.lr_dense for full, --batch-size =
// train.batch_size, --max-length = train.max_length, --seed = train.seed, --model = model,
// --output = output, --device = device, --dtype = dtype). The data file is --data, or, without it,
// data.<first of stages>.train. --heldout FILE adds the held-out loss before and after training
// (heldout.json). --resume continues the run in --output from its newest checkpoint.
#include <fstream>

#include "sparsecl/cli/commands.h"
#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/schema.h"
#include "sparsecl/data/dataset.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/text/tokenizer.h"
#include "sparsecl/train/methods.h"
#include "sparsecl/train/trainer.h"

namespace sparsecl::cli {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct FinetuneArgs {
  std::string method;  // "lora" | "full"
  std::string config_file;
  std::vector<std::string> overrides;
  std::string model, data, heldout, output, device, dtype;
  int64_t steps = 0, batch_size = 0, max_length = 0, seed = 0, heldout_samples = 32;
  double lr = 0;
  bool resume = false, no_progress = false;
  CLI::App* cmd = nullptr;
  bool given(const char* flag) const { return cmd->count(flag) > 0; }
};

void run_finetune(const FinetuneArgs& a) {
  const bool dense = a.method == "full";
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
  info.config["finetune"] = {{"method", a.method}, {"data", data_file}};
  // The data file is part of what the run computes, so it is part of the hash.
  info.config_hash = config::fnv1a64_hex(cfg.to_json(true).dump() + json({{"method", a.method}, {"data", data_file}}).dump());
  info.base_model = model_dir.string();

  // Options we do not implement fail here, before the model and the data are loaded.
  (void)train::TrainOptions::from_config(cfg, dense, 1);
  if (!dense) (void)train::lora_config_from(cfg);
  if (dense && cfg.get<std::string>("dtype") != "float32")
    throw Error(cmd_name + ": dtype=" + cfg.get<std::string>("dtype") +
                ": full fine-tuning needs float32 weights (the fp32 masters; cuda computes under bf16 autocast)");
  const std::string device_name = a.given("--device") ? a.device : cfg.get<std::string>("device");
  auto decoder = model::Decoder::load(model_dir, model::parse_dtype(cfg.get<std::string>("dtype")),
                                      model::parse_device(device_name));
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
    const double before = train::heldout_loss(decoder, heldout, cfg.get<int64_t>("train.batch_size"), pad_id);
    heldout_json = {{"file", a.heldout}, {"examples", heldout.size()}, {"before", before}};
    log::info(cmd_name, ": held-out loss before ", before);
  }

  train::TrainOptions o = train::TrainOptions::from_config(cfg, dense, static_cast<int64_t>(examples.size()));
  o.resume = a.resume;
  o.progress = !a.no_progress;
  o.pad_id = pad_id;
  std::unique_ptr<train::Method> method;
  if (dense)
    method = std::make_unique<train::FullMethod>();
  else
    method = std::make_unique<train::LoraMethod>(train::lora_config_from(cfg), o.seed);
  const auto result = train::train(decoder, *method, examples, o, out, info);
  log::info(cmd_name, ": ", result.steps_done, " steps, last loss ", result.last_loss, ", ", result.tokens_per_s,
            " tokens/s");

  if (!heldout.empty()) {
    const double after = train::heldout_loss(decoder, heldout, cfg.get<int64_t>("train.batch_size"), pad_id);
    heldout_json["after"] = after;
    heldout_json["config_hash"] = info.config_hash;
    heldout_json["tokens_per_s"] = result.tokens_per_s;
    log::info(cmd_name, ": held-out loss after ", after);
    const fs::path path = out / "heldout.json", tmp = out / "heldout.json.tmp";
    {
      std::ofstream f(tmp);
      f << heldout_json.dump(2) << "\n";
      if (!f) throw Error(tmp.string() + ": write failed");
    }
    fs::rename(tmp, path);
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
  cmd->add_option("--lr", a->lr, method == "full" ? "peak learning rate (train.lr_dense)" : "peak learning rate (train.lr)");
  cmd->add_option("--batch-size", a->batch_size, "sequences per micro-batch (train.batch_size)");
  cmd->add_option("--max-length", a->max_length, "tokens per sequence (train.max_length)");
  cmd->add_option("--seed", a->seed, "seed of data order, init and dropout (train.seed)");
  cmd->add_option("--device", a->device, "cpu or cuda (device)");
  cmd->add_option("--dtype", a->dtype, "dtype of the frozen weights (dtype)")->check(CLI::IsMember({"float32", "bfloat16", "float16"}));
  cmd->add_option("--heldout", a->heldout, "held-out JSONL: loss before and after training into heldout.json");
  cmd->add_option("--heldout-samples", a->heldout_samples, "first N held-out records (0: all)")->capture_default_str();
  cmd->add_flag("--resume", a->resume, "continue the run in --output from its newest checkpoint");
  cmd->add_flag("--no-progress", a->no_progress, "no progress bar on stderr");
  cmd->callback([a] { run_finetune(*a); });
}

}  // namespace

void add_finetune(CLI::App& root) {
  add_one(root, "lora", "Fine-tune new LoRA adapters on one JSONL file (PEFT layout output)");
  add_one(root, "full", "Fine-tune every weight on one JSONL file (baseline; fp32 weights)");
}

}  // namespace sparsecl::cli
