// `sparsecl eval`: held-out loss and task scores of one model (base, base + PEFT adapter attached or
// merged, or a merged/full model directory) over the configured domains, into DIR/eval.json
// (docs/eval.md "sparsecl eval"; the scoring itself is eval::evaluate_domains, which `run` reuses).
//
// Settings come from one resolved config: the schema's defaults, then `-c CONFIG` (YAML), then
// `key=value` overrides, then any flag given explicitly (each flag is the config key it names:
// --model = model, --output = output, --max-samples = eval.max_samples, --heldout-samples =
// eval.heldout_samples, --batch-size = eval.batch_size, --run-code = eval.run_code, --device = device,
// --dtype = dtype). --domains (default: stages), --adapter and --merge are not config keys; they are
// recorded in the provenance and hashed with the config.
#include <sstream>

#include "sparsecl/cli/commands.h"
#include "sparsecl/cli/distributed.h"
#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/schema.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/eval/evaluate.h"
#include "sparsecl/io/provenance.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/lora.h"
#include "sparsecl/text/tokenizer.h"

namespace sparsecl::cli {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct EvalArgs {
  std::string config_file;
  std::vector<std::string> overrides;
  std::string model, adapter, output, domains, device, dtype;
  int64_t max_samples = 0, heldout_samples = 0, batch_size = 0;
  bool merge = false, run_code = false, no_progress = false;
  CLI::App* cmd = nullptr;
  bool given(const char* flag) const { return cmd->count(flag) > 0; }
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

void run_eval(const EvalArgs& a) {
  config::Config cfg = a.config_file.empty() ? config::Config(config::schema()) : config::load(a.config_file, {});
  cfg.apply_overrides(a.overrides);
  if (a.given("--model")) cfg.set("model", a.model, "--model");
  if (a.given("--max-samples")) cfg.set("eval.max_samples", a.max_samples, "--max-samples");
  if (a.given("--heldout-samples")) cfg.set("eval.heldout_samples", a.heldout_samples, "--heldout-samples");
  if (a.given("--batch-size")) cfg.set("eval.batch_size", a.batch_size, "--batch-size");
  if (a.given("--run-code")) cfg.set("eval.run_code", true, "--run-code");
  if (a.given("--device")) cfg.set("device", a.device.rfind("cuda", 0) == 0 ? std::string("cuda") : a.device, "--device");
  if (a.given("--dtype")) cfg.set("dtype", a.dtype, "--dtype");
  if (a.given("--output")) cfg.set("output", a.output, "--output");
  if (!a.given("--output") && a.config_file.empty() &&
      std::none_of(a.overrides.begin(), a.overrides.end(), [](const std::string& o) { return o.rfind("output=", 0) == 0; }))
    throw Error("eval: --output DIR is required (or -c CONFIG / output=DIR)");
  if (a.merge && a.adapter.empty()) throw Error("eval: --merge needs --adapter DIR");

  eval::EvaluateSettings settings;
  settings.domains = a.given("--domains") ? split_list(a.domains) : cfg.get<config::StringList>("stages");
  if (settings.domains.empty()) throw Error("eval: no domains (--domains or stages)");
  for (const auto& d : settings.domains)
    if (!cfg.schema().find("data." + d + ".heldout"))
      throw Error("eval: unknown domain '" + d + "' (known: code, math, medical, chat)");
  settings.progress = !a.no_progress;

  const fs::path model_dir = cfg.get<std::string>("model");
  const fs::path out = cfg.get<std::string>("output");
  if (!fs::is_directory(model_dir)) throw Error("eval: model directory " + model_dir.string() + " does not exist");
  if (!a.adapter.empty() && !fs::is_directory(a.adapter))
    throw Error("eval: adapter directory " + a.adapter + " does not exist");
  // Every data file is checked before the model is loaded.
  for (const auto& d : settings.domains) {
    std::vector<std::string> files = cfg.get<config::StringList>("data." + d + ".tasks");
    files.push_back(cfg.get<std::string>("data." + d + ".heldout"));
    for (const auto& f : files)
      if (!f.empty() && !fs::exists(f)) throw Error("eval: data file " + f + " (domain " + d + ") does not exist");
  }

  const json cli = {{"domains", settings.domains}, {"adapter", a.adapter.empty() ? json(nullptr) : json(a.adapter)},
                    {"merge", a.merge}};
  json resolved = cfg.to_json();
  resolved["eval_cli"] = cli;
  const std::string config_hash = config::fnv1a64_hex(cfg.to_json(true).dump() + cli.dump());

  const std::string device_name = a.given("--device") ? a.device : cfg.get<std::string>("device");
  join_job(device_name);  // torchrun / srun: every scorer's batches are split over the job's processes
  log::info("eval: loading ", model_dir.string(), a.adapter.empty() ? "" : " + adapter " + a.adapter,
            a.merge ? " (merged)" : "");
  auto decoder = model::load_decoder(model_dir, model::parse_dtype(cfg.get<std::string>("dtype")), device_name,
                                     cfg.get<std::string>("device_map"));
  if (!a.adapter.empty()) {
    model::attach_lora(decoder, model::LoraAdapter::load(a.adapter));
    if (a.merge) model::merge_lora(decoder);
  }
  auto tokenizer = text::Tokenizer::load_if_present(model_dir);
  if (!tokenizer && !a.adapter.empty()) tokenizer = text::Tokenizer::load_if_present(a.adapter);
  if (!tokenizer) log::warn("eval: no tokenizer in ", model_dir.string(), "; only {\"ids\"} held-out files can be scored");

  json result = eval::evaluate_domains(decoder, tokenizer.get(), cfg, settings);
  const auto seeds = cfg.get<config::IntList>("seeds");
  result["provenance"] = {{"config", resolved},
                          {"config_hash", config_hash},
                          {"model", model_dir.string()},
                          {"adapter", cli["adapter"]},
                          {"merged", a.merge},
                          {"seed", seeds.empty() ? json(nullptr) : json(seeds[0])},
                          {"world_size", dist::world_size()},  // data-parallel processes that computed it
                          {"versions", io::software_versions()}};
  if (dist::is_main()) {
    fs::create_directories(out);
    write_file_atomic(out / "eval.json", result.dump(2) + "\n");
    log::info("eval: wrote ", (out / "eval.json").string());
  }
}

}  // namespace

void add_eval(CLI::App& root) {
  auto* cmd = root.add_subcommand("eval", "Held-out loss and task scores per domain into DIR/eval.json");
  auto a = std::make_shared<EvalArgs>();
  a->cmd = cmd;
  cmd->add_option("-c,--config", a->config_file, "YAML config (eval.*, data.*, model, ...)")->check(CLI::ExistingFile);
  cmd->add_option("overrides", a->overrides, "key=value config overrides (e.g. eval.max_samples=50)");
  cmd->add_option("--model", a->model, "HF model directory: base, merged or fully fine-tuned (model)");
  cmd->add_option("--adapter", a->adapter, "PEFT LoRA adapter directory attached to --model");
  cmd->add_flag("--merge", a->merge, "merge the adapter into the base weights before scoring");
  cmd->add_option("--output", a->output, "directory for eval.json (output)");
  cmd->add_option("--domains", a->domains, "comma-separated domains (default: stages)");
  cmd->add_option("--max-samples", a->max_samples, "records per task file, 0: all (eval.max_samples)");
  cmd->add_option("--heldout-samples", a->heldout_samples, "records per held-out file, 0: all (eval.heldout_samples)");
  cmd->add_option("--batch-size", a->batch_size, "sequences per forward / generation batch (eval.batch_size)");
  cmd->add_flag("--run-code", a->run_code, "execute generated programs in the sandbox for code pass@1 (eval.run_code)");
  cmd->add_option("--device", a->device, "cpu, cuda or cuda:N (device)");
  cmd->add_option("--dtype", a->dtype, "compute dtype (dtype)")->check(CLI::IsMember({"float32", "bfloat16", "float16"}));
  cmd->add_flag("--no-progress", a->no_progress, "no progress bars on stderr");
  cmd->callback([a] { run_eval(*a); });
}

}  // namespace sparsecl::cli
