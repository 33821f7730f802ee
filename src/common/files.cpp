// Whole-file reading with file-naming errors (see include/sparsecl/common/files.h).
#include "sparsecl/common/files.h"

#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <vector>

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

void write_file_atomic(const std::filesystem::path& path, const std::string& text) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(tmp.string() + ": cannot write");
    out << text;
    if (!out.flush()) throw Error(tmp.string() + ": write failed");
  }
  std::filesystem::rename(tmp, path);
}

void remove_tree(const std::filesystem::path& p) {
  struct stat sb;
  if (::lstat(p.c_str(), &sb) != 0) return;
  if (S_ISDIR(sb.st_mode)) {
    std::vector<std::filesystem::path> children;
    for (const auto& e : std::filesystem::directory_iterator(p)) children.push_back(e.path());
    for (const auto& c : children) remove_tree(c);
    if (::rmdir(p.c_str()) != 0) throw Error(p.string() + ": cannot remove directory");
  } else if (::unlink(p.c_str()) != 0) {
    throw Error(p.string() + ": cannot remove");
  }
}

}  // namespace sparsecl
