// Scorers (include/sparsecl/eval/scoring.h) against obviously-right recomputations on the fixture
// models (tests/data/models): continuation log-likelihoods vs one unbatched Decoder::forward per request,
// held-out loss vs causal_lm_loss per example; GSM8K number extraction and code-program assembly as
// unit tests (the programs run in the sandbox); the bundled data files parse; and a tiny end-to-end on
// models/smollm2-135m-instruct when present (GTEST_SKIP otherwise).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "sparsecl/common/error.h"
#include "sparsecl/eval/scoring.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/text/tokenizer.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using namespace sparsecl::eval;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA);
const fs::path kRepo = kData.parent_path().parent_path();
const fs::path kSmol = kRepo / "models" / "smollm2-135m-instruct";

std::vector<int64_t> random_ids(std::mt19937_64& rng, int64_t n, int64_t vocab) {
  std::vector<int64_t> v;
  for (int64_t i = 0; i < n; ++i) v.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab)));
  return v;
}

// Sum of log p(continuation | prefix) from one unbatched forward over exactly `seq` (no padding).
double direct_loglik(const model::Decoder& d, const std::vector<int64_t>& seq, size_t n_cont) {
  at::NoGradGuard no_grad;
  const auto ids = at::tensor(seq, at::kLong).unsqueeze(0);                      // [1, L]
  const auto logp = at::log_softmax(d.forward({ids}).logits.to(at::kDouble), -1)[0];  // [L, V]
  double s = 0;
  for (size_t k = seq.size() - n_cont; k < seq.size(); ++k) s += logp[static_cast<int64_t>(k) - 1][seq[k]].item<double>();
  return s;
}

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("sparsecl_eval_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() { [[maybe_unused]] int rc = std::system(("rm -rf '" + path.string() + "'").c_str()); }
};

class FixtureModel : public testing::TestWithParam<std::string> {};

}  // namespace

TEST_P(FixtureModel, ContinuationLoglikMatchesDirectForward) {
  auto d = model::Decoder::load(kData / "models" / GetParam(), at::kFloat, at::kCPU);
  const int64_t V = d.config().vocab_size;
  std::mt19937_64 rng(7);
  std::vector<LoglikRequest> reqs;
  for (int i = 0; i < 7; ++i)  // lengths differ, so batches are padded; 7 rows in batches of 3
    reqs.push_back({random_ids(rng, 2 + (i * 5) % 11, V), random_ids(rng, 1 + (i * 3) % 5, V)});
  EvalOptions o;
  o.batch_size = 3;
  const auto got = continuation_logliks(d, reqs, o);
  ASSERT_EQ(got.size(), reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::vector<int64_t> seq = reqs[i].context;
    seq.insert(seq.end(), reqs[i].continuation.begin(), reqs[i].continuation.end());
    const double want = direct_loglik(d, seq, reqs[i].continuation.size());
    EXPECT_NEAR(got[i], want, 2e-4 * std::max(1.0, std::abs(want))) << "request " << i;
  }
  // Left truncation to max_length keeps the last max_length + 1 tokens.
  o.max_length = 6;
  const auto cut = continuation_logliks(d, {reqs[6]}, o);
  std::vector<int64_t> seq = reqs[6].context;
  seq.insert(seq.end(), reqs[6].continuation.begin(), reqs[6].continuation.end());
  seq.erase(seq.begin(), seq.end() - 7);
  EXPECT_NEAR(cut[0], direct_loglik(d, seq, reqs[6].continuation.size()), 2e-4 * std::max(1.0, std::abs(cut[0])));
}

