// `sparsecl info --model DIR`: the parsed config (as sparsecl understood it) and the parameter count,
// from config.json and the checkpoint headers (no weights are read).
#include <iostream>
#include <nlohmann/json.hpp>

#include "sparsecl/cli/commands.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/config.h"

namespace sparsecl::cli {

void add_info(CLI::App& root) {
  auto* cmd = root.add_subcommand("info", "Print a model directory's parsed config and parameter count");
  auto model = std::make_shared<std::string>();
  cmd->add_option("--model", *model, "HF model directory (config.json + safetensors)")->required();
  cmd->callback([model] {
    const auto config = model::ModelConfig::load(*model);
    nlohmann::json out = {{"model", *model}, {"config", config.to_json()}, {"parameters", config.parameter_count()}};
    const auto ck = io::Checkpoint::open(*model);
    int64_t stored = 0;
    for (const auto& name : ck.names()) {
      int64_t n = 1;
      for (int64_t d : ck.info(name).shape) n *= d;
      stored += n;
    }
    out["checkpoint_tensors"] = ck.names().size();
    out["checkpoint_elements"] = stored;
    std::cout << out.dump(2) << std::endl;
  });
}

}  // namespace sparsecl::cli
