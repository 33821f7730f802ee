// Reading and atomically writing whole files, with errors that name the file: the one place every loader (config.json,
// tokenizer files, adapter configs, checkpoint indexes, chat templates) goes through.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace sparsecl {

// The file's bytes; throws sparsecl::Error "cannot open <what> <file>" when it cannot be read.
std::string read_file(const std::filesystem::path& file, const std::string& what = "file");

// The file parsed as JSON; throws sparsecl::Error naming the file for I/O and syntax errors.
nlohmann::json read_json_file(const std::filesystem::path& file, const std::string& what = "file");

// Writes `text` to `path` atomically: a temporary file beside it, then rename (a reader or a resumed run
// sees the old file or the new one, never half of one).
void write_file_atomic(const std::filesystem::path& path, const std::string& text);

// rm -rf of a file or directory tree (no-op when absent; symlinks are removed, not followed). Written
// with lstat/unlink/rmdir instead of std::filesystem::remove_all: the PyPI libtorch.so exports its own
// copy of that function, which crashes when it interposes libstdc++'s (see CMakeLists.txt). Throws
// sparsecl::Error naming the path that could not be removed.
void remove_tree(const std::filesystem::path& path);

}  // namespace sparsecl
