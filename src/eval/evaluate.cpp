// evaluate_domains: held-out loss, task scores and headline score per domain (include/sparsecl/eval/evaluate.h).
#include "sparsecl/eval/evaluate.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/config/options.h"
#include "sparsecl/eval/scoring.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/text/tokenizer.h"

namespace sparsecl::eval {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// "mc" | "gen" | "code" from the fields of the file's first record (data/README.md's schemas).
std::string detect_schema(const fs::path& file) {
  std::ifstream in(file);
  if (!in) throw Error("eval: cannot open task file " + file.string());
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json r;
    try {
      r = json::parse(line);
    } catch (const std::exception& e) {
      throw Error("eval: " + file.string() + ": first record is not JSON: " + e.what());
    }
    if (r.contains("choices")) return "mc";
    if (r.contains("entry_point") || r.contains("tests")) return "code";
    if (r.contains("prompt") && r.contains("answer")) return "gen";
    throw Error("eval: " + file.string() + ": cannot tell the task schema (mc: question/choices/answer, gen: " +
                "prompt/answer, code: prompt/tests/entry_point/prompt_style)");
  }
  throw Error("eval: task file " + file.string() + " is empty");
}

json loss_json(const LossResult& r, const fs::path& file) {
  return {{"file", file.string()}, {"loss", r.loss}, {"perplexity", r.perplexity}, {"examples", r.examples},
          {"loss_tokens", r.loss_tokens}, {"method", r.method}};
}

}  // namespace

std::string headline_metric(const std::string& domain) {
  if (domain == "code") return "pass@1";
  if (domain == "math") return "exact_match";
  if (domain == "chat") return "acc_norm";
  return "acc";
}

