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

}  // namespace sparsecl