TEST_P(FixtureModel, HeldoutLossIsTheTokenWeightedMeanOfCausalLmLoss) {
  auto d = model::Decoder::load(kData / "models" / GetParam(), at::kFloat, at::kCPU);
  const int64_t V = d.config().vocab_size;
  std::mt19937_64 rng(11);
  TempDir tmp;
  const fs::path file = tmp.path / "heldout.jsonl";
  std::vector<std::vector<int64_t>> rows;
  {
    std::ofstream out(file);
    for (int i = 0; i < 5; ++i) {
      rows.push_back(random_ids(rng, 3 + 4 * i, V));
      out << "{\"ids\": [";
      for (size_t k = 0; k < rows.back().size(); ++k) out << (k ? "," : "") << rows.back()[k];
      out << "]}\n";
    }
  }
  EvalOptions o;
  o.batch_size = 2;
  const auto r = heldout_loss(d, nullptr, file, o);
  double nll = 0;
  int64_t n = 0;
  at::NoGradGuard no_grad;
  for (const auto& row : rows) {
    const auto ids = at::tensor(row, at::kLong).unsqueeze(0);  // [1, L]
    const double l = model::causal_lm_loss(d.forward({ids}).logits, ids).item<double>();
    nll += l * static_cast<double>(row.size() - 1);
    n += static_cast<int64_t>(row.size()) - 1;
  }
  EXPECT_EQ(r.examples, 5);
  EXPECT_EQ(r.loss_tokens, n);
  EXPECT_NEAR(r.loss, nll / static_cast<double>(n), 1e-5);
  EXPECT_NEAR(r.perplexity, std::exp(nll / static_cast<double>(n)), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Models, FixtureModel, testing::Values("llama3", "qwen2"));

TEST(EvalNumbers, ExtractFinalNumber) {
  EXPECT_EQ(extract_final_number("so 3 + 4 = 7 and then 12 apples"), "12");
  EXPECT_EQ(extract_final_number("Total: 1,234,567 dollars."), "1234567");
  EXPECT_EQ(extract_final_number("She has 5 left.\n#### 18\nextra 99"), "18");  // "####" preferred
  EXPECT_EQ(extract_final_number("#### 1,000."), "1000");
  EXPECT_EQ(extract_final_number("It costs $12.50 in total."), "12.50");
  EXPECT_EQ(extract_final_number("The temperature fell to -3."), "-3");
  EXPECT_EQ(extract_final_number("The answer is 42."), "42");
  EXPECT_EQ(extract_final_number("no digits here"), std::nullopt);
  EXPECT_EQ(extract_final_number(""), std::nullopt);
}

TEST(EvalNumbers, Utf8Length) {
  EXPECT_EQ(utf8_length("abc"), 3);
  EXPECT_EQ(utf8_length("caf\xc3\xa9"), 4);          // é: 2 bytes, 1 character
  EXPECT_EQ(utf8_length("\xe2\x89\xa4 5"), 3);        // ≤ 5
  EXPECT_EQ(utf8_length(""), 0);
}

TEST(EvalNumbers, MatchAndStops) {
  EXPECT_TRUE(numbers_match("18", "18"));
  EXPECT_TRUE(numbers_match("18.0", "18"));
  EXPECT_TRUE(numbers_match("1,000", "1000"));
  EXPECT_TRUE(numbers_match("$5", "5"));
  EXPECT_FALSE(numbers_match("17", "18"));
  EXPECT_FALSE(numbers_match("", "18"));
  EXPECT_FALSE(numbers_match("18a", "18"));
  EXPECT_EQ(cut_at_stop("a 5\n\nQuestion: b 6", {"\n\nQuestion:"}), "a 5");
  EXPECT_EQ(cut_at_stop("no stop", {"X", ""}), "no stop");
}

TEST(EvalCode, ProgramsPassAndFailInTheSandbox) {
  CodeRecord he{"def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "def check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n", "add",
                "completion"};
  SandboxOptions so;
  so.timeout_s = 5;
  const auto good = build_program(he, "    return a + b\n\ndef unrelated():\n    pass\n");
  EXPECT_EQ(good.find("unrelated"), std::string::npos) << good;  // cut at "\ndef "
  EXPECT_TRUE(run_python_sandboxed(good, so).passed) << good;
  EXPECT_FALSE(run_python_sandboxed(build_program(he, "    return a - b\n"), so).passed);
  // A chat model's fenced full function redefines the stub.
  const auto fenced = build_program(he, "Sure:\n```python\ndef add(a, b):\n    return b + a\n```\nDone.");
  EXPECT_TRUE(run_python_sandboxed(fenced, so).passed) << fenced;
  CodeRecord mbpp{"Write a function to square a number.", "assert sq(3) == 9\n", "sq", "instruction"};
  EXPECT_TRUE(run_python_sandboxed(build_program(mbpp, "```python\ndef sq(x):\n    return x * x\n```"), so).passed);
  EXPECT_FALSE(run_python_sandboxed(build_program(mbpp, "def sq(x):\n    return x + x\n"), so).passed);
}

TEST(EvalData, BundledFilesParse) {
  const auto arc = load_mc(kRepo / "data" / "chat" / "arc_challenge.jsonl", 10);
  ASSERT_EQ(arc.size(), 10u);
  for (const auto& r : arc) {
    EXPECT_GE(r.choices.size(), 3u);
    EXPECT_LT(r.answer, static_cast<int64_t>(r.choices.size()));
  }
  const auto gsm = load_gen(kRepo / "data" / "math" / "gsm8k_test.jsonl");
  EXPECT_EQ(gsm.size(), 200u);
  for (const auto& r : gsm) EXPECT_EQ(extract_final_number(r.answer), r.answer);
  const auto he = load_code(kRepo / "data" / "code" / "humaneval.jsonl");
  EXPECT_EQ(he.size(), 164u);
  const auto mbpp = load_code(kRepo / "data" / "code" / "mbpp_test.jsonl", 5);
  ASSERT_EQ(mbpp.size(), 5u);
  EXPECT_EQ(mbpp[0].prompt_style, "instruction");
  EXPECT_EQ(he[0].prompt_style, "completion");
  EXPECT_THROW(load_mc(kRepo / "data" / "math" / "gsm8k_test.jsonl", 1), Error);
}

TEST(EvalData, McAnswerAsIndexTextOrLetter) {
  const fs::path file = fs::temp_directory_path() / "sparsecl_mc_answers.jsonl";
  {
    std::ofstream out(file);
    out << R"({"question": "q", "choices": ["red", "green", "blue"], "answer": 2})" << "\n"
        << R"({"question": "q", "choices": ["red", "green", "blue"], "answer": "green"})" << "\n"
        << R"({"question": "q", "choices": ["red", "green", "blue"], "answer": "A"})" << "\n"
        << R"({"question": "q", "choices": ["A", "B", "C"], "answer": "B"})" << "\n";
  }
  const auto mc = load_mc(file, 0);
  ASSERT_EQ(mc.size(), 4u);
  EXPECT_EQ(mc[0].answer, 2);
  EXPECT_EQ(mc[1].answer, 1);
  EXPECT_EQ(mc[2].answer, 0);
  EXPECT_EQ(mc[3].answer, 1);
  for (const char* bad : {R"({"question": "q", "choices": ["x", "y"], "answer": "D"})",
                          R"({"question": "q", "choices": ["x", "y"], "answer": "z"})",
                          R"({"question": "q", "choices": ["x", "x"], "answer": "x"})",
                          R"({"question": "q", "choices": ["x", "y"], "answer": 1.5})"}) {
    std::ofstream(file) << bad << "\n";
    EXPECT_THROW(load_mc(file, 0), Error) << bad;
  }
  fs::remove(file);
}

TEST(EvalSmol, EndToEnd) {
  if (!fs::exists(kSmol / "model.safetensors")) GTEST_SKIP() << "models/smollm2-135m-instruct not present";
  auto d = model::Decoder::load(kSmol, at::kFloat, at::kCPU);
  auto tok = text::Tokenizer::load(kSmol);
  auto t0 = std::chrono::steady_clock::now();
  const auto lap = [&t0](const char* what) {
    const auto t = std::chrono::steady_clock::now();
    std::printf("  %s: %.2f s\n", what, std::chrono::duration<double>(t - t0).count());
    t0 = t;
  };
  EvalOptions o;
  o.batch_size = 4;

  // Multiple choice: the batched scores equal per-choice direct forwards of the same token split.
  const auto arc = load_mc(kRepo / "data" / "chat" / "arc_challenge.jsonl", 2);
  const auto mc = score_mc(d, *tok, arc, o);
  ASSERT_EQ(mc.items.size(), 2u);
  for (size_t i = 0; i < arc.size(); ++i)
    for (size_t c = 0; c < arc[i].choices.size(); ++c) {
      const auto req = mc_request(*tok, mc_context(arc[i]), mc_continuation(arc[i].choices[c]));
      // The split is lm-eval's: context tokens are a prefix of the whole string's tokens.
      auto seq = tok->encode(mc_context(arc[i]) + mc_continuation(arc[i].choices[c]), true);
      ASSERT_EQ(seq.size(), req.context.size() + req.continuation.size());
      EXPECT_NEAR(mc.items[i].loglik[c], direct_loglik(d, seq, req.continuation.size()), 1e-3);
      EXPECT_EQ(mc.items[i].norm_length[c], utf8_length(arc[i].choices[c]));
    }
  // acc / acc_norm recomputed from the per-choice scores.
  double acc = 0, acc_norm = 0;
  for (const auto& it : mc.items) {
    size_t best = 0, best_norm = 0;
    for (size_t c = 1; c < it.loglik.size(); ++c) {
      if (it.loglik[c] > it.loglik[best]) best = c;
      if (it.loglik[c] / it.norm_length[c] > it.loglik[best_norm] / it.norm_length[best_norm]) best_norm = c;
    }
    acc += static_cast<int64_t>(best) == it.answer;
    acc_norm += static_cast<int64_t>(best_norm) == it.answer;
  }
  EXPECT_DOUBLE_EQ(mc.acc, acc / 2);
  EXPECT_DOUBLE_EQ(mc.acc_norm, acc_norm / 2);
  lap("mc (2 records + direct recomputation)");

  // GSM8K: two greedy generations through the chat template; the result is self-consistent.
  const auto gsm = load_gen(kRepo / "data" / "math" / "gsm8k_test.jsonl", 2);
  GenOptions g;
  g.max_new_tokens = 16;
  const auto gr = score_gsm8k(d, *tok, gsm, o, g);
  ASSERT_EQ(gr.items.size(), 2u);
  double em = 0;
  for (const auto& it : gr.items) {
    EXPECT_FALSE(it.completion.empty());
    EXPECT_EQ(it.predicted, extract_final_number(it.completion).value_or(""));
    em += it.correct;
  }
  EXPECT_DOUBLE_EQ(gr.exact_match, em / 2);
  lap("gsm8k (2 x 16 tokens)");

  // Code without opt-in: the held-out loss, and the method says so.
  CodeOptions co;
  co.heldout_file = kRepo / "data" / "code" / "heldout.jsonl";
  EvalOptions small = o;
  small.max_samples = 2;
  small.max_length = 256;
  const auto fallback = score_code(d, *tok, {}, small, co);
  ASSERT_TRUE(fallback.loss.has_value());
  EXPECT_NE(fallback.method.find("not enabled"), std::string::npos);
  EXPECT_GT(fallback.score, 0.0);
  EXPECT_LT(fallback.score, 10.0);
  lap("code fallback (2 held-out records)");

  // Code with opt-in: one HumanEval task generated and run in the sandbox.
  co.execute = true;
  co.max_new_tokens = 16;
  co.sandbox.timeout_s = 5;
  const auto he = load_code(kRepo / "data" / "code" / "humaneval.jsonl", 1);
  const auto cr = score_code(d, *tok, he, o, co);
  ASSERT_EQ(cr.items.size(), 1u);
  EXPECT_EQ(cr.method, "pass@1 (sandboxed, greedy)");
  EXPECT_FALSE(cr.items[0].sandbox.empty());
  EXPECT_NE(cr.items[0].program.find(he[0].tests), std::string::npos);
  lap("code pass@1 (1 x 16 tokens + sandbox)");
  std::printf("smollm2: acc %.3f acc_norm %.3f, gsm8k em %.2f, code fallback loss %.3f, code item: %s\n", mc.acc,
              mc.acc_norm, gr.exact_match, fallback.score, cr.items[0].sandbox.c_str());
}
