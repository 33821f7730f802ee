// run_probe: several models x several domains -> probe.json + probe_stats.safetensors (docs/probe.md).
// Each model is loaded, probed on every domain (the same seeded record selection for every model, so a
// scale sweep compares like with like), analysed, and released before the next one is loaded.
#include <ATen/ATen.h>
#include <torch/version.h>

#include <chrono>
#include <fstream>
#include <regex>
#include <set>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/options.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/io/provenance.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/probe/probe.h"
#include "sparsecl/text/tokenizer.h"

namespace sparsecl::probe {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

}  // namespace

json Settings::to_json() const {
  return {{"top_ratio", top_ratio},       {"score", score_name(score)},   {"max_samples", max_samples},
          {"batch_size", batch_size},     {"max_length", max_length},     {"permutations", permutations},
          {"token_pairs", token_pairs},   {"token_reservoir", token_reservoir},
          {"gradient_overlap", gradient_overlap}, {"seed", seed},         {"device", device},
          {"device_map", device_map},     {"dtype", dtype}};
}

Settings Settings::from_config(const config::Config& cfg) {
  Settings s;
  s.top_ratio = cfg.get<double>("probe.top_ratio");
  s.score = parse_score(cfg.get<std::string>("probe.score"));
  s.max_samples = cfg.get<int64_t>("probe.max_samples");
  s.batch_size = cfg.get<int64_t>("probe.batch_size");
  s.max_length = cfg.get<int64_t>("probe.max_length");
  s.permutations = cfg.get<int64_t>("probe.permutations");
  s.token_pairs = cfg.get<int64_t>("probe.token_pairs");
  s.gradient_overlap = cfg.get<bool>("probe.gradients");
  const auto seeds = cfg.get<config::IntList>("seeds");
  s.seed = seeds.empty() ? 0 : static_cast<uint64_t>(seeds[0]);
  s.device = cfg.get<std::string>("device");
  s.device_map = cfg.get<std::string>("device_map");
  s.dtype = cfg.get<std::string>("dtype");
  return s;
}

void Settings::validate() const {
  if (!(top_ratio > 0 && top_ratio <= 1)) throw Error("probe.top_ratio must be in (0, 1], got " + std::to_string(top_ratio));
  if (batch_size < 1) throw Error("probe.batch_size must be >= 1");
  if (max_samples < 0) throw Error("probe.max_samples must be >= 0");
  if (max_length < 0) throw Error("probe.max_length must be >= 0");
  if (permutations < 0) throw Error("probe.permutations must be >= 0");
  if (token_pairs < 0) throw Error("probe.token_pairs must be >= 0");
  if (token_reservoir < 0) throw Error("probe.token_reservoir must be >= 0");
  model::parse_device(device);
  model::parse_device_map(device_map);
  model::parse_dtype(dtype);
}

