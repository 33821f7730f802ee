// `sparsecl run CONFIG [key=value ...] [--output DIR]`: the sequential continual-learning job
// (run::run_sweep, include/sparsecl/run/driver.h, docs/run.md): every method x seed of the config
// through its stages, metrics.json per run, sweep.json, and the report. Started again with the same
// arguments after an interruption, it finishes the work without redoing completed stages.
#include "sparsecl/cli/commands.h"
#include "sparsecl/cli/distributed.h"
#include "sparsecl/config/schema.h"
#include "sparsecl/run/driver.h"

namespace sparsecl::cli {

namespace {

struct RunArgs {
  std::string config_file, output;
  std::vector<std::string> overrides;
  bool no_progress = false, no_report = false;
};

}  // namespace

void add_run(CLI::App& root) {
  auto* cmd = root.add_subcommand(
      "run", "Sequential fine-tuning through the stages for every method and seed, with evaluation, CL metrics and report");
  auto a = std::make_shared<RunArgs>();
  cmd->add_option("config", a->config_file, "YAML config (e.g. configs/smoke.yaml)")->required()->check(CLI::ExistingFile);
  cmd->add_option("overrides", a->overrides, "key=value config overrides (e.g. methods=lora,mask seeds=0,1 train.steps=50)");
  cmd->add_option("--output", a->output, "output directory (output; default from the config)");
  cmd->add_flag("--no-progress", a->no_progress, "no progress bars on stderr");
  cmd->add_flag("--no-report", a->no_report, "skip writing output/report at the end");
  cmd->callback([a, cmd] {
    config::Config cfg = config::load(a->config_file, a->overrides);
    if (cmd->count("--output")) cfg.set("output", a->output, "--output");
    join_job(cfg.get<std::string>("device"));  // torchrun / srun: every stage runs data-parallel
    run::RunOptions o;
    o.progress = !a->no_progress;
    o.report = !a->no_report;
    run::run_sweep(cfg, a->config_file, o);
  });
}

}  // namespace sparsecl::cli
