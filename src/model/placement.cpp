// Pipeline placement (HF device_map style): which device each tensor of a Decoder lives on, the
// byte-balanced split of contiguous layer runs over the GPUs of one node (Placement::balanced), and the
// device map spec the config / CLI give ("auto", "cuda:0,cuda:1", "none"). Kept apart from decoder.cpp
// because it needs no forward-pass machinery: only the config and the checkpoint's tensor shapes.
#include <ATen/Context.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cctype>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/model/decoder.h"

namespace sparsecl::model {

namespace {

constexpr const char* kLayerPrefix = "model.layers.";

std::string trim(const std::string& s) {
  size_t begin = 0, end = s.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(s[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(s[end - 1]))) --end;
  return s.substr(begin, end - begin);
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// One entry of a device map: "cpu", "cuda" (= cuda:0) or "cuda:N" with N visible.
at::Device parse_device_map_entry(const std::string& entry, const std::string& spec) {
  const std::string where = "device_map '" + spec + "': ";
  if (entry.empty()) throw Error(where + "empty entry (expected a comma-separated list such as cuda:0,cuda:1)");
  if (entry == "cpu") return at::Device(at::kCPU);
  if (entry.rfind("cuda", 0) != 0)
    throw Error(where + "unknown device '" + entry + "' (expected auto, none, or a list of cpu / cuda:N)");
  at::Device device = at::kCPU;
  try {
    device = at::Device(entry);
  } catch (const c10::Error&) {
    throw Error(where + "malformed device '" + entry + "' (expected cuda:N)");
  }
  if (!device.has_index()) device = at::Device(at::kCUDA, 0);
  const int64_t visible = static_cast<int64_t>(at::getNumGPUs());
  if (device.index() >= visible)
    throw Error(where + "device '" + entry + "' is not visible (" + std::to_string(visible) + " CUDA device(s))");
  return device;
}

}  // namespace

Placement Placement::single(at::Device device, int64_t num_layers) {
  Placement p;
  p.layer_devices.assign(static_cast<size_t>(std::max<int64_t>(num_layers, 0)), device);
  p.embed_device = device;
  p.head_device = device;
  return p;
}

Placement Placement::balanced(const ModelConfig& c, const std::vector<at::Device>& devices, at::ScalarType dtype) {
  if (devices.empty()) throw Error("pipeline placement: no devices to place the model on");
  const size_t k = devices.size();
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  // Parameter bytes of the embeddings, of one decoder layer (all layers have the same shapes) and of
  // the head (final norm + untied LM head).
  int64_t embed_bytes = 0, layer_bytes = 0, head_bytes = 0;
  const std::string first_layer = std::string(kLayerPrefix) + "0.";
  for (const auto& [name, shape] : checkpoint_tensor_shapes(c)) {
    const int64_t bytes = element_count(shape) * element;
    if (name.rfind(first_layer, 0) == 0) layer_bytes += bytes;
    else if (name.rfind(kLayerPrefix, 0) == 0) continue;
    else if (name == "model.embed_tokens.weight") embed_bytes += bytes;
    else head_bytes += bytes;
  }
  // A tied head multiplies by the embedding matrix itself: it sits with the embeddings.
  const size_t head_slot = c.tie_word_embeddings ? 0 : k - 1;
  std::vector<int64_t> load(k, 0), layers(k, 0);  // bytes and layer count per slot
  load[0] += embed_bytes;
  load[head_slot] += head_bytes;
  int64_t unplaced = c.num_hidden_layers;
  if (unplaced >= static_cast<int64_t>(k)) {
    for (size_t i = 0; i < k; ++i) {
      layers[i] = 1;
      load[i] += layer_bytes;
    }
    unplaced -= static_cast<int64_t>(k);
  }
  // Each remaining layer to the slot with the smallest total after taking it (ties: the lower index).
  for (; unplaced > 0; --unplaced) {
    const size_t best = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    ++layers[best];
    load[best] += layer_bytes;
  }
  Placement p;
  p.embed_device = devices.front();
  p.head_device = devices[head_slot];
  for (size_t i = 0; i < k; ++i) p.layer_devices.insert(p.layer_devices.end(), static_cast<size_t>(layers[i]), devices[i]);
  return p;
}

at::Device Placement::device_of(const std::string& name) const {
  if (name.rfind(kLayerPrefix, 0) == 0) {
    const std::string rest = name.substr(std::string(kLayerPrefix).size());
    const size_t dot = rest.find('.');
    const std::string index = rest.substr(0, dot);
    if (dot != std::string::npos && !index.empty() &&
        std::all_of(index.begin(), index.end(), [](unsigned char ch) { return std::isdigit(ch); })) {
      const size_t layer = std::stoul(index);
      if (layer < layer_devices.size()) return layer_devices[layer];
    }
  } else if (name == "model.embed_tokens.weight") {
    return embed_device;
  } else if (name == "model.norm.weight" || name == "lm_head.weight") {
    return head_device;
  }
  throw Error("pipeline placement: no device for tensor '" + name + "' (placement of " +
              std::to_string(layer_devices.size()) + " layers)");
}

bool Placement::is_single() const {
  auto same = [&](const at::Device& d) { return d == embed_device; };
  return same(head_device) && std::all_of(layer_devices.begin(), layer_devices.end(), same);
}

std::vector<std::pair<at::Device, int64_t>> Placement::bytes_per_device(const ModelConfig& c, at::ScalarType dtype) const {
  std::vector<std::pair<at::Device, int64_t>> out;
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  for (const auto& [name, shape] : checkpoint_tensor_shapes(c)) {
    const at::Device device = device_of(name);
    auto it = std::find_if(out.begin(), out.end(), [&](const auto& entry) { return entry.first == device; });
    if (it == out.end()) it = out.emplace(out.end(), device, 0);
    it->second += element_count(shape) * element;
  }
  return out;
}

std::string Placement::describe() const {
  // (device, what) in forward order, adjacent entries on one device merged.
  std::vector<std::pair<at::Device, std::string>> parts{{embed_device, "embed_tokens"}};
  auto add = [&](const at::Device& device, const std::string& what) {
    if (parts.back().first == device) parts.back().second += ", " + what;
    else parts.push_back({device, what});
  };
  for (size_t begin = 0; begin < layer_devices.size();) {
    size_t end = begin;
    while (end + 1 < layer_devices.size() && layer_devices[end + 1] == layer_devices[begin]) ++end;
    add(layer_devices[begin], begin == end ? "layer " + std::to_string(begin)
                                           : "layers " + std::to_string(begin) + "-" + std::to_string(end));
    begin = end + 1;
  }
  add(head_device, "norm, lm_head");
  std::string out;
  for (const auto& [device, what] : parts) out += (out.empty() ? "" : "; ") + device.str() + " [" + what + "]";
  return out;
}

void Placement::check(const ModelConfig& c) const {
  if (static_cast<int64_t>(layer_devices.size()) != c.num_hidden_layers)
    throw Error("pipeline placement: " + std::to_string(layer_devices.size()) + " layer devices for a model of " +
                std::to_string(c.num_hidden_layers) + " layers");
  if (c.tie_word_embeddings && head_device != embed_device)
    throw Error("pipeline placement: the model ties its LM head to the embeddings, so the head must be on the "
                "embedding device " + embed_device.str() + ", not " + head_device.str());
}

std::vector<at::Device> parse_device_map(const std::string& spec) {
  const std::string s = trim(spec);
  if (s.empty() || s == "none") return {};
  if (s == "auto") {
    const int64_t visible = static_cast<int64_t>(at::getNumGPUs());
    if (visible == 0)
      throw Error("device_map 'auto': no CUDA device is visible (use device_map: none, or an explicit list)");
    std::vector<at::Device> devices;
    for (int64_t i = 0; i < visible; ++i) devices.emplace_back(at::kCUDA, static_cast<c10::DeviceIndex>(i));
    return devices;
  }
  std::vector<at::Device> devices;
  size_t begin = 0;
  while (true) {
    const size_t comma = s.find(',', begin);
    devices.push_back(parse_device_map_entry(trim(s.substr(begin, comma - begin)), spec));
    if (comma == std::string::npos) break;
    begin = comma + 1;
  }
  return devices;
}

Placement resolve_placement(const ModelConfig& config, const std::string& device_map, at::Device device,
                            at::ScalarType dtype) {
  const std::vector<at::Device> devices = parse_device_map(device_map);
  if (devices.empty()) return Placement::single(device, config.num_hidden_layers);
  return Placement::balanced(config, devices, dtype);
}

Decoder load_decoder(const std::filesystem::path& dir, at::ScalarType dtype, const std::string& device,
                     const std::string& device_map) {
  const at::Device dev = parse_device(device);
  if (parse_device_map(device_map).empty()) return Decoder::load(dir, dtype, dev);
  // Data parallel with a map is one process per node (docs/distributed.md): more would each place a
  // replica over the same devices.
  if (dist::local_world_size() > 1 || dist::local_rank() > 0)
    throw Error("device_map '" + device_map + "' with " + std::to_string(std::max(dist::local_world_size(), dist::local_rank() + 1)) +
                " processes on this node: each would place its model replica over the same devices; launch one "
                "process per node (torchrun --nproc-per-node 1, srun --ntasks-per-node 1) or drop device_map");
  const Placement placement = resolve_placement(ModelConfig::load(dir), device_map, dev, dtype);
  log::info("placement of ", dir.string(), ": ", placement.describe());
  return Decoder::load(dir, dtype, placement);
}

}  // namespace sparsecl::model
