// Software versions for output provenance (see include/sparsecl/io/provenance.h).
#include "sparsecl/io/provenance.h"

#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/version.h>

#include <string>

namespace sparsecl::io {

namespace {
nlohmann::json cuda_runtime_version() {
  try {
    if (!at::hasCUDA()) return nullptr;
    const long v = at::detail::getCUDAHooks().versionCUDART();
    return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
  } catch (...) {
    return nullptr;
  }
}
}  // namespace

nlohmann::json software_versions() {
  return {{"sparsecl", SPARSECL_VERSION}, {"libtorch", TORCH_VERSION}, {"cuda", cuda_runtime_version()}};
}

}  // namespace sparsecl::io