json evaluate_domains(const model::Decoder& decoder, const text::Tokenizer* tokenizer, const config::Config& cfg,
                      const EvaluateSettings& settings) {
  EvalOptions task_opts;
  task_opts.batch_size = cfg.get<int64_t>("eval.batch_size");
  task_opts.max_length = cfg.get<int64_t>("eval.max_length");
  task_opts.max_samples = cfg.get<int64_t>("eval.max_samples");
  task_opts.progress = settings.progress;
  EvalOptions heldout_opts = task_opts;
  heldout_opts.max_samples = cfg.get<int64_t>("eval.heldout_samples");
  const int64_t max_new_tokens = cfg.get<int64_t>("eval.max_new_tokens");
  const bool run_code = cfg.get<bool>("eval.run_code");
  if (cfg.get<double>("eval.task_timeout") > 0)
    log::warn("eval: eval.task_timeout is not applied by evaluate_domains; task files run to completion");

  std::vector<std::string> domains = settings.domains;
  if (domains.empty()) domains = cfg.get<config::StringList>("stages");

  json out = {{"domains", json::object()}, {"general", json::object()}};
  for (const auto& d : domains) {
    const auto t_domain = Clock::now();
    json dj = json::object();
    const std::string heldout_key = "data." + d + ".heldout";
    std::optional<LossResult> heldout;
    fs::path heldout_file;
    if (!cfg.schema().find(heldout_key)) throw Error("eval: unknown domain '" + d + "' (no " + heldout_key + ")");
    heldout_file = cfg.get<std::string>(heldout_key);
    if (!heldout_file.empty()) {
      log::info("eval[", d, "]: held-out loss on ", heldout_file.string());
      const auto t0 = Clock::now();
      heldout = heldout_loss(decoder, tokenizer, heldout_file, heldout_opts);
      dj["heldout"] = loss_json(*heldout, heldout_file);
      dj["heldout"]["seconds"] = seconds_since(t0);
      log::info("eval[", d, "]: held-out loss ", heldout->loss, " (ppl ", heldout->perplexity, ", ", heldout->examples,
                " records)");
    } else {
      dj["heldout"] = nullptr;
    }

    const std::string metric = headline_metric(d);
    double metric_sum = 0;
    int64_t metric_files = 0;
    bool code_fallback = false;
    json tasks = json::object();
    for (const auto& task : cfg.get<config::StringList>("data." + d + ".tasks")) {
      const fs::path file = task;
      std::string name = file.stem().string();
      for (int k = 2; tasks.contains(name); ++k) name = file.stem().string() + "_" + std::to_string(k);
      const std::string schema = detect_schema(file);
      json tj = {{"file", file.string()}, {"schema", schema}};
      if (!tokenizer) {
        tj["skipped"] = "no tokenizer";
        log::warn("eval[", d, "]: ", name, " skipped: the model has no tokenizer");
        tasks[name] = tj;
        continue;
      }
      log::info("eval[", d, "]: ", name, " (", schema, ")");
      const auto t0 = Clock::now();
      std::optional<double> headline;  // this file's value of the domain's headline metric
      if (schema == "mc") {
        const auto r = score_mc(decoder, *tokenizer, load_mc(file, task_opts.max_samples), task_opts);
        tj.update({{"method", r.method}, {"n", r.n}, {"acc", r.acc}, {"acc_norm", r.acc_norm}});
        if (metric == "acc") headline = r.acc;
        if (metric == "acc_norm") headline = r.acc_norm;
        log::info("eval[", d, "]: ", name, " acc ", r.acc, " acc_norm ", r.acc_norm, " (n=", r.n, ")");
      } else if (schema == "gen") {
        GenOptions gen;
        gen.max_new_tokens = max_new_tokens;
        const auto r = score_gsm8k(decoder, *tokenizer, load_gen(file, task_opts.max_samples), task_opts, gen);
        tj.update({{"method", r.method}, {"n", r.n}, {"exact_match", r.exact_match}});
        if (metric == "exact_match" || metric == "acc") headline = r.exact_match;
        log::info("eval[", d, "]: ", name, " exact_match ", r.exact_match, " (n=", r.n, ")");
      } else {  // code
        if (run_code) {
          CodeOptions co;
          co.execute = true;
          co.max_new_tokens = max_new_tokens;
          co.sandbox.timeout_s = cfg.get<double>("eval.code_timeout");
          const auto r = score_code(decoder, *tokenizer, load_code(file, task_opts.max_samples), task_opts, co);
          tj.update({{"method", r.method}, {"n", r.n}, {"pass@1", r.score},
                     {"sandbox", {{"network_isolated", r.network_isolated}, {"fs_isolated", r.fs_isolated},
                                  {"pids_isolated", r.pids_isolated}}}});
          if (metric == "pass@1") headline = r.score;
          log::info("eval[", d, "]: ", name, " pass@1 ", r.score, " (n=", r.n, ")");
        } else {
          // score_code's documented fallback (the held-out loss of the domain's held-out file), reusing
          // the loss computed above instead of running the same file again.
          code_fallback = true;
          if (!heldout)
            throw Error("eval[" + d + "]: " + file.string() + ": code execution is not enabled (eval.run_code / " +
                        "--run-code) and " + heldout_key + " is empty, so there is no fallback");
          tj.update({{"method", "heldout_loss on " + heldout_file.filename().string() +
                                    " (pass@1 not run: execution of generated code was not enabled)"},
                     {"n", heldout->examples}, {"heldout_loss", heldout->loss}});
          log::info("eval[", d, "]: ", name, " pass@1 not run (execution not enabled); held-out loss fallback");
        }
      }
      tj["seconds"] = seconds_since(t0);
      if (headline) {
        metric_sum += *headline;
        ++metric_files;
      }
      tasks[name] = tj;
    }
    dj["tasks"] = tasks;

    // Headline score (higher is better): the mean of the domain's metric over its task files; without
    // any such file (no tasks, no tokenizer, code without execution) minus the held-out loss.
    if (metric_files > 0) {
      dj["score"] = metric_sum / static_cast<double>(metric_files);
      dj["score_metric"] = metric;
      dj["score_method"] = "mean of " + metric + " over " + std::to_string(metric_files) + " task file(s)";
    } else if (heldout) {
      dj["score"] = -heldout->loss;
      dj["score_metric"] = "neg_heldout_loss";
      dj["score_method"] = std::string("minus the held-out loss of ") + heldout_file.filename().string() +
                           (code_fallback ? " (pass@1 not run: execution of generated code was not enabled)"
                                          : " (no task file gives " + metric + ")");
    } else {
      dj["score"] = nullptr;
      dj["score_metric"] = nullptr;
      dj["score_method"] = "no held-out file and no task scored";
    }
    dj["seconds"] = seconds_since(t_domain);
    log::info("eval[", d, "]: score ", dj["score"].dump(), " (", dj["score_method"].get<std::string>(), ")");
    out["domains"][d] = dj;
  }

  const std::string probe = cfg.schema().find("data.general.probe") ? cfg.get<std::string>("data.general.probe") : "";
  if (settings.general && !probe.empty()) {
    json g = {{"file", probe}};
    if (!fs::exists(probe)) {
      g["skipped"] = "file not found";
      log::warn("eval: general probe ", probe, " not found; skipped");
    } else if (!tokenizer) {
      g["skipped"] = "no tokenizer";
    } else {
      log::info("eval[general]: ", fs::path(probe).stem().string(), " (mc)");
      const auto t0 = Clock::now();
      const auto r = score_mc(decoder, *tokenizer, load_mc(probe, task_opts.max_samples), task_opts);
      g.update({{"name", fs::path(probe).stem().string()}, {"method", r.method}, {"n", r.n}, {"acc", r.acc},
                {"acc_norm", r.acc_norm}, {"score", r.acc}, {"score_metric", "acc"}, {"seconds", seconds_since(t0)}});
      log::info("eval[general]: acc ", r.acc, " acc_norm ", r.acc_norm, " (n=", r.n, ")");
    }
    out["general"] = g;
  }
  return out;
}

}  // namespace sparsecl::eval
