// Whole-file reading with file-naming errors (see include/sparsecl/common/files.h).
#include "sparsecl/common/files.h"

#include <fstream>
#include <sstream>

#include "sparsecl/common/error.h"

namespace sparsecl {

std::string read_file(const std::filesystem::path& file, const std::string& what) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error("cannot open " + what + " " + file.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

nlohmann::json read_json_file(const std::filesystem::path& file, const std::string& what) {
  const std::string text = read_file(file, what);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(file.string() + ": malformed JSON: " + e.what());
  }
}

}  // namespace sparsecl
