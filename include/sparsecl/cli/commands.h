// The CLI's subcommands. Each add_* declares one subcommand on the root app (options with defaults and
// help text, and the callback that runs it); src/main.cpp calls them in the order `--help` lists them.
// A subcommand that does not work yet is not added.
#pragma once
#include <CLI/CLI.hpp>

namespace sparsecl::cli {

void add_info(CLI::App& root);
void add_forward(CLI::App& root);
void add_generate(CLI::App& root);
void add_tokenize(CLI::App& root);
void add_probe(CLI::App& root);
void add_finetune(CLI::App& root);
void add_eval(CLI::App& root);
void add_run(CLI::App& root);
void add_report(CLI::App& root);
void add_bench(CLI::App& root);
void add_config(CLI::App& root);

}  // namespace sparsecl::cli
