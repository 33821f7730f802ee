// Argument checks shared by the kernel dispatchers: every bad argument is a sparsecl::Error naming
// the op and the argument.
#include <ATen/ATen.h>

#include <sstream>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/detail.h"

namespace sparsecl::kernels::detail {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes() << " " << t.scalar_type();
  return os.str();
}

void check_activations(const at::Tensor& h, int64_t k, const char* op) {
  if (!h.defined()) throw Error(std::string(op) + ": h is undefined");
  if (h.dim() != 2)
    throw Error(std::string(op) + ": h must be 2-D [N, I], got " + shape_str(h));
  const auto st = h.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf)
    throw Error(std::string(op) + ": h must be float32, bfloat16 or float16, got " + shape_str(h));
  const int64_t cols = h.size(1);
  if (k < 1 || k > cols)
    throw Error(std::string(op) + ": k must be in [1, I] = [1, " + std::to_string(cols) + "], got " +
                std::to_string(k));
}

void check_bitset(const at::Tensor& t, int64_t dim, const char* name, const char* op) {
  if (!t.defined()) throw Error(std::string(op) + ": " + name + " is undefined");
  if (t.dim() != dim || t.scalar_type() != at::kLong)
    throw Error(std::string(op) + ": " + name + " must be an int64 bitset of rank " + std::to_string(dim) +
                ", got " + shape_str(t));
}

}  // namespace sparsecl::kernels::detail
