// safetensors reader (mmap + validation) and atomic writer; HF checkpoint directories (single file or
// sharded through model.safetensors.index.json). See include/sparsecl/io/safetensors.h.
#include "sparsecl/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"

namespace sparsecl::io {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

size_t element_size(at::ScalarType t) { return c10::elementSize(t); }

uint64_t numel_of(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

at::ScalarType scalar_type_from_safetensors(const std::string& dtype, const std::string& context) {
  static const std::map<std::string, at::ScalarType> table = {
      {"F64", at::kDouble}, {"F32", at::kFloat},  {"F16", at::kHalf},  {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool},
  };
  auto it = table.find(dtype);
  if (it == table.end()) throw Error(context + ": unsupported safetensors dtype '" + dtype + "'");
  return it->second;
}

std::string safetensors_dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return "F64";
    case at::kFloat: return "F32";
    case at::kHalf: return "F16";
    case at::kBFloat16: return "BF16";
    case at::kLong: return "I64";
    case at::kInt: return "I32";
    case at::kShort: return "I16";
    case at::kChar: return "I8";
    case at::kByte: return "U8";
    case at::kBool: return "BOOL";
    default: throw Error(std::string("cannot store dtype ") + c10::toString(type) + " in safetensors");
  }
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile(path));
  const std::string where = path.string();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(where + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw Error(where + ": cannot stat");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    throw Error(where + ": truncated safetensors file (" + std::to_string(size) + " bytes, no header)");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw Error(where + ": mmap failed (" + std::strerror(errno) + ")");
  f->map_ = map;
  f->map_size_ = size;
  const auto* bytes = static_cast<const uint8_t*>(map);

  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);  // little-endian, as is every supported host
  if (header_len > size - 8 || header_len > (100ull << 20))
    throw Error(where + ": truncated or corrupt safetensors file (header length " + std::to_string(header_len) +
                " exceeds the file size " + std::to_string(size) + ")");
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(bytes + 8), reinterpret_cast<const char*>(bytes + 8 + header_len));
  } catch (const json::exception& e) {
    throw Error(where + ": safetensors header is not valid JSON (" + e.what() + ")");
  }
  if (!header.is_object()) throw Error(where + ": safetensors header is not a JSON object");
  f->data_ = bytes + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (entry.is_object())
        for (auto& [k, v] : entry.items())
          if (v.is_string()) f->metadata_[k] = v.get<std::string>();
      continue;
    }
    const std::string ctx = where + ": tensor '" + name + "'";
    TensorInfo info;
    try {
      info.dtype = entry.at("dtype").get<std::string>();
      info.shape = entry.at("shape").get<std::vector<int64_t>>();
      auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2) throw Error(ctx + ": data_offsets must have two entries");
      info.begin = offsets[0];
      info.end = offsets[1];
    } catch (const json::exception& e) {
      throw Error(ctx + ": malformed header entry (" + e.what() + ")");
    }
    for (int64_t d : info.shape)
      if (d < 0) throw Error(ctx + ": negative dimension in shape " + shape_str(info.shape));
    if (info.end < info.begin) throw Error(ctx + ": data_offsets end before begin");
    if (info.end > data_size)
      throw Error(ctx + ": truncated file: tensor data ends at byte " + std::to_string(info.end) +
                  " but the data section holds " + std::to_string(data_size));
    // Byte size must match dtype x shape (unknown dtypes are rejected later, when the tensor is read).
    static const std::map<std::string, size_t> sizes = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
                                                        {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
    if (auto it = sizes.find(info.dtype); it != sizes.end()) {
      if (numel_of(info.shape) * it->second != info.end - info.begin)
        throw Error(ctx + ": byte range (" + std::to_string(info.end - info.begin) + ") does not match " + info.dtype +
                    " " + shape_str(info.shape));
    }
    f->infos_.emplace(name, std::move(info));
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (auto& [k, _] : infos_) out.push_back(k);
  return out;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = infos_.find(name);
  if (it == infos_.end()) throw Error(path_.string() + ": no tensor '" + name + "'");
  return it->second;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorInfo& ti = info(name);
  const at::ScalarType type = scalar_type_from_safetensors(ti.dtype, path_.string() + ": tensor '" + name + "'");
  auto keep_alive = new std::shared_ptr<const SafetensorsFile>(shared_from_this());
  void* ptr = const_cast<uint8_t*>(data_ + ti.begin);
  // The mapping is read-only (MAP_PRIVATE, PROT_READ): callers that modify must copy first, which every
  // model path does when it converts to the compute dtype/device. Unaligned views are copied now.
  at::Tensor view = at::from_blob(
      ptr, ti.shape, [keep_alive](void*) { delete keep_alive; }, at::TensorOptions().dtype(type));
  if (reinterpret_cast<uintptr_t>(ptr) % element_size(type) != 0) return view.clone();
  return view;
}

