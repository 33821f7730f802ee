// `sparsecl report RUN_DIR... --output DIR`: Markdown + self-contained HTML with figures from run,
// sweep and probe directories (report::write_report; docs/report.md says what each section shows).
#include "sparsecl/cli/commands.h"
#include "sparsecl/report/report.h"

namespace sparsecl::cli {

void add_report(CLI::App& root) {
  auto* cmd = root.add_subcommand(
      "report", "Markdown + HTML report (R matrix, ACC/BWT/F, drift, IoU heatmaps) from run/sweep/probe directories");
  auto inputs = std::make_shared<std::vector<std::string>>();
  auto output = std::make_shared<std::string>();
  cmd->add_option("inputs", *inputs,
                  "run directories (metrics.json), sweep directories (sweep.json + <method>-seed<S>/) or probe "
                  "directories (probe.json)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("-o,--output", *output, "directory for report.md, report.html and figures/")->required();
  cmd->callback([inputs, output] {
    std::vector<std::filesystem::path> paths(inputs->begin(), inputs->end());
    report::write_report(paths, *output);
  });
}

}  // namespace sparsecl::cli
