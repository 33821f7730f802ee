// The one declaration of sparsecl's options (see include/sparsecl/config/schema.h), grouped by section
// in the order `--help` lists them, plus the check that the paths a config names exist.
//
// Defaults: the science settings (probe ratio, LoRA rank, learning rates, ...) are the values the
// design calls for; sizes that only decide how long a run takes (steps, sample counts, lengths) default
// to a short run, and configs/seq4.yaml sets the full-scale ones.
#include "sparsecl/config/schema.h"

#include <algorithm>

#include "sparsecl/common/error.h"

namespace sparsecl::config {

namespace {

const std::vector<std::string> kDomains = {"code", "math", "medical", "chat"};
const std::vector<std::string> kMethods = {"full", "lora", "mask", "orth", "migu"};
const std::vector<std::string> kProjections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

Options build() {
  Options o;
  auto b = [&](std::string k, bool def, std::string help) { o.add({k, Type::Bool, def, help}); };
  auto i = [&](std::string k, int64_t def, std::string help, Check c = {}) { o.add({k, Type::Int, def, help, c}); };
  auto d = [&](std::string k, double def, std::string help, Check c = {}) { o.add({k, Type::Double, def, help, c}); };
  auto s = [&](std::string k, std::string def, std::string help, Check c = {}) {
    o.add({k, Type::String, def, help, c});
  };
  auto file = [&](std::string k, std::string def, std::string help) {
    o.add({k, Type::String, def, help, {}, PathKind::File});
  };
  auto files = [&](std::string k, StringList def, std::string help) {
    o.add({k, Type::StringList, def, help, {}, PathKind::File});
  };

  // ---- what to run ----
  o.add({"model", Type::String, std::string("models/smollm2-135m-instruct"),
         "HF model directory (config.json + safetensors) every stage starts from", {}, PathKind::Dir});
  o.add({"models", Type::StringList, StringList{},
         "model directories of a probe scale sweep (probe runs each in turn; empty: just `model`)", {}, PathKind::Dir});
  o.add({"stages", Type::StringList, StringList(kDomains), "domains fine-tuned in sequence", one_of(kDomains)});
  o.add({"methods", Type::StringList, StringList{"lora"}, "fine-tuning methods compared (each runs all stages)",
         one_of(kMethods)});
  o.add({"seeds", Type::IntList, IntList{0}, "seeds: each method runs once per seed", at_least(0)});
  o.add({"output", Type::String, std::string("runs"), "directory the run writes into (not part of the hash)",
         {}, PathKind::None, /*hashed=*/false});
  s("device", "cpu", "compute device", one_of({"cpu", "cuda"}));
  s("device_map", "", "pipeline placement of one model over several devices (a model larger than one GPU): '' "
    "(none), 'auto' (every visible GPU) or a list such as 'cuda:0,cuda:1'; overrides device");
  s("dtype", "float32", "dtype of the frozen weights and activations (float32 on cpu, bfloat16 on cuda)",
    one_of({"float32", "bfloat16", "float16"}));

  // ---- data: JSONL files in the layout of data/README.md ----
  const StringList tasks[] = {{"data/code/humaneval.jsonl", "data/code/mbpp_test.jsonl"},
                              {"data/math/gsm8k_test.jsonl"},
                              {"data/medical/pubmedqa_test.jsonl", "data/medical/mmlu_medical.jsonl"},
                              {"data/chat/arc_challenge.jsonl", "data/chat/mmlu_general.jsonl"}};
  for (size_t n = 0; n < kDomains.size(); ++n) {
    const std::string& dom = kDomains[n];
    file("data." + dom + ".train", "data/" + dom + "/train.jsonl", dom + " training set (loss schema)");
    file("data." + dom + ".heldout", "data/" + dom + "/heldout.jsonl", dom + " held-out loss set (loss schema)");
    files("data." + dom + ".tasks", tasks[n], dom + " evaluation tasks (code / gen / mc schema, by file)");
  }
  file("data.general.probe", "data/general/mmlu_probe.jsonl", "general-knowledge probe set for representation drift");

  // ---- probe (H1): MLP intermediate activations per domain ----
  o.add({"probe.domains", Type::StringList, StringList(kDomains), "domains probed and compared pairwise",
         one_of(kDomains)});
  s("probe.split", "train", "which file of each domain is probed", one_of({"train", "heldout"}));
  d("probe.top_ratio", 0.05, "K = ratio * intermediate_size neurons per (domain, layer) set", range(0, 1, true));
  s("probe.score", "mean_abs", "neuron score ranking the domain set", one_of({"mean_abs", "freq"}));
  i("probe.max_samples", 256, "records probed per domain", at_least(1));
  i("probe.batch_size", 8, "sequences per forward pass", at_least(1));
  i("probe.max_length", 512, "tokens per sequence (longer ones are truncated)", at_least(8));
  i("probe.permutations", 100, "permutation-null resamples per (pair, layer); 0: analytic null only", at_least(0));
  i("probe.token_pairs", 2000, "sampled token pairs for token-level IoU; 0: off", at_least(0));
  b("probe.gradients", false, "also accumulate MLP gradients and report gradient overlap (adds a backward pass)");
  b("probe.stage_probes", true, "`run`: probe each stage's training data before and after the stage (top-K shift)");
  i("probe.stage_samples", 64, "`run`: records of a stage's data in its before / after probes", at_least(1));

  // ---- train: the trainer every method shares ----
  i("train.steps", 100, "optimizer steps per stage", at_least(1));
  d("train.epochs", 0.0, "if > 0: each stage runs this many epochs of its training set instead of train.steps",
    at_least(0));
  i("train.batch_size", 4, "sequences per micro-batch", at_least(1));
  i("train.grad_accum", 1, "micro-batches per optimizer step", at_least(1));
  i("train.max_length", 512, "tokens per sequence (longer ones are truncated)", at_least(8));
  d("train.lr", 2e-4, "peak learning rate of the adapter methods (lora, orth)", positive());
  d("train.lr_dense", 2e-5, "peak learning rate of the methods that update base weights (full, mask, migu)", positive());
  d("train.warmup_ratio", 0.03, "linear warmup as a fraction of train.steps, then cosine decay", range(0, 1, false, true));
  i("train.warmup_steps", 0, "warmup in steps; > 0 overrides train.warmup_ratio", at_least(0));
  d("train.weight_decay", 0.0, "AdamW decoupled weight decay", at_least(0));
  d("train.clip", 1.0, "global gradient-norm clip; 0: off", at_least(0));
  s("train.dtype", "float32", "dtype of the trained parameters and optimizer state (master copies)",
    one_of({"float32", "bfloat16"}));
  b("train.activation_checkpointing", false, "recompute decoder layers in backward (less memory, ~30% slower)");
  i("train.checkpoint_layers", -1,
    "with activation_checkpointing: recompute only the first N decoder layers (-1: all); each layer left out "
    "keeps its activations (more memory) and saves its recomputation (faster)",
    at_least(-1));
  i("train.checkpoint_every", 0, "save a resumable checkpoint every N steps; 0: only at the end of a stage", at_least(0));
  b("train.packing", false, "pack several records into each max_length sequence");
  i("train.seed", 0, "seed of one run (data order, init, dropout); `run` sets it from each of `seeds`", at_least(0));
  i("train.bucket_mb", 25, "data parallel (torchrun / srun): gradients are summed over the ranks in buckets of about "
    "this many MiB, each sent as soon as the backward pass has filled it", at_least(1));
  i("train.log_every", 10, "steps between step-log lines", at_least(1));

  // ---- lora (also the adapter of orth) ----
  i("lora.r", 16, "rank", at_least(1));
  d("lora.alpha", 32.0, "scale numerator: alpha / r (alpha / sqrt(r) with rslora)", positive());
  d("lora.dropout", 0.05, "dropout on the adapter input", range(0, 1, false, true));
  b("lora.rslora", false, "rank-stabilised scaling alpha / sqrt(r)");
  o.add({"lora.target_modules", Type::StringList, StringList(kProjections), "adapted linear layers",
         one_of(kProjections)});
  b("lora.merge", true, "merge each stage's adapter into the base before the next stage (false: keep them stacked)");

  // ---- mask (Approach A): train only the current domain's top neurons ----
  d("mask.ratio", 0.05, "fraction of each layer's MLP neurons trained (chosen by a probe of the stage's data)",
    range(0, 1, true));
  b("mask.exclude_previous", false, "never reuse neurons chosen by earlier stages (strict isolation)");
  b("mask.heads", false, "also train the attention heads with the largest output norm");
  d("mask.head_ratio", 0.1, "fraction of heads per layer trained when mask.heads is on", range(0, 1, true));

  // ---- orth (Approach B): LoRA in the complement of earlier tasks' subspace ----
  s("orth.basis", "gpm", "what spans earlier tasks' subspace: input activations (GPM), gradients or weight deltas",
    one_of({"gpm", "gradients", "deltas"}));
  d("orth.energy", 0.97, "singular vectors kept until this share of the energy", range(0, 1, true));
  s("orth.mode", "project", "project A each step | InfLoRA init (A frozen) | O-LoRA regularizer",
    one_of({"project", "init", "regularize"}));
  d("orth.lambda", 0.5, "weight of the O-LoRA regularizer (mode regularize)", at_least(0));
  i("orth.basis_samples", 128, "records of a finished stage used to extend the basis", at_least(1));

  // ---- migu (baseline): magnitude-gated full fine-tuning ----
  d("migu.quantile", 0.7, "per step, output rows whose activation norm is below this quantile get no gradient",
    range(0, 1, false, true));

  // ---- eval: after the base model and after every stage ----
  b("eval.base", true, "evaluate the base model too (row 0 of R, needed for FWT)");
  i("eval.max_samples", 200, "records per task file; 0: all", at_least(0));
  i("eval.heldout_samples", 200, "records of each held-out loss file; 0: all", at_least(0));
  i("eval.batch_size", 8, "sequences per forward / generation batch", at_least(1));
  i("eval.max_length", 1024, "prompt + choice tokens kept (longer prompts are truncated on the left)", at_least(8));
  i("eval.max_new_tokens", 256, "generation budget for gen and code tasks", at_least(1));
  b("eval.run_code", false, "execute generated programs for code pass@1 (opt-in: runs model output in a sandbox)");
  d("eval.code_timeout", 10.0, "seconds per generated program", positive());
  d("eval.task_timeout", 0.0, "seconds per task file before it is cut short and marked; 0: none", at_least(0));
  b("eval.drift", true, "measure representation drift on data.general.probe (CKA, principal angles)");
  i("eval.drift_samples", 128, "probe-set records whose hidden states are compared", at_least(1));
  d("eval.drift_energy", 0.9, "PCA subspace kept until this share of the variance", range(0, 1, true));
  return o;
}

}  // namespace

const std::vector<std::string>& domains() { return kDomains; }

const Options& schema() {
  static const Options options = build();
  return options;
}

Config load(const std::filesystem::path& yaml, const std::vector<std::string>& overrides) {
  return Config::load(schema(), yaml, overrides);
}

std::vector<MissingPath> missing_paths(const Config& cfg, const std::filesystem::path& base) {
  const auto stages = cfg.get<StringList>("stages");
  const auto probed = cfg.get<StringList>("probe.domains");
  auto used = [&](const std::string& key) {
    if (!key.starts_with("data.")) return true;
    const std::string dom = key.substr(5, key.find('.', 5) - 5);
    if (dom == "general") return cfg.get<bool>("eval.drift");
    return std::count(stages.begin(), stages.end(), dom) + std::count(probed.begin(), probed.end(), dom) > 0;
  };
  std::vector<MissingPath> missing;
  for (const auto& opt : cfg.schema().all()) {
    if (opt.path == PathKind::None || !used(opt.key)) continue;
    StringList paths;
    if (opt.type == Type::String) paths.push_back(cfg.get<std::string>(opt.key));
    else paths = cfg.get<StringList>(opt.key);
    for (const auto& p : paths) {
      const std::filesystem::path path = base / p;  // an absolute p replaces base
      std::error_code ec;
      const bool ok = opt.path == PathKind::Dir ? std::filesystem::is_directory(path, ec)
                                                : std::filesystem::is_regular_file(path, ec);
      if (p.empty() || !ok) missing.push_back({opt.key, p, opt.path});
    }
  }
  return missing;
}

void validate_paths(const Config& cfg, const std::filesystem::path& base) {
  const auto missing = missing_paths(cfg, base);
  if (missing.empty()) return;
  std::string msg = std::to_string(missing.size()) + " path(s) in the config do not exist (relative to " + base.string() + "):";
  for (const auto& m : missing)
    msg += "\n  " + m.key + ": " + (m.path.empty() ? "(empty)" : m.path) +
           (m.kind == PathKind::Dir ? " (a model directory)" : " (a file)");
  throw Error(msg);
}

}  // namespace sparsecl::config
