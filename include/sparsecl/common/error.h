// One exception type for every user-facing failure (bad file, bad tensor, bad config key). The CLI
// catches it at the top, prints the message and exits non-zero; messages name the file and the item.
#pragma once
#include <stdexcept>
#include <string>

namespace sparsecl {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace sparsecl
