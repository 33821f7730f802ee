// `sparsecl config`: the configuration system from the command line.
//   sparsecl config list [SECTION...]                  every option: key, type, default, help
//   sparsecl config show [-c FILE] [key=value ...]     the resolved config (YAML, or --json) and its hash
// `show --check-paths` also reports every model / data path that does not exist. Both derive from the
// one declaration in src/config/schema.cpp, like every subcommand's `-c CONFIG key=value` handling.
#include <iostream>
#include <memory>

#include "sparsecl/cli/commands.h"
#include "sparsecl/config/schema.h"

namespace sparsecl::cli {

namespace {

struct ShowArgs {
  std::string file;
  std::vector<std::string> overrides;
  bool json = false;
  bool check_paths = false;
};

}  // namespace

void add_config(CLI::App& root) {
  auto* cmd = root.add_subcommand("config", "List the options, or print a resolved config and its hash");
  cmd->require_subcommand(1);

  auto sections = std::make_shared<std::vector<std::string>>();
  auto* list = cmd->add_subcommand("list", "Print every option: key, type, default, help");
  list->add_option("sections", *sections, "only these sections (train, lora, probe, ...; top-level keys: model, ...)");
  list->callback([sections] { std::cout << config::schema().help(*sections); });

  auto a = std::make_shared<ShowArgs>();
  auto* show = cmd->add_subcommand("show", "Print the resolved config (defaults < -c FILE < key=value) and its hash");
  show->add_option("-c,--config", a->file, "YAML config file");
  show->add_option("overrides", a->overrides, "key=value overrides (lists: a,b or [a, b])");
  show->add_flag("--json", a->json, "print {\"config\": ..., \"hash\": ...} as JSON instead of YAML");
  show->add_flag("--check-paths", a->check_paths, "fail if a model or data path does not exist (relative to cwd)");
  show->callback([a] {
    config::Config cfg(config::schema());
    if (!a->file.empty()) cfg.merge_yaml_file(a->file);
    cfg.apply_overrides(a->overrides);
    if (a->check_paths) config::validate_paths(cfg);
    if (a->json)
      std::cout << nlohmann::json{{"config", cfg.to_json()}, {"hash", cfg.hash()}}.dump(2) << std::endl;
    else
      std::cout << cfg.to_yaml();
  });
}

}  // namespace sparsecl::cli
