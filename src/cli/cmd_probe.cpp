// `sparsecl probe`: the H1 probe (DESIGN.md "Probing", docs/probe.md). Which neurons does each domain
// use per layer, how much do the domains' top-K sets overlap, and is that overlap lower than chance?
//
// Settings come from one resolved config (src/config/schema.cpp): the schema's defaults, then
// `-c CONFIG` (YAML), then `key=value` overrides, then any flag given explicitly (each flag is the
// config key it names; the resolved config and its hash go into probe.json's provenance). Domains are
// `--domain NAME=FILE.jsonl` (repeatable, any names) or, without it, `probe.domains` with each domain's
// `data.<d>.<probe.split>` file. Models are `--model DIR` (repeatable: a scale sweep) or the config's
// `models` / `model`.
#include <algorithm>
#include <map>

#include "sparsecl/cli/commands.h"
#include "sparsecl/cli/distributed.h"
#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/schema.h"
#include "sparsecl/probe/probe.h"

namespace sparsecl::cli {

namespace {

struct ProbeArgs {
  std::string config_file;
  std::vector<std::string> overrides;
  std::vector<std::string> models, domains;
  double top_ratio = 0.05;
  std::string score, device, dtype, output;
  int64_t max_samples = 0, batch_size = 0, max_length = 0, permutations = 0, token_pairs = 0;
  int64_t token_reservoir = 4096, seed = 0;
  bool gradient_overlap = false, no_progress = false;
  CLI::App* cmd = nullptr;
  bool given(const char* flag) const { return cmd->count(flag) > 0; }
};

void run_probe_cmd(const ProbeArgs& a) {
  config::Config cfg = a.config_file.empty() ? config::Config(config::schema())
                                             : config::load(a.config_file, {});
  cfg.apply_overrides(a.overrides);
  // Explicit flags are overrides of the keys they name.
  if (a.given("--model")) cfg.set("models", config::StringList(a.models), "--model");
  if (a.given("--top-ratio")) cfg.set("probe.top_ratio", a.top_ratio, "--top-ratio");
  if (a.given("--score")) cfg.set("probe.score", a.score, "--score");
  if (a.given("--max-samples")) cfg.set("probe.max_samples", a.max_samples, "--max-samples");
  if (a.given("--batch-size")) cfg.set("probe.batch_size", a.batch_size, "--batch-size");
  if (a.given("--max-length")) cfg.set("probe.max_length", a.max_length, "--max-length");
  if (a.given("--permutations")) cfg.set("probe.permutations", a.permutations, "--permutations");
  if (a.given("--token-pairs")) cfg.set("probe.token_pairs", a.token_pairs, "--token-pairs");
  if (a.given("--gradient-overlap")) cfg.set("probe.gradients", true, "--gradient-overlap");
  if (a.given("--seed")) cfg.set("seeds", config::IntList{a.seed}, "--seed");
  if (a.given("--device")) cfg.set("device", a.device.rfind("cuda", 0) == 0 ? std::string("cuda") : a.device, "--device");
  if (a.given("--dtype")) cfg.set("dtype", a.dtype, "--dtype");
  if (a.given("--output")) cfg.set("output", a.output, "--output");

  std::vector<std::filesystem::path> models;
  for (const auto& m : cfg.get<config::StringList>("models")) models.emplace_back(m);
  if (models.empty()) models.emplace_back(cfg.get<std::string>("model"));

  std::vector<probe::Domain> domains;
  nlohmann::json domain_json = nlohmann::json::array();
  if (!a.domains.empty()) {
    for (const auto& spec : a.domains) {
      const auto eq = spec.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size())
        throw Error("probe: --domain expects NAME=FILE.jsonl, got '" + spec + "'");
      domains.push_back({spec.substr(0, eq), spec.substr(eq + 1)});
    }
  } else {
    const std::string split = cfg.get<std::string>("probe.split");
    for (const auto& d : cfg.get<config::StringList>("probe.domains"))
      domains.push_back({d, cfg.get<std::string>("data." + d + "." + split)});
  }
  if (!a.given("--output") && a.config_file.empty() &&
      std::none_of(a.overrides.begin(), a.overrides.end(), [](const std::string& o) { return o.rfind("output=", 0) == 0; }))
    throw Error("probe: --output DIR is required (or -c CONFIG / output=DIR)");
  for (const auto& d : domains) domain_json.push_back({{"name", d.name}, {"file", d.file.string()}});

