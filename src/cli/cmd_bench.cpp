// `sparsecl bench kernels`: times sparsecl's top-k / statistics / IoU kernels against the plain tensor
// formulations (torch::topk of |h|, 0/1 float masks with sums and matmuls) on the same inputs in one
// run, checks that they agree, and prints time, effective GB/s (logical bytes: h read once, outputs
// written once) and the speed-up over the plain formulation. On CUDA the top-k rows also time the staged
// top-k path (TopkPath::kStaged, a candidate for the default) and check it equals the default path.
// `sparsecl bench model`: the model-level workloads (LoRA training step, probe forward, greedy
// generation) on a random decoder of a config.json's shape, and `--check`, the device-vs-CPU-reference
// check of the same code paths (src/bench/workloads.cpp, docs/bench.md).
#include <torch/cuda.h>
#include <torch/version.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>

#include "sparsecl/bench/workloads.h"
#include "sparsecl/cli/commands.h"
#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/io/provenance.h"
#include "sparsecl/kernels/iou.h"
#include "sparsecl/kernels/neuron_stats.h"
#include "sparsecl/kernels/topk.h"
#include "sparsecl/model/decoder.h"

namespace sparsecl::cli {

namespace {

struct BenchKernelsOptions {
  int64_t rows = 16384;
  int64_t cols = 14336;
  double ratio = 0.01;
  std::string dtype = "bfloat16";
  std::string device = "cuda";
  int iters = 20;
};

torch::Dtype parse_dtype(const std::string& s) {
  if (s == "bfloat16" || s == "bf16") return torch::kBFloat16;
  if (s == "float32" || s == "fp32" || s == "float") return torch::kFloat;
  if (s == "float16" || s == "fp16" || s == "half") return torch::kHalf;
  throw Error("bench kernels: --dtype must be bfloat16, float32 or float16, got '" + s + "'");
}

// Mean wall time of fn in milliseconds over `iters` calls after one warm-up call; the device is
// synchronised before and after (launches queue asynchronously in between).
double time_ms(const std::function<void()>& fn, int iters, bool cuda) {
  fn();
  if (cuda) torch::cuda::synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) fn();
  if (cuda) torch::cuda::synchronize();
  const std::chrono::duration<double, std::milli> dt = std::chrono::steady_clock::now() - t0;
  return dt.count() / iters;
}

struct Row {
  std::string impl;
  double ms;
};

// One table block: the op, its logical bytes, our time first, then the baselines.
void print_block(const std::string& op, double bytes, const std::vector<Row>& rows, const std::string& check) {
  std::printf("%s\n", op.c_str());
  const double ours = rows.front().ms;
  for (const auto& r : rows)  // ratio: this row's time / sparsecl's time (> 1: sparsecl is faster)
    std::printf("  %-48s %10.4f ms %9.1f GB/s %8.2fx\n", r.impl.c_str(), r.ms, bytes / (r.ms * 1e6), r.ms / ours);
  if (!check.empty()) std::printf("  check: %s\n", check.c_str());
}

void run_bench_kernels(const BenchKernelsOptions& o) {
  using namespace sparsecl::kernels;
  const bool cuda = o.device == "cuda";
  if (!cuda && o.device != "cpu") throw Error("bench kernels: --device must be cuda or cpu, got '" + o.device + "'");
  if (cuda && !torch::cuda::is_available()) throw Error("bench kernels: --device cuda but no CUDA device is available");
  if (o.rows < 2 || o.cols < 1) throw Error("bench kernels: --rows must be >= 2 and --cols >= 1");
  if (!(o.ratio > 0.0 && o.ratio <= 1.0)) throw Error("bench kernels: --ratio must be in (0, 1]");
  if (o.iters < 1) throw Error("bench kernels: --iters must be >= 1");
  const auto dtype = parse_dtype(o.dtype);
  const torch::Device dev = cuda ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  const int64_t n = o.rows, cols = o.cols;
  const int64_t k = std::max<int64_t>(1, static_cast<int64_t>(o.ratio * static_cast<double>(cols) + 0.5));
  const int64_t words = (cols + 63) / 64;
  const double elem = static_cast<double>(torch::elementSize(dtype));
  torch::NoGradGuard no_grad;

  std::printf("columns: time per call, effective GB/s (logical bytes / time), time / sparsecl's time\n");
  std::printf("sparsecl bench kernels: h [%lld, %lld] %s on %s, k = %lld (ratio %g), %d iterations, libtorch %s\n",
              static_cast<long long>(n), static_cast<long long>(cols), c10::toString(dtype), dev.str().c_str(),
              static_cast<long long>(k), o.ratio, o.iters, TORCH_VERSION);
  torch::manual_seed(0);
  auto h = torch::randn({n, cols}, torch::TensorOptions().device(dev)).to(dtype);  // [N, I]
  const double h_bytes = static_cast<double>(n) * cols * elem;

  // ---- top-k indices ----
  torch::Tensor idx;
  const double t_ours = time_ms([&] { idx = topk_abs_indices(h, k); }, o.iters, cuda);
  std::tuple<torch::Tensor, torch::Tensor> ref;
  const double t_torch = time_ms([&] { ref = torch::topk(h.abs(), k); }, o.iters, cuda);
  auto habs = h.abs();
  const double t_torch_pre = time_ms([&] { ref = torch::topk(habs, k); }, o.iters, cuda);
  const double t_torch_unsorted = time_ms([&] { ref = torch::topk(habs, k, 1, true, false); }, o.iters, cuda);
  habs = torch::Tensor();
  // same magnitudes selected (the sets may differ only among equal |h| at the threshold)
  auto ours_vals = std::get<0>(torch::sort(h.abs().gather(1, idx.to(torch::kLong)).to(torch::kFloat), 1));
  auto torch_vals = std::get<0>(torch::sort(std::get<0>(ref).to(torch::kFloat), 1));
  const bool topk_ok = torch::equal(ours_vals, torch_vals);
  // The staged path (CUDA only): the same call with TopkPath::kStaged, as an extra row after the existing
  // ones; its last column is its time / the default path's time (< 1: staged is faster).
  std::vector<Row> idx_rows = {{"sparsecl topk_abs_indices", t_ours},
                               {"torch::topk(h.abs(), k)", t_torch},
                               {"torch::topk(|h| precomputed, k)", t_torch_pre},
                               {"torch::topk(|h| precomputed, k, sorted=false)", t_torch_unsorted}};
  double t_staged = 0.0;
  std::string staged_check;
#ifdef SPARSECL_WITH_CUDA
  // Times staged() (the staged top-k path, CUDA only) as an extra row of `rows`; returns its time and
  // sets `check` to whether its output equals `want`, the default path's.
  auto add_staged_row = [&](const std::function<torch::Tensor()>& staged, const torch::Tensor& want,
                            std::vector<Row>& rows, std::string& check) {
    torch::Tensor got;
    const double t = time_ms([&] { got = staged(); }, o.iters, cuda);
    rows.push_back({"sparsecl, staged path (candidate default)", t});
    check = torch::equal(got, want) ? "staged path equals the default path" : "staged path MISMATCH";
    return t;
  };
  constexpr auto kStaged = kernels::detail::TopkPath::kStaged;
  if (cuda) t_staged = add_staged_row([&] { return topk_abs_indices_cuda(h, k, kStaged); }, idx, idx_rows, staged_check);
#endif
  print_block("top-k of |h| -> int32 indices [N, k]", h_bytes + 4.0 * n * k, idx_rows,
              topk_ok ? "selected magnitudes equal torch::topk's" : "MISMATCH against torch::topk");
  if (!staged_check.empty()) std::printf("  check: %s\n", staged_check.c_str());

  // ---- top-k bitset ----
  torch::Tensor bits;
  const double t_bits = time_ms([&] { bits = topk_abs_bitset(h, k); }, o.iters, cuda);
  const bool bits_ok = torch::equal(bits, indices_to_bitset(idx, cols));
  std::vector<Row> bits_rows = {{"sparsecl topk_abs_bitset", t_bits}};
  staged_check.clear();
#ifdef SPARSECL_WITH_CUDA
  if (cuda) add_staged_row([&] { return topk_abs_bitset_cuda(h, k, kStaged); }, bits, bits_rows, staged_check);
#endif
  print_block("top-k of |h| -> int64 bitset [N, ceil(I/64)]", h_bytes + 8.0 * n * words, bits_rows,
              bits_ok ? "bitset equals the index lists" : "MISMATCH");
  if (!staged_check.empty()) std::printf("  check: %s\n", staged_check.c_str());

  // ---- per-neuron statistics (one batch) ----
  {
    auto sum_abs = torch::zeros({cols}, torch::TensorOptions().device(dev).dtype(torch::kDouble));
    auto count = torch::zeros({cols}, torch::TensorOptions().device(dev).dtype(torch::kLong));
    const double t_stats = time_ms([&] { accumulate_neuron_stats(h, k, sum_abs, count); }, o.iters, cuda);
    auto sum_plain = torch::zeros_like(sum_abs);
    auto count_plain = torch::zeros_like(count);
    const double t_plain = time_ms(
        [&] {
          sum_plain += h.abs().sum(0, false, torch::kDouble);
          count_plain += torch::bincount(std::get<1>(torch::topk(h.abs(), k)).flatten(), {}, cols);
        },
        o.iters, cuda);
    // torch::topk breaks ties at the threshold its own way: compare the counts' totals (N * k each)
    const bool ok = torch::allclose(sum_abs, sum_plain, 1e-6, 1e-6) &&
                    count.sum().item<int64_t>() == count_plain.sum().item<int64_t>();
    const int64_t differ = (count != count_plain).sum().item<int64_t>();
    print_block("per-neuron stats: sum |h| [I] f64 + top-k counts [I] i64", h_bytes,
                {{"sparsecl accumulate_neuron_stats", t_stats}, {"h.abs().sum(0) + bincount(topk)", t_plain}},
                ok ? "sums agree, count totals agree; " + std::to_string(differ) +
                         " neurons' counts differ through torch::topk's tie choices"
                   : std::string("MISMATCH"));
  }

  // ---- pair IoU: rows 2p and 2p+1 ----
  {
    const int64_t pairs = n / 2;
    auto ba = bits.slice(0, 0, 2 * pairs, 2), bb = bits.slice(0, 1, 2 * pairs, 2);  // [P, W]
    auto fopt = torch::TensorOptions().device(dev).dtype(torch::kFloat);
    auto mask = torch::zeros({n, cols}, fopt).scatter_(1, idx.to(torch::kLong), 1.0);  // [N, I] 0/1
    auto ma = mask.slice(0, 0, 2 * pairs, 2).contiguous(), mb = mask.slice(0, 1, 2 * pairs, 2).contiguous();
    mask = torch::Tensor();
    torch::Tensor iou, iou_plain;
    const double t_iou = time_ms([&] { iou = pair_iou(ba, bb); }, o.iters, cuda);
    const double t_iou_plain = time_ms(
        [&] {
          auto inter = (ma * mb).sum(1);
          iou_plain = inter / (ma.sum(1) + mb.sum(1) - inter);
        },
        o.iters, cuda);
    const bool ok = torch::allclose(iou, iou_plain, 1e-6, 1e-7);
    print_block("pair IoU of top-k sets, P = " + std::to_string(pairs) + " pairs -> f32 [P]",
                16.0 * pairs * words + 4.0 * pairs,
                {{"sparsecl pair_iou (bitsets, popcount)", t_iou}, {"0/1 float masks: (a*b).sum / union", t_iou_plain}},
                ok ? "IoU equal" : "MISMATCH");

    // ---- all-pairs intersection counts ----
    const int64_t m = std::min<int64_t>(4096, pairs);
    auto bx = ba.slice(0, 0, m), by = bb.slice(0, 0, m);  // [M, W]
    auto mx = ma.slice(0, 0, m), my = mb.slice(0, 0, m);  // [M, I]
    auto mx16 = mx.to(torch::kBFloat16), my16 = my.to(torch::kBFloat16);
    torch::Tensor cnt, cnt_plain, cnt_bf16;
    const double t_cnt = time_ms([&] { cnt = intersection_counts(bx, by); }, o.iters, cuda);
    const double t_mm = time_ms([&] { cnt_plain = torch::mm(mx, my.t()); }, o.iters, cuda);
    const double t_mm16 = time_ms([&] { cnt_bf16 = torch::mm(mx16, my16.t()); }, o.iters, cuda);
    const bool ok2 = torch::equal(cnt.to(torch::kFloat), cnt_plain);
    print_block("intersection counts, all pairs " + std::to_string(m) + " x " + std::to_string(m) + " -> i32",
                16.0 * m * words + 4.0 * m * m,
                {{"sparsecl intersection_counts (popcount)", t_cnt},
                 {"float32 matmul of 0/1 masks", t_mm},
                 {"bfloat16 matmul of 0/1 masks (exact <= 256)", t_mm16}},
                ok2 ? "counts equal the float32 matmul" : "MISMATCH");
  }
  std::printf("top-k speed-up over torch::topk(h.abs(), k): %.1fx (target on the H200: >= 10x)\n", t_torch / t_ours);
  if (t_staged > 0.0)
    std::printf("top-k speed-up over torch::topk(h.abs(), k), staged (candidate default): %.1fx (target on the "
                "H200: >= 10x)\n",
                t_torch / t_staged);
}

// The command line as the process received it (/proc/self/cmdline), for the JSON's provenance.
std::string command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string arg, out;
  while (std::getline(in, arg, '\0')) out += (out.empty() ? "" : " ") + arg;
  return out;
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) if (!item.empty()) out.push_back(item);
  return out;
}

