// One evaluation pass of a loaded model over the configured domains (docs/eval.md "sparsecl eval"):
// for each domain d, the held-out loss of data.<d>.heldout and every task file of data.<d>.tasks scored
// by its schema (detected from the file's first record: "choices" -> mc, "entry_point"/"tests" -> code,
// "prompt" + "answer" -> gen), the domain's headline `score`, and the general-capability probe
// (data.general.probe, multiple choice). The returned JSON is what `sparsecl eval` writes as
// eval.json's "domains" and "general"; the `run` driver calls it after every stage.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace sparsecl::config {
class Config;
}
namespace sparsecl::model {
class Decoder;
}
namespace sparsecl::text {
class Tokenizer;
}

namespace sparsecl::eval {

struct EvaluateSettings {
  std::vector<std::string> domains;  // empty: the config's `stages`
  bool general = true;               // score data.general.probe when it is set and exists
  bool progress = false;             // per-scorer progress bars on stderr (log lines are always written)
};

// The headline metric of a domain's tasks ("pass@1", "exact_match", "acc", "acc_norm"):
// code -> pass@1, math -> exact_match, medical -> acc, chat -> acc_norm, any other domain -> acc.
std::string headline_metric(const std::string& domain);

// Reads eval.{max_samples, heldout_samples, batch_size, max_length, max_new_tokens, run_code,
// code_timeout} and data.<d>.{heldout, tasks}, data.general.probe from `cfg`.
// `tokenizer` may be null: then only held-out files of {"ids"} records can be scored, and every task
// is recorded as {"skipped": "no tokenizer"}.
// Result: {"domains": {d: {"heldout": {...}, "tasks": {stem: {...}}, "score", "score_metric",
// "score_method"}}, "general": {...} (empty object when there is no probe)}.
nlohmann::json evaluate_domains(const model::Decoder& decoder, const text::Tokenizer* tokenizer,
                                const config::Config& cfg, const EvaluateSettings& settings = {});

}  // namespace sparsecl::eval
