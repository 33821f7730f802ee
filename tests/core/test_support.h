// Helpers shared by the core test files: a per-test temporary directory.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

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

}  // namespace sparsecl::testing_support
