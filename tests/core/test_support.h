// Helpers shared by the core test files: a per-test temporary directory, a trainer step log.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace sparsecl::testing_support {

// A fresh directory per test (tagged, unique per process and instance), removed with `rm -rf` on
// destruction (not std::filesystem::remove_all; see CMakeLists.txt on the PyPI libtorch's copy of it).
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag) {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("sparsecl_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }
  ~TempDir() { [[maybe_unused]] int rc = std::system(("rm -rf '" + path.string() + "'").c_str()); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

// A train_log.jsonl's lines without their wall-time field (tokens_per_s), for comparing two runs.
inline std::vector<nlohmann::json> read_step_log(const std::filesystem::path& file) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line);
    j.erase("tokens_per_s");
    lines.push_back(j);
  }
  return lines;
}

}  // namespace sparsecl::testing_support