struct BenchModelArgs {
  bench::ModelBenchOptions options;
  std::string workloads;
  std::string json_out;
  bool check = false;
};

void run_bench_model(BenchModelArgs a) {
  if (a.options.model_config.empty()) throw Error("bench model: --model-config is required");
  if (!a.workloads.empty()) a.options.workloads = split_commas(a.workloads);
  const std::string command = command_line();
  nlohmann::json doc;
  if (a.check) {
    const auto config = model::ModelConfig::load(a.options.model_config);
    const at::Device device = model::parse_device(a.options.device);
    std::printf("sparsecl bench model --check: %s, %s on %s (%s) against float32 on the CPU\n",
                a.options.model_config.string().c_str(), a.options.dtype.c_str(), device.str().c_str(),
                bench::device_name(device).c_str());
    doc = bench::check_against_cpu(config, device, model::parse_dtype(a.options.dtype), a.options.seed);
    for (const auto& c : doc["checks"])
      std::printf("  %-42s max|d| %.3e  max|ref| %.3e  rel %.3e  (tol %.0e)  %s\n", c["name"].get<std::string>().c_str(),
                  c["max_abs_err"].get<double>(), c["max_abs_ref"].get<double>(), c["rel_err"].get<double>(),
                  c["tolerance"].get<double>(), c["passed"].get<bool>() ? "ok" : "FAIL");
    doc["command"] = command;
    doc["device_name"] = bench::device_name(device);
    doc["versions"] = io::software_versions();
  } else {
    doc = bench::run_model_bench(a.options, command);
  }
  if (!a.json_out.empty()) write_file_atomic(a.json_out, doc.dump(2) + "\n");
  if (a.check && !doc["passed"].get<bool>()) throw Error("bench model --check: the device disagrees with the CPU reference (FAIL above)");
  if (a.check) std::printf("check passed\n");
}

}  // namespace