  probe::Settings s = probe::Settings::from_config(cfg);
  if (a.given("--device")) s.device = a.device;  // keeps an explicit cuda:N
  s.token_reservoir = a.token_reservoir;
  s.progress = !a.no_progress;

  probe::RunInfo info;
  info.config = cfg.to_json();
  info.config["probe_domains_resolved"] = domain_json;  // what was probed, whichever way it was named
  info.config["probe_token_reservoir"] = s.token_reservoir;
  // The config hash covers the probed files too when --domain named them outside the config.
  info.config_hash = a.domains.empty() ? cfg.hash()
                                       : config::fnv1a64_hex(cfg.to_json(true).dump() + domain_json.dump() +
                                                             std::to_string(s.token_reservoir));
  join_job(s.device);  // torchrun / srun: the domains' batches are split over the job's processes
  probe::run_probe(models, domains, s, cfg.get<std::string>("output"), info);
}

}  // namespace

void add_probe(CLI::App& root) {
  auto* cmd = root.add_subcommand("probe", "H1 probe: per-domain MLP neuron usage, top-K overlap and its nulls");
  auto a = std::make_shared<ProbeArgs>();
  a->cmd = cmd;
  cmd->add_option("-c,--config", a->config_file, "YAML config (probe.*, model/models, data.*)")->check(CLI::ExistingFile);
  cmd->add_option("overrides", a->overrides, "key=value config overrides (e.g. probe.top_ratio=0.1)");
  cmd->add_option("--model", a->models, "HF model directory (repeat for a scale sweep)")->allow_extra_args(false);
  cmd->add_option("--domain", a->domains, "NAME=FILE.jsonl (repeat; default: probe.domains from the config)")
      ->allow_extra_args(false);
  cmd->add_option("--top-ratio", a->top_ratio, "K = ratio * intermediate_size (probe.top_ratio)");
  cmd->add_option("--score", a->score, "neuron score for the domain sets (probe.score)")->check(CLI::IsMember({"mean_abs", "freq"}));
  cmd->add_option("--max-samples", a->max_samples, "sequences per domain (probe.max_samples)");
  cmd->add_option("--batch-size", a->batch_size, "sequences per forward pass (probe.batch_size)");
  cmd->add_option("--max-length", a->max_length, "tokens per sequence (probe.max_length)");
  cmd->add_option("--permutations", a->permutations, "permutation-null draws per (layer, pair) (probe.permutations)");
  cmd->add_option("--token-pairs", a->token_pairs, "token pairs per (layer, domain / pair) (probe.token_pairs)");
  cmd->add_option("--token-reservoir", a->token_reservoir, "per-token bitsets kept per (domain, layer)")->capture_default_str();
  cmd->add_flag("--gradient-overlap", a->gradient_overlap, "also accumulate dL/dW_down per domain (probe.gradients)");
  cmd->add_option("--seed", a->seed, "seed of every random choice (seeds[0])");
  cmd->add_option("--device", a->device, "cpu, cuda or cuda:N (device)");
  cmd->add_option("--dtype", a->dtype, "compute dtype (dtype)")->check(CLI::IsMember({"float32", "bfloat16", "float16"}));
  cmd->add_option("--output", a->output, "directory for probe.json and probe_stats.safetensors (output)");
  cmd->add_flag("--no-progress", a->no_progress, "no progress bar on stderr");
  cmd->callback([a] { run_probe_cmd(*a); });
}

}  // namespace sparsecl::cli
