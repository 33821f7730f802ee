// What every output records about the software that made it: sparsecl, libtorch and (when a GPU is
// present) CUDA runtime versions, in one JSON object.
#pragma once

#include <nlohmann/json.hpp>

namespace sparsecl::io {

// {"sparsecl": "0.1.0", "libtorch": "2.11.0", "cuda": "13.0" | null}
nlohmann::json software_versions();

}  // namespace sparsecl::io