void add_bench(CLI::App& root) {
  auto* bench = root.add_subcommand("bench", "Benchmarks: sparsecl's kernels, and model workloads on a random decoder");
  bench->require_subcommand(1);
  auto* kern = bench->add_subcommand(
      "kernels", "Time the top-k / statistics / IoU kernels against torch::topk and plain tensor ops");
  auto o = std::make_shared<BenchKernelsOptions>();
  auto* rows = kern->add_option("--rows", o->rows, "Tokens N (default 16384 on cuda, 1024 on cpu)");
  kern->add_option("--cols", o->cols, "Intermediate size I")->capture_default_str();
  kern->add_option("--ratio", o->ratio, "k = ratio * I per token")->capture_default_str();
  kern->add_option("--dtype", o->dtype, "bfloat16 | float32 | float16")->capture_default_str();
  kern->add_option("--device", o->device, "cuda | cpu")->capture_default_str();
  auto* iters = kern->add_option("--iters", o->iters, "Timed iterations per op (default 20 on cuda, 2 on cpu)");
  kern->callback([o, rows, iters] {
    BenchKernelsOptions opts = *o;
    if (opts.device == "cpu") {  // the CPU reference path: smaller defaults
      if (rows->count() == 0) opts.rows = 1024;
      if (iters->count() == 0) opts.iters = 2;
    }
    run_bench_kernels(opts);
  });

  auto* model_cmd = bench->add_subcommand(
      "model", "LoRA training step, probe forward and greedy generation on a random decoder of a config.json's "
               "shape: tokens/s, TFLOP/s, peak memory (docs/bench.md); --check compares the device with the CPU");
  auto m = std::make_shared<BenchModelArgs>();
  auto& mo = m->options;
  model_cmd->add_option("--model-config", mo.model_config, "HF config.json of the shape (configs/models/*.json)")
      ->required()
      ->check(CLI::ExistingFile);
  model_cmd->add_option("--device", mo.device, "cuda | cuda:N | cpu")->capture_default_str();
  auto* dtype = model_cmd->add_option("--dtype", mo.dtype, "bfloat16 | float16 | float32 (default bfloat16 on cuda, float32 on cpu)")
                    ->check(CLI::IsMember({"bfloat16", "float16", "float32"}));
  model_cmd->add_option("--batch", mo.batch, "sequences per step (lora-step*, probe-forward)")->capture_default_str();
  model_cmd->add_option("--seq", mo.seq, "tokens per sequence")->capture_default_str();
  model_cmd->add_option("--workload", m->workloads,
                    "comma-separated: lora-step, lora-step-ckpt, probe-forward, generate (default: all, in that order)");
  model_cmd->add_option("--gen-batch", mo.gen_batch, "generate: prompts per batch")->capture_default_str();
  model_cmd->add_option("--prompt-len", mo.prompt_len, "generate: tokens per prompt")->capture_default_str();
  model_cmd->add_option("--new-tokens", mo.new_tokens, "generate: new tokens per prompt")->capture_default_str();
  model_cmd->add_option("--warmup", mo.warmup, "untimed steps / batches first")->capture_default_str();
  model_cmd->add_option("--iters", mo.iters, "timed optimizer steps (lora-step*) and batches (probe-forward)")->capture_default_str();
  model_cmd->add_option("--gen-iters", mo.gen_iters, "timed greedy_generate calls")->capture_default_str();
  model_cmd->add_option("--lora-r", mo.lora_r, "LoRA rank (all 7 projections)")->capture_default_str();
  model_cmd->add_option("--lora-alpha", mo.lora_alpha, "LoRA alpha")->capture_default_str();
  model_cmd->add_option("--device-map", mo.device_map,
                        "layers over several devices: auto or cuda:0,cuda:1,... (overrides --device; memory summed)");
  model_cmd->add_option("--checkpoint-layers", mo.checkpoint_layers,
                        "lora-step-ckpt: recompute only the first N decoder layers (-1: all)")
      ->capture_default_str();
  model_cmd->add_option("--top-ratio", mo.top_ratio, "probe-forward: k = ratio * intermediate_size")->capture_default_str();
  model_cmd->add_option("--seed", mo.seed, "weights, token ids and adapter init")->capture_default_str();
  model_cmd->add_option("--json", m->json_out, "write the results (or the check) as JSON here");
  model_cmd->add_flag("--check", m->check,
                  "only the device-vs-CPU check: the model in --dtype on --device against the same weights in "
                  "float32 on the CPU (logits, KV-cache decode, probe statistics, LoRA loss and gradients); "
                  "exit 1 on a failure");
  model_cmd->callback([m, dtype] {
    BenchModelArgs a = *m;
    if (dtype->count() == 0) a.options.dtype = a.options.device == "cpu" ? "float32" : "bfloat16";
    run_bench_model(a);
  });
}

}  // namespace sparsecl::cli