// ---- Checkpoint -----------------------------------------------------------------------------------

Checkpoint Checkpoint::open(const fs::path& dir_or_file) {
  Checkpoint ck;
  ck.source_ = dir_or_file;
  auto add_file = [&](const fs::path& p) {
    auto f = SafetensorsFile::open(p);
    for (const auto& n : f->names()) {
      if (ck.where_.count(n))
        throw Error(p.string() + ": tensor '" + n + "' also appears in " + ck.files_[ck.where_[n]]->path().string());
      ck.where_[n] = ck.files_.size();
    }
    ck.files_.push_back(std::move(f));
  };
  if (fs::is_regular_file(dir_or_file)) {
    add_file(dir_or_file);
    return ck;
  }
  if (!fs::is_directory(dir_or_file)) throw Error(dir_or_file.string() + ": no such checkpoint directory or file");
  const fs::path single = dir_or_file / "model.safetensors";
  const fs::path index = dir_or_file / "model.safetensors.index.json";
  if (fs::exists(index)) {
    const json j = read_json_file(index, "checkpoint index");
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw Error(index.string() + ": no 'weight_map' object");
    std::map<std::string, std::vector<std::string>> by_shard;
    for (auto& [name, shard] : j["weight_map"].items()) by_shard[shard.get<std::string>()].push_back(name);
    for (auto& [shard, names] : by_shard) {
      const fs::path p = dir_or_file / shard;
      if (!fs::exists(p))
        throw Error(index.string() + ": shard '" + shard + "' (holding '" + names.front() + "') is missing");
      add_file(p);
      for (const auto& n : names)
        if (!ck.where_.count(n) || ck.files_[ck.where_[n]]->path() != p)
          throw Error(p.string() + ": tensor '" + n + "' is listed in the index for this shard but is not in it");
    }
    return ck;
  }
  if (fs::exists(single)) {
    add_file(single);
    return ck;
  }
  // Older checkpoints ship only PyTorch pickles, which sparsecl does not unpickle (arbitrary code).
  for (const char* pickle : {"pytorch_model.bin", "pytorch_model.bin.index.json"})
    if (fs::exists(dir_or_file / pickle))
      throw Error(dir_or_file.string() + ": has " + pickle + " but no model.safetensors; sparsecl reads safetensors only "
                  "(convert once: python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('" +
                  dir_or_file.string() + "').save_pretrained('OUT_DIR')\" and copy the tokenizer files)");
  throw Error(dir_or_file.string() + ": neither model.safetensors nor model.safetensors.index.json found");
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (auto& [k, _] : where_) out.push_back(k);
  return out;
}

const TensorInfo& Checkpoint::info(const std::string& name) const { return files_.at(where_.at(name))->info(name); }

const fs::path& Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error(source_.string() + ": checkpoint has no tensor '" + name + "'");
  return files_[it->second]->path();
}

at::Tensor Checkpoint::tensor(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error(source_.string() + ": checkpoint has no tensor '" + name + "'");
  return files_[it->second]->tensor(name);
}

// ---- writing --------------------------------------------------------------------------------------

void save_safetensors(const fs::path& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> host;
  host.reserve(tensors.size());
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) throw Error(path.string() + ": tensor '" + name + "' is undefined");
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    const uint64_t nbytes = c.numel() * c.element_size();
    header[name] = {{"dtype", safetensors_dtype_name(c.scalar_type())},
                    {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    host.push_back(std::move(c));
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');  // align the data section to 8 bytes
  if (path.has_parent_path()) fs::create_directories(path.parent_path());
  const fs::path tmp = path.string() + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(tmp.string() + ": cannot open for writing");
    const uint64_t len = h.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out.write(h.data(), static_cast<std::streamsize>(h.size()));
    for (const auto& c : host) out.write(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
    out.flush();
    if (!out) throw Error(tmp.string() + ": write failed");
  }
  fs::rename(tmp, path);
}

std::map<std::string, at::Tensor> load_safetensors(const fs::path& path) {
  auto f = SafetensorsFile::open(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& n : f->names()) out[n] = f->tensor(n).clone();
  return out;
}

}  // namespace sparsecl::io
