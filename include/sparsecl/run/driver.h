// The sequential continual-learning driver behind `sparsecl run` (DESIGN.md, docs/run.md): one model
// tuned through the configured stages (default Code -> Math -> Medical -> Chat) with each configured
// method and seed, measured after every stage.
//
// Layout of the output directory (`output`):
//   config.yaml                  the resolved config (its hash in the first line)
//   sweep.json                   provenance + per method: mean / spread of ACC, BWT, FWT, F over seeds
//   probe/probe.json             the H1 probe of the base model on probe.domains (+ probe_stats.safetensors)
//   base/eval.json               row 0 of R (the base model), shared by every method and seed
//   base/representations.safetensors   the base's hidden states of the drift probe set
//   <method>-seed<S>/            one run: run.json (config hash, status), metrics.json, and per stage
//     stages/<i>-<domain>/train/ the trainer's directory (step log, checkpoints, the method's product)
//     stages/<i>-<domain>/probe.json   the stage data's top-K neurons before / after the stage
//     stages/<i>-<domain>/eval.json    row i of R, with representation drift against the base
//     stages/<i>-<domain>/done.json    written last: the stage is complete
//   report/report.md, report.html
//
// Resumability: every file is written atomically (temporary + rename) and a stage counts as done only
// once done.json exists. Started again with the same config after a kill at any moment, the driver
// rebuilds the model from the base and the finished stages' products (train::apply_stage_output),
// resumes an interrupted stage's training from its newest checkpoint, and recomputes only what is
// missing. A directory holding a run of a different config (hash) is refused.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace sparsecl::config {
class Config;
}

namespace sparsecl::run {

struct RunOptions {
  bool progress = true;  // progress bars on stderr
  bool report = true;    // write output/report at the end
};

// Runs every (method, seed) of `cfg` into cfg.output and returns sweep.json. `config_source` names the
// YAML file for provenance.
nlohmann::json run_sweep(const config::Config& cfg, const std::string& config_source, const RunOptions& options = {});

// R matrix of one run from its eval rows (row 0 = base): R[i][j] = rows[i].domains[tasks[j]].score
// (NaN where a score is missing); the same for held-out loss.
struct Rows {
  std::vector<std::vector<double>> score, heldout_loss;
};
Rows collect_rows(const std::vector<nlohmann::json>& eval_rows, const std::vector<std::string>& tasks);

}  // namespace sparsecl::run
