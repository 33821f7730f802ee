// run_sweep (include/sparsecl/run/driver.h): the sequential stages of every (method, seed), the shared
// base measurements, the CL metrics and the sweep summary. Each step checks for its finished output
// first, which is what makes a killed run resumable (see the header for the layout and the rules).
#include "sparsecl/run/driver.h"

#include <ATen/ATen.h>

#include <chrono>
#include <cmath>
#include <limits>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/options.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/config/schema.h"
#include "sparsecl/data/dataset.h"
#include "sparsecl/eval/cl_metrics.h"
#include "sparsecl/eval/drift.h"
#include "sparsecl/eval/evaluate.h"
#include "sparsecl/io/provenance.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/probe/probe.h"
#include "sparsecl/report/report.h"
#include "sparsecl/text/tokenizer.h"
#include "sparsecl/train/methods.h"
#include "sparsecl/train/trainer.h"

namespace sparsecl::run {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The provenance block every JSON output of the driver carries.
json provenance(const config::Config& cfg, const std::string& config_source, const json& extra = json::object()) {
  const auto seeds = cfg.get<config::IntList>("seeds");
  json p = {{"config", cfg.to_json()},
            {"config_file", config_source},
            {"config_hash", cfg.hash()},
            {"model", cfg.get<std::string>("model")},
            {"seed", seeds.size() == 1 ? json(seeds[0]) : json(seeds)},
            {"world_size", dist::world_size()},  // data-parallel processes that computed it
            {"versions", io::software_versions()}};
  p.update(extra);
  return p;
}

// Data parallel (dist.h): every rank runs the driver and computes; rank 0 alone writes, and what is
// already done on disk is decided by rank 0, so that every rank takes the same branch.
bool exists_on_main(const fs::path& path) { return dist::main_says(fs::exists(path)); }
// Rank 0 writes `file`; every rank returns once it is there.
void publish(const fs::path& file, const std::string& text) {
  if (dist::is_main()) write_file_atomic(file, text);
  dist::barrier();
}

// A directory's claim file: created with the config hash the first time, and checked on every later
// start so that two different configs never write into one directory.
void claim(const fs::path& dir, const std::string& hash, const json& what) {
  std::string refused;
  if (dist::is_main()) {
    fs::create_directories(dir);
    const fs::path file = dir / "run.json";
    if (fs::exists(file)) {
      const std::string have = read_json_file(file, "run state").value("config_hash", "");
      if (have != hash)
        refused = dir.string() + " holds a run of another config (hash " + have + ", this config hashes to " + hash +
                  "); use another output= or remove the directory";
    } else {
      json j = what;
      j["config_hash"] = hash;
      write_file_atomic(file, j.dump(2) + "\n");
    }
  }
  dist::check_all(refused.empty(), refused);
}

struct Model {
  std::unique_ptr<model::Decoder> decoder;
  std::unique_ptr<text::Tokenizer> tokenizer;
  int64_t pad_id = 0;
};

Model load_base(const config::Config& cfg) {
  Model m;
  const fs::path dir = cfg.get<std::string>("model");
  m.decoder = std::make_unique<model::Decoder>(model::load_decoder(
      dir, model::parse_dtype(cfg.get<std::string>("dtype")), cfg.get<std::string>("device"), cfg.get<std::string>("device_map")));
  m.tokenizer = text::Tokenizer::load_if_present(dir);
  if (!m.tokenizer) throw Error("run: " + dir.string() + " has no tokenizer; `run` needs one for the data and tasks");
  m.pad_id = data::pad_id_for(m.tokenizer.get());
  return m;
}

// The drift probe set (eval.drift_samples records of data.general.probe) or nothing when drift is off.
std::vector<data::Example> drift_examples(const config::Config& cfg, const text::Tokenizer& tokenizer) {
  if (!cfg.get<bool>("eval.drift")) return {};
  return eval::drift_examples(cfg.get<std::string>("data.general.probe"), &tokenizer,
                              cfg.get<int64_t>("eval.drift_samples"), cfg.get<int64_t>("eval.max_length"));
}

eval::Representations representations(const config::Config& cfg, const Model& m,
                                      const std::vector<data::Example>& examples) {
  return eval::collect_representations(*m.decoder, examples, cfg.get<int64_t>("eval.batch_size"), m.pad_id,
                                       /*seed=*/0);
}

// Evaluation of the model as it is now: evaluate_domains + (optionally) drift against the base.
json evaluate_now(const config::Config& cfg, const Model& m, const eval::Representations* base_reps,
                  const std::vector<data::Example>& drift_set, bool progress) {
  eval::EvaluateSettings es;
  es.domains = cfg.get<config::StringList>("stages");
  es.progress = progress;
  json out = eval::evaluate_domains(*m.decoder, m.tokenizer.get(), cfg, es);
  if (base_reps && !drift_set.empty()) {
    const auto t0 = Clock::now();
    const auto reps = representations(cfg, m, drift_set);
    out["drift"] = eval::drift(*base_reps, reps, cfg.get<double>("eval.drift_energy"));
    out["drift"]["seconds"] = seconds_since(t0);
  }
  return out;
}

// Top-K neuron sets of one stage's training data under the model as it is now.
std::vector<at::Tensor> stage_top_sets(const config::Config& cfg, const Model& m,
                                       const std::vector<data::Example>& examples, const std::string& domain,
                                       uint64_t seed, bool progress) {
  probe::Settings s = probe::Settings::from_config(cfg);
  s.max_samples = cfg.get<int64_t>("probe.stage_samples");
  s.gradient_overlap = false;
  s.permutations = 0;
  s.token_pairs = 0;
  s.progress = progress;
  std::vector<data::Example> subset(examples.begin(),
                                    examples.begin() + std::min<size_t>(examples.size(), static_cast<size_t>(s.max_samples)));
  const auto stats = probe::collect_domain_stats(*m.decoder, subset, domain, s, m.pad_id, seed);
  std::vector<at::Tensor> tops;
  const int64_t K = probe::top_count(s.top_ratio, stats.intermediate_size);
  for (size_t l = 0; l < stats.layers.size(); ++l)
    tops.push_back(probe::top_set(stats.score(static_cast<int64_t>(l), s.score), K).cpu());
  return tops;
}

json stage_probe_json(const std::vector<at::Tensor>& before, const std::vector<at::Tensor>& after, int64_t I) {
  json layers = json::array();
  double sum = 0;
  for (size_t l = 0; l < before.size(); ++l) {
    const int64_t K = before[l].numel();
    const double iou = probe::set_iou(before[l], after[l], I);
    sum += iou;
    auto ids = [](const at::Tensor& t) {
      const at::Tensor c = t.to(at::kLong).contiguous();
      return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
    };
    layers.push_back({{"layer", l}, {"K", K}, {"iou_before_after", iou}, {"iou_random", probe::random_iou(K, I)},
                      {"top_before", ids(before[l])}, {"top_after", ids(after[l])}});
  }
  return {{"intermediate_size", I}, {"mean_iou_before_after", before.empty() ? 0.0 : sum / before.size()},
          {"layers", layers}};
}

std::string stage_name(size_t index, const std::string& domain) { return std::to_string(index) + "-" + domain; }

// One (method, seed) run through every stage; returns its metrics.json.
json run_one(const config::Config& sweep_cfg, const std::string& config_source, const std::string& method_name,
             int64_t seed, const fs::path& root, const RunOptions& options) {
  config::Config cfg = sweep_cfg;
  cfg.set("methods", config::StringList{method_name}, "run");
  cfg.set("seeds", config::IntList{seed}, "run");
  cfg.set("train.seed", seed, "run");
  const fs::path dir = root / (method_name + "-seed" + std::to_string(seed));
  claim(dir, cfg.hash(), {{"method", method_name}, {"seed", seed}, {"model", cfg.get<std::string>("model")}});
  publish(dir / "config.yaml", cfg.to_yaml());

  const auto stages = cfg.get<config::StringList>("stages");
  log::info("run[", method_name, ", seed ", seed, "]: ", stages.size(), " stages into ", dir.string());
  Model m = load_base(cfg);
  const auto drift_set = drift_examples(cfg, *m.tokenizer);
  std::unique_ptr<eval::Representations> base_reps;
  if (!drift_set.empty()) base_reps = std::make_unique<eval::Representations>(eval::load_representations(root / "base" / "representations.safetensors"));

  const bool is_adapter_method = method_name == "lora" || method_name == "orth";
  const bool merge_adapters = cfg.get<bool>("lora.merge");
  std::vector<json> rows = {read_json_file(root / "base" / "eval.json", "base evaluation")};
  std::vector<fs::path> previous;
  json stage_log = json::array();
  for (size_t i = 0; i < stages.size(); ++i) {
    const std::string& domain = stages[i];
    const fs::path sd = dir / "stages" / stage_name(i + 1, domain);
    const fs::path train_dir = sd / "train";
    if (exists_on_main(sd / "done.json")) {
      log::info("run[", method_name, ", seed ", seed, "]: stage ", i + 1, " (", domain, ") already done; applying it");
      if (dist::is_main()) remove_tree(train_dir / "checkpoints");  // left over when a kill came right after done.json
      train::apply_stage_output(*m.decoder, method_name, train_dir, merge_adapters);
      previous.push_back(train_dir);
      rows.push_back(read_json_file(sd / "eval.json", "stage evaluation"));
      stage_log.push_back(read_json_file(sd / "done.json", "stage record"));
      continue;
    }
    const auto t_stage = Clock::now();
    log::info("run[", method_name, ", seed ", seed, "]: stage ", i + 1, "/", stages.size(), ": ", domain);
    data::LoadOptions lo;
    lo.max_length = cfg.get<int64_t>("train.max_length");
    lo.shuffle = false;  // the trainer shuffles with train.seed
    const auto examples = data::load_jsonl(cfg.get<std::string>("data." + domain + ".train"), m.tokenizer.get(), lo);
    if (examples.empty()) throw Error("run: data." + domain + ".train has no records");

    const bool stage_probes = cfg.get<bool>("probe.stage_probes");
    std::vector<at::Tensor> top_before;
    if (stage_probes) top_before = stage_top_sets(cfg, m, examples, domain, static_cast<uint64_t>(seed), options.progress);

    train::StageContext ctx;
    ctx.stage = domain;
    ctx.examples = &examples;
    ctx.previous = previous;
    ctx.pad_id = m.pad_id;
    ctx.seed = static_cast<uint64_t>(seed);
    auto method = train::make_method(method_name, cfg, ctx);
    train::TrainOptions to = train::TrainOptions::from_config(cfg, method->dense(), static_cast<int64_t>(examples.size()));
    to.pad_id = m.pad_id;
    to.progress = options.progress;
    to.resume = exists_on_main(train_dir);  // an interrupted stage continues from its newest checkpoint
    train::RunInfo info;
    info.config = cfg.to_json();
    info.config["stage"] = {{"index", i + 1}, {"domain", domain}, {"method", method_name}};
    info.config_hash = config::fnv1a64_hex(cfg.hash() + "/stage/" + std::to_string(i + 1));
    info.base_model = previous.empty() ? cfg.get<std::string>("model") : previous.back().string();
    const auto result = train::train(*m.decoder, *method, examples, to, train_dir, info);
    method->finish_stage(*m.decoder, examples, train_dir);
    // lora.merge=false keeps the stage's adapter attached (frozen) under the next stage's new one.
    if (merge_adapters || !is_adapter_method) method->merge_into_base(*m.decoder);

    if (stage_probes) {
      const auto top_after = stage_top_sets(cfg, m, examples, domain, static_cast<uint64_t>(seed), options.progress);
      json pj = stage_probe_json(top_before, top_after, m.decoder->config().intermediate_size);
      pj["provenance"] = provenance(cfg, config_source, {{"stage", i + 1}, {"domain", domain}});
      publish(sd / "probe.json", pj.dump(1) + "\n");
    }
    json row = evaluate_now(cfg, m, base_reps.get(), drift_set, options.progress);
    row["provenance"] = provenance(cfg, config_source, {{"stage", i + 1}, {"domain", domain}, {"method", method_name}});
    publish(sd / "eval.json", row.dump(2) + "\n");
    rows.push_back(row);

    const json done = {{"row", i + 1},
                       {"stage", domain},
                       {"steps", result.steps_done},
                       {"train_loss", result.last_loss},
                       {"tokens_per_s", result.tokens_per_s},
                       {"seconds", seconds_since(t_stage)}};
    publish(sd / "done.json", done.dump(2) + "\n");
    // A done stage is rebuilt from its product, never from a checkpoint: free the disk (for full / migu
    // a checkpoint is the weights plus two AdamW moments, ~16 bytes per parameter).
    if (dist::is_main()) remove_tree(train_dir / "checkpoints");
    stage_log.push_back(done);
    previous.push_back(train_dir);
  }

  // ---- metrics.json ----
  const Rows r = collect_rows(rows, stages);
  json metrics = eval::cl_metrics(r.score, stages);
  auto matrix = [](const std::vector<std::vector<double>>& x) {
    json a = json::array();
    for (const auto& row : x) {
      json jr = json::array();
      for (double v : row) jr.push_back(eval::number_or_null(v));
      a.push_back(jr);
    }
    return a;
  };
  metrics["provenance"] = provenance(cfg, config_source, {{"method", method_name}});
  metrics["method"] = method_name;
  metrics["seed"] = seed;
  metrics["model"] = cfg.get<std::string>("model");
  metrics["tasks"] = stages;
  json score_metric = json::object();
  for (const auto& d : stages) score_metric[d] = rows.back()["domains"][d].value("score_metric", json(nullptr));
  metrics["score_metric"] = score_metric;
  metrics["R"] = matrix(r.score);
  metrics["heldout_loss"] = matrix(r.heldout_loss);
  // General-capability retention: the general MC accuracy after each stage relative to the base.
  json general_scores = json::array(), retention = json::array();
  const json& g0 = rows[0]["general"];
  const bool have_general = g0.contains("acc_norm");
  for (const auto& row : rows) {
    if (!have_general || !row["general"].contains("acc_norm")) continue;
    const double v = row["general"]["acc_norm"].get<double>();
    general_scores.push_back(v);
    const double base = g0["acc_norm"].get<double>();
    retention.push_back(base > 0 ? json(v / base) : json(nullptr));
  }
  if (have_general)
    metrics["general"] = {{"metric", "acc_norm"}, {"file", g0.value("file", "")}, {"scores", general_scores},
                          {"retention", retention}};
  json drift = json::array();
  for (size_t i = 1; i < rows.size(); ++i)
    if (rows[i].contains("drift")) {
      json d = rows[i]["drift"];
      d["row"] = i;
      d["stage"] = stages[i - 1];
      drift.push_back(d);
    }
  metrics["drift"] = drift;
  metrics["stages"] = stage_log;
  publish(dir / "metrics.json", metrics.dump(2) + "\n");
  log::info("run[", method_name, ", seed ", seed, "]: ACC ", metrics["ACC"].dump(), ", BWT ", metrics["BWT"].dump(),
            ", F ", metrics["F"].dump(), " -> ", (dir / "metrics.json").string());
  return metrics;
}

}  // namespace

