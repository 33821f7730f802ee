// sparsecl entry point: builds the CLI11 app from the subcommands in src/cli/ and turns any error into
// one clear message on stderr and a non-zero exit.
#include <exception>

#include "sparsecl/cli/commands.h"
#include "sparsecl/cli/distributed.h"
#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"

int main(int argc, char** argv) {
  CLI::App app{"sparsecl: implicit sparsity probing and sparse-aware continual fine-tuning of LLMs"};
  app.set_version_flag("--version", SPARSECL_VERSION);
  app.require_subcommand(1);
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose, "Debug logging");
  app.parse_complete_callback([&] { sparsecl::log::set_level(verbose ? sparsecl::log::Level::debug : sparsecl::log::Level::info); });

  sparsecl::cli::add_info(app);
  sparsecl::cli::add_forward(app);
  sparsecl::cli::add_generate(app);
  sparsecl::cli::add_tokenize(app);
  sparsecl::cli::add_probe(app);
  sparsecl::cli::add_finetune(app);
  sparsecl::cli::add_eval(app);
  sparsecl::cli::add_run(app);
  sparsecl::cli::add_report(app);
  sparsecl::cli::add_config(app);
  sparsecl::cli::add_bench(app);

  try {
    // Under torchrun / srun only the data-parallel subcommands may run (the first non-option word).
    for (int i = 1; i < argc; ++i)
      if (argv[i][0] != '-') {
        sparsecl::cli::refuse_job_unless_data_parallel(argv[i]);
        break;
      }
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const sparsecl::Error& e) {
    sparsecl::log::error(e.what());
    return 1;
  } catch (const std::exception& e) {
    sparsecl::log::error(e.what());
    return 1;
  }
  return 0;
}