json run_probe(const std::vector<fs::path>& models, const std::vector<Domain>& domains, const Settings& settings,
               const fs::path& output_dir, const RunInfo& info) {
  settings.validate();
  if (models.empty()) throw Error("probe: no model given");
  if (domains.size() < 2) log::warn("probe: only one domain: no pairs to compare");
  if (domains.empty()) throw Error("probe: no domain given");
  std::set<std::string> names;
  static const std::regex kName("[A-Za-z0-9_-]+");
  for (const auto& d : domains) {
    if (!std::regex_match(d.name, kName))
      throw Error("probe: domain name '" + d.name + "' must match [A-Za-z0-9_-]+ (it names tensors)");
    if (!names.insert(d.name).second) throw Error("probe: domain '" + d.name + "' given twice");
    if (!fs::exists(d.file)) throw Error(d.file.string() + ": no such file (domain '" + d.name + "')");
  }
  for (const auto& m : models)
    if (!fs::exists(m / "config.json")) throw Error(m.string() + ": not a model directory (no config.json)");
  if (dist::is_main()) fs::create_directories(output_dir);

  const at::ScalarType dtype = model::parse_dtype(settings.dtype);
  std::vector<std::pair<std::string, at::Tensor>> raw;
  json models_json = json::array();

  json sj = settings.to_json();
  json dl = json::array();
  for (const auto& d : domains) dl.push_back({{"name", d.name}, {"file", d.file.string()}});
  sj["domains"] = dl;
  json config = info.config.is_null() ? json{{"settings", sj}, {"models", json::array()}} : info.config;
  if (info.config.is_null())
    for (const auto& m : models) config["models"].push_back(m.string());
  const std::string config_hash = info.config_hash.empty() ? config::fnv1a64_hex(config.dump()) : info.config_hash;

  // Resumable per model: each finished model's entry and raw tensors go to partial/model-<i>.* (the
  // .json last), and a later start of the same config takes them instead of probing that model again.
  // The directory is removed once probe.json is written.
  const fs::path partial_dir = output_dir / "partial";
  for (size_t mi = 0; mi < models.size(); ++mi) {
    const fs::path& dir = models[mi];
    const fs::path partial_json = partial_dir / ("model-" + std::to_string(mi) + ".json");
    const fs::path partial_tensors = partial_dir / ("model-" + std::to_string(mi) + ".safetensors");
    if (dist::main_says(fs::exists(partial_json))) {
      const json saved = read_json_file(partial_json, "partial probe result");
      if (saved.value("config_hash", "") == config_hash && saved.value("model", "") == dir.string()) {
        auto tensors = io::load_safetensors(partial_tensors);
        for (const auto& name : saved.at("tensors")) {
          auto it = tensors.find(name.get<std::string>());
          if (it == tensors.end()) throw Error(partial_tensors.string() + ": missing tensor '" + name.get<std::string>() + "'");
          raw.push_back({it->first, it->second});
        }
        models_json.push_back(saved.at("entry"));
        log::info("probe: model ", mi, " ", dir.string(), ": finished by an earlier start, taken from ", partial_json.string());
        continue;
      }
      log::warn(partial_json.string(), ": from another config or model; probing model ", mi, " again");
    }
    log::info("probe: model ", mi, " ", dir.string(), " (", settings.dtype, " on ", settings.device, ")");
    // Tokenize every domain before loading the weights: a bad record fails in seconds, not after
    // the first domains have been probed.
    const auto tokenizer = text::Tokenizer::load_if_present(dir);
    if (tokenizer && !tokenizer->chat_template())
      log::warn(dir.string(), ": tokenizer has no chat template; prompt/response records become plain text");
    std::vector<std::vector<data::Example>> all_examples;
    std::vector<data::Summary> summaries;
    for (const auto& d : domains) {
      data::LoadOptions lo;
      lo.max_length = settings.max_length;
      lo.max_samples = settings.max_samples;
      lo.shuffle = true;
      lo.seed = derive_seed(settings.seed, "data/" + d.name);
      lo.plain_chat_fallback = true;  // base models without a chat template: "prompt\n\nresponse"
      all_examples.push_back(data::load_jsonl(d.file, tokenizer.get(), lo));
      summaries.push_back(data::summarize(all_examples.back()));
    }
    model::Decoder decoder = model::load_decoder(dir, dtype, settings.device, settings.device_map);
    const int64_t pad = data::pad_id_for(tokenizer.get());
    const auto& cfg = decoder.config();

    std::vector<DomainStats> stats;
    json dom_json = json::array();
    for (size_t di = 0; di < domains.size(); ++di) {
      const Domain& d = domains[di];
      const auto& examples = all_examples[di];
      const auto& sum = summaries[di];
      log::info("probe: ", d.name, ": ", sum.examples, " sequences, ", sum.tokens, " tokens (", sum.truncated,
                " truncated) from ", d.file.string());
      stats.push_back(collect_domain_stats(decoder, examples, d.name, settings, pad,
                                           derive_seed(settings.seed, "collect/" + d.name)));
      const DomainStats& st = stats.back();
      json dj = {{"name", d.name},
                 {"file", d.file.string()},
                 {"sequences", st.num_sequences},
                 {"tokens", st.num_tokens},
                 {"truncated", sum.truncated},
                 {"seconds", st.seconds},
                 {"tokens_per_s", st.seconds > 0 ? static_cast<double>(st.num_tokens) / st.seconds : 0.0}};
      if (settings.gradient_overlap) {
        dj["loss"] = st.loss;
        dj["loss_tokens"] = st.loss_tokens;
      }
      dom_json.push_back(std::move(dj));
    }

    const size_t raw_before = raw.size();
    json layers = analyze(stats, settings, derive_seed(settings.seed, "analysis"), &raw, std::to_string(mi) + ".");
    const int64_t I = cfg.intermediate_size, K = top_count(settings.top_ratio, I);
    double iou_sum = 0, ratio_sum = 0, ratio_min = 1e300, ratio_max = -1e300;
    int64_t count = 0, significant = 0;
    for (const auto& layer : layers)
      for (const auto& p : layer["pairs"]) {
        const double r = p["ratio"].get<double>();
        iou_sum += p["iou"].get<double>();
        ratio_sum += r;
        ratio_min = std::min(ratio_min, r);
        ratio_max = std::max(ratio_max, r);
        if (!p["p_value"].is_null() && p["p_value"].get<double>() <= 0.05) ++significant;
        ++count;
      }
    json mj = {{"index", mi},
               {"model", dir.string()},
               {"model_type", cfg.model_type},
               {"hidden_size", cfg.hidden_size},
               {"intermediate_size", I},
               {"num_layers", cfg.num_hidden_layers},
               {"params", cfg.parameter_count()},
               {"K", K},
               {"k", top_count(settings.top_ratio, I)},
               {"iou_random", random_iou(K, I)},
               {"mean_iou", count ? iou_sum / count : 0.0},
               {"mean_ratio", count ? ratio_sum / count : 0.0},
               {"min_ratio", count ? ratio_min : 0.0},
               {"max_ratio", count ? ratio_max : 0.0},
               {"pairs_p_le_0.05", significant},
               {"pairs_total", count},
               {"domains", dom_json},
               {"layers", layers}};
    models_json.push_back(std::move(mj));
    log::info("probe: model ", mi, ": mean IoU ", models_json.back()["mean_iou"].get<double>(), " vs random ",
              random_iou(K, I), " (ratio ", models_json.back()["mean_ratio"].get<double>(), ")");
    if (dist::is_main() && mi + 1 < models.size()) {  // the last model's result goes straight to probe.json
      fs::create_directories(partial_dir);
      const std::vector<std::pair<std::string, at::Tensor>> mine(raw.begin() + static_cast<std::ptrdiff_t>(raw_before), raw.end());
      json names = json::array();
      for (const auto& [name, t] : mine) names.push_back(name);
      io::save_safetensors(partial_tensors, mine, {{"producer", "sparsecl " SPARSECL_VERSION}});
      write_file_atomic(partial_json, json{{"config_hash", config_hash}, {"model", dir.string()}, {"tensors", names},
                                          {"entry", models_json.back()}}.dump() + "\n");
    }
  }

  json doc;
  doc["layers"] = models_json[0]["layers"];
  doc["models"] = models_json;
  doc["settings"] = sj;
  json model_list = json::array();
  for (const auto& m : models) model_list.push_back(m.string());
  doc["provenance"] = {
      {"config", config},
      {"config_hash", config_hash},
      {"model", models[0].string()},
      {"models", model_list},
      {"seed", settings.seed},
      {"world_size", dist::world_size()},  // data-parallel processes that computed it
      {"versions", io::software_versions()}};

  if (dist::is_main()) {  // data parallel: every rank holds the same reduced statistics; one writes
    io::save_safetensors(output_dir / "probe_stats.safetensors", raw,
                         {{"producer", "sparsecl " SPARSECL_VERSION},
                          {"config_hash", doc["provenance"]["config_hash"].get<std::string>()},
                          {"score", score_name(settings.score)}});
    write_file_atomic(output_dir / "probe.json", doc.dump(1) + "\n");  // last: marks the probe complete
    remove_tree(partial_dir);
    log::info("probe: wrote ", (output_dir / "probe.json").string(), " and probe_stats.safetensors (", raw.size(),
              " tensors)");
  }
  dist::barrier();
  return doc;
}

}  // namespace sparsecl::probe