Rows collect_rows(const std::vector<json>& eval_rows, const std::vector<std::string>& tasks) {
  Rows r;
  for (const auto& row : eval_rows) {
    std::vector<double> s, h;
    for (const auto& t : tasks) {
      const json* d = row.contains("domains") && row["domains"].contains(t) ? &row["domains"][t] : nullptr;
      s.push_back(d && d->contains("score") && (*d)["score"].is_number() ? (*d)["score"].get<double>() : kNaN);
      const bool has_loss = d && d->contains("heldout") && (*d)["heldout"].is_object() &&
                            (*d)["heldout"].contains("loss") && (*d)["heldout"]["loss"].is_number();
      h.push_back(has_loss ? (*d)["heldout"]["loss"].get<double>() : kNaN);
    }
    r.score.push_back(std::move(s));
    r.heldout_loss.push_back(std::move(h));
  }
  return r;
}

json run_sweep(const config::Config& cfg, const std::string& config_source, const RunOptions& options) {
  const auto t0 = Clock::now();
  const fs::path root = cfg.get<std::string>("output");
  const auto methods = cfg.get<config::StringList>("methods");
  const auto seeds = cfg.get<config::IntList>("seeds");
  const auto stages = cfg.get<config::StringList>("stages");
  if (methods.empty()) throw Error("run: methods is empty");
  if (seeds.empty()) throw Error("run: seeds is empty");
  if (stages.empty()) throw Error("run: stages is empty");
  config::validate_paths(cfg, fs::current_path());
  // Configurations that cannot work fail now, before hours of work: methods that train base weights
  // need float32 weights (their fp32 masters); every method's options must parse.
  for (const auto& m : methods)
    if ((m == "full" || m == "migu") && cfg.get<std::string>("dtype") != "float32")
      throw Error("run: method " + m + " trains base weights and needs dtype=float32 (the fp32 masters; cuda computes under bf16 autocast)");
  (void)train::TrainOptions::from_config(cfg, false, 1);
  (void)train::lora_config_from(cfg);

  claim(root, cfg.hash(), {{"kind", "sweep"}, {"methods", methods}, {"seeds", seeds}});
  publish(root / "config.yaml", cfg.to_yaml());
  log::info("run: ", methods.size(), " method(s) x ", seeds.size(), " seed(s) x ", stages.size(), " stages -> ",
            root.string(), " (config hash ", cfg.hash(), ")");

  // ---- H1 probe of the base model (once per sweep) ----
  const fs::path probe_dir = root / "probe";
  if (!exists_on_main(probe_dir / "probe.json")) {
    const auto t = Clock::now();
    std::vector<fs::path> models;
    for (const auto& m : cfg.get<config::StringList>("models")) models.emplace_back(m);
    if (models.empty()) models.emplace_back(cfg.get<std::string>("model"));
    std::vector<probe::Domain> domains;
    const std::string split = cfg.get<std::string>("probe.split");
    for (const auto& d : cfg.get<config::StringList>("probe.domains"))
      domains.push_back({d, cfg.get<std::string>("data." + d + "." + split)});
    probe::Settings s = probe::Settings::from_config(cfg);
    s.progress = options.progress;
    probe::RunInfo info;
    info.config = cfg.to_json();
    info.config_hash = cfg.hash();
    probe::run_probe(models, domains, s, probe_dir, info);
    log::info("run: base probe done in ", seconds_since(t), " s");
  }

  // ---- row 0: the base model (shared by every method and seed) ----
  const fs::path base_dir = root / "base";
  if (!exists_on_main(base_dir / "eval.json")) {
    const auto t = Clock::now();
    if (dist::is_main()) fs::create_directories(base_dir);
    Model m = load_base(cfg);
    const auto drift_set = drift_examples(cfg, *m.tokenizer);
    if (!drift_set.empty()) {
      const eval::Representations reps = representations(cfg, m, drift_set);
      if (dist::is_main()) eval::save_representations(reps, base_dir / "representations.safetensors");
    }
    json row = evaluate_now(cfg, m, nullptr, {}, options.progress);
    row["provenance"] = provenance(cfg, config_source, {{"stage", 0}, {"domain", "base"}});
    publish(base_dir / "eval.json", row.dump(2) + "\n");  // last: marks row 0 complete
    log::info("run: base evaluation done in ", seconds_since(t), " s");
  }

  std::vector<json> all;
  json runs = json::array();
  for (const auto& m : methods)
    for (int64_t s : seeds) {
      all.push_back(run_one(cfg, config_source, m, s, root, options));
      runs.push_back(m + "-seed" + std::to_string(s));
    }

  json sweep = {{"provenance", provenance(cfg, config_source)},
                {"runs", runs},
                {"summary", report::summarize_runs(all)},
                {"seconds", seconds_since(t0)}};
  publish(root / "sweep.json", sweep.dump(2) + "\n");
  if (options.report && dist::is_main()) {
    report::write_report({root}, root / "report");
    log::info("run: report in ", (root / "report" / "report.html").string());
  }
  log::info("run: finished in ", seconds_since(t0), " s");
  return sweep;
}

}  // namespace sparsecl::run
