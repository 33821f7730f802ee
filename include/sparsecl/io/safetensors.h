// safetensors reading (memory-mapped, validated) and writing (atomic), plus the HF checkpoint layout
// on top of it: a directory with `model.safetensors` or `model.safetensors.index.json` + shards.
//
// Reading never trusts the file: the header must be valid JSON, every tensor's byte range must lie
// inside the file and match dtype x shape, and errors name the file and the tensor. Tensors returned
// are zero-copy CPU views of the mapping; the mapping stays alive as long as any view does.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sparsecl::io {

struct TensorInfo {
  std::string dtype;             // the safetensors name: "F32", "BF16", "I64", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;   // byte offsets relative to the data section
};

class SafetensorsFile : public std::enable_shared_from_this<SafetensorsFile> {
 public:
  // Maps and validates `path`; throws sparsecl::Error naming the file on any problem.
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return infos_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // A CPU view of the tensor's bytes (no copy). Throws for an unknown name or an unsupported dtype.
  at::Tensor tensor(const std::string& name) const;

 private:
  explicit SafetensorsFile(std::filesystem::path path) : path_(std::move(path)) {}
  std::filesystem::path path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::map<std::string, TensorInfo> infos_;
  std::map<std::string, std::string> metadata_;
};

// The tensors of a HF checkpoint directory (single file or sharded), addressed by HF tensor name.
class Checkpoint {
 public:
  // `dir` holds model.safetensors or model.safetensors.index.json (+ the shards it names). A file path
  // to one .safetensors works too. Every shard is opened and validated up front.
  static Checkpoint open(const std::filesystem::path& dir_or_file);

  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  const std::filesystem::path& file_of(const std::string& name) const;
  at::Tensor tensor(const std::string& name) const;  // zero-copy CPU view
  const std::filesystem::path& source() const { return source_; }

 private:
  std::filesystem::path source_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // name -> index into files_
};

// Writes tensors (any device, contiguous or not; stored as their dtype) to `path` atomically: a
// temporary file in the same directory, then rename. Names keep the given order in the header.
void save_safetensors(const std::filesystem::path& path,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Reads every tensor of a file into owned, contiguous CPU tensors (small files: fixtures, adapters).
std::map<std::string, at::Tensor> load_safetensors(const std::filesystem::path& path);

// safetensors dtype name <-> ATen scalar type; throws sparsecl::Error for names we do not support.
at::ScalarType scalar_type_from_safetensors(const std::string& dtype, const std::string& context);
std::string safetensors_dtype_name(at::ScalarType type);

}  // namespace sparsecl::io
