// sparsecl's options: the ONE declaration (src/config/schema.cpp) from which every subcommand's YAML
// loading, `key=value` overrides, `--help` and the resolved config written into outputs derive.
//
// Sections: top-level run settings (model, models, stages, methods, seeds, output, device, dtype),
// `data.<domain>.*` (code, math, medical, chat: `train`, `heldout`, `tasks`; `data.general.probe`),
// `probe.*`, `train.*`, `lora.*`, `mask.*`, `orth.*`, `migu.*`, `eval.*`. `sparsecl config list` prints
// them all with types, defaults and help.
//
// Paths (model directories, data files) are used as written: a relative path is relative to the
// current working directory, and the README's commands run from the repository root, where configs/
// name `models/...` and `data/...`.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "sparsecl/config/options.h"

namespace sparsecl::config {

// The four fine-tuning domains, in the default stage order.
const std::vector<std::string>& domains();

// The declared options (built once, on first use).
const Options& schema();

// Defaults, then the YAML file, then the overrides, against schema().
Config load(const std::filesystem::path& yaml, const std::vector<std::string>& overrides = {});

struct MissingPath {
  std::string key;   // the option, e.g. `data.code.train`
  std::string path;  // as written in the config
  PathKind kind;     // File (data) or Dir (model directories)
};

// Every path a run would read that does not exist, resolved against `base` (relative paths) — all of
// them, not just the first. Checked: `model` and `models`; `data.<d>.*` for each domain d in `stages`
// or `probe.domains`; `data.general.*` when `eval.drift` is on. Output paths are not checked.
std::vector<MissingPath> missing_paths(const Config& cfg, const std::filesystem::path& base = std::filesystem::current_path());

// Throws sparsecl::Error listing every missing path (key: path) if there is any.
void validate_paths(const Config& cfg, const std::filesystem::path& base = std::filesystem::current_path());

}  // namespace sparsecl::config
