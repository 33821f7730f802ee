// `sparsecl report`: one or several run / sweep / probe directories -> DIR/report.md + DIR/report.html
// (docs/report.md). The HTML is self-contained (inline CSS, inline SVG figures drawn here, one tiny
// inline script that only marks the page as rendered); report.md references the same figures as
// DIR/figures/*.svg. Every figure has the table of the numbers behind it, every section names the
// config hashes, models and seeds it came from, and a missing input (no probe.json, no drift, an
// unscored R entry) is said so in a note, never filled in.
//
// Inputs, per directory given:
//   run directory    holds metrics.json (the `run` driver's; only R, tasks, method, seed are required)
//   sweep directory  holds sweep.json and run subdirectories (any direct subdirectory with a
//                    metrics.json, e.g. `<method>-seed<S>/`)
//   probe directory  holds probe.json (docs/probe.md); probe.json and probe/probe.json are also picked up
//                    inside run and sweep directories
// Runs are grouped by method (by "method @ model" when the inputs span several models); the CL metrics
// of each run are computed from its R by eval::cl_metrics (one definition for every report) and their
// spread over seeds by eval::spread.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace sparsecl::report {

// Per group (method, or "method @ model" when the runs span several models), in order of first
// appearance: {"methods": {key: {"method", "model", "tasks", "score_metric", "seeds", "runs",
// "config_hashes", "ACC" | "BWT" | "FWT" | "F": eval::spread over the runs, "forgetting": {task: spread},
// "R_mean", "R_std" ((T+1) x T, null where no run scored the entry), "general_retention": {"mean",
// "std"} per row (when the runs have general.retention)}}, "order": [keys...]}.
// Throws sparsecl::Error when a metrics object lacks R / tasks / method / seed, when R is not (T+1) x T,
// or when two runs of one group have different task lists.
nlohmann::json summarize_runs(const std::vector<nlohmann::json>& metrics);

// Reads every input (see above), writes out_dir/report.md, out_dir/report.html and out_dir/figures/*.svg.
// Throws sparsecl::Error for an input that is none of the three kinds, or holds invalid JSON.
void write_report(const std::vector<std::filesystem::path>& inputs, const std::filesystem::path& out_dir);

}  // namespace sparsecl::report
