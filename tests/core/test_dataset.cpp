// The one data path (include/sparsecl/data/dataset.h): the three record forms, the chat loss mask,
// truncation, seeded selection, batching, and errors that name the file and line. Small JSONL files are
// written to a temp dir and tokenized with the fixture tokenizers (tests/data/tokenizers); the bundled
// data/code/train.jsonl is read with SmolLM2's tokenizer when models/ has it.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>

#include "sparsecl/common/error.h"
#include "sparsecl/data/dataset.h"
#include "sparsecl/text/tokenizer.h"

#include "test_support.h"

namespace fs = std::filesystem;
using namespace sparsecl;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA);
const fs::path kRepo = kData.parent_path().parent_path();

using testing_support::TempDir;

fs::path write_lines(const fs::path& file, const std::vector<std::string>& lines) {
  std::ofstream out(file);
  for (const auto& l : lines) out << l << "\n";
  return file;
}

// qwen2_bpe (ChatML specials) with SmolLM2's chat template (a ChatML template injecting a system turn).
fs::path chat_tokenizer(const TempDir& tmp) {
  const fs::path dir = tmp.path / "tok";
  fs::create_directories(dir);
  fs::copy_file(kData / "tokenizers" / "qwen2_bpe" / "tokenizer.json", dir / "tokenizer.json");
  fs::copy_file(kData / "tokenizers" / "chat" / "smollm2.json", dir / "tokenizer_config.json");
  return dir;
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    FAIL() << "expected sparsecl::Error";
  } catch (const Error& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what() << " lacks " << n;
  }
}

data::LoadOptions in_order(int64_t max_length = 0) {
  data::LoadOptions o;
  o.shuffle = false;
  o.max_length = max_length;
  return o;
}

}  // namespace

TEST(Dataset, IdsRecordsUsedExactly) {
  TempDir tmp("ids");
  const fs::path f = write_lines(tmp.path / "a.jsonl", {R"({"ids": [5, 6, 7], "id": "x"})", "", R"({"ids": [1]})"});
  const auto ex = data::load_jsonl(f, nullptr, in_order());
  ASSERT_EQ(ex.size(), 2u);
  EXPECT_EQ(ex[0].ids, (std::vector<int64_t>{5, 6, 7}));
  EXPECT_EQ(ex[0].loss_mask, (std::vector<uint8_t>{1, 1, 1}));
  EXPECT_EQ(ex[0].line, 1);
  EXPECT_EQ(ex[1].line, 3);  // blank lines are skipped but still counted
  EXPECT_EQ(ex[1].kind, data::RecordKind::Ids);
}

TEST(Dataset, TruncationKeepsTheBeginning) {
  TempDir tmp("trunc");
  const fs::path f = write_lines(tmp.path / "a.jsonl", {R"({"ids": [1,2,3,4,5,6]})", R"({"ids": [9,8]})"});
  const auto ex = data::load_jsonl(f, nullptr, in_order(4));
  EXPECT_EQ(ex[0].ids, (std::vector<int64_t>{1, 2, 3, 4}));
  EXPECT_TRUE(ex[0].truncated);
  EXPECT_FALSE(ex[1].truncated);
  const auto s = data::summarize(ex);
  EXPECT_EQ(s.tokens, 6);
  EXPECT_EQ(s.truncated, 1);
}

TEST(Dataset, SeededSelectionIsDeterministic) {
  // The permutation is pinned: mt19937_64's output is specified by the standard, and the index draws
  // use rejection sampling, so these values hold on every platform.
  const auto p = data::seeded_permutation(10, 0);
  std::vector<int64_t> sorted = p;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> iota(10);
  std::iota(iota.begin(), iota.end(), 0);
  EXPECT_EQ(sorted, iota);
  EXPECT_EQ(p, data::seeded_permutation(10, 0));
  EXPECT_NE(p, data::seeded_permutation(10, 1));
  EXPECT_EQ(p, (std::vector<int64_t>{7, 2, 0, 8, 3, 9, 6, 1, 5, 4}));

  TempDir tmp("seed");
  std::vector<std::string> lines;
  for (int i = 0; i < 20; ++i) lines.push_back("{\"ids\": [" + std::to_string(i + 1) + "]}");
  const fs::path f = write_lines(tmp.path / "a.jsonl", lines);
  data::LoadOptions o;
  o.seed = 7;
  o.max_samples = 5;
  const auto a = data::load_jsonl(f, nullptr, o), b = data::load_jsonl(f, nullptr, o);
  ASSERT_EQ(a.size(), 5u);
  const auto perm = data::seeded_permutation(20, 7);
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(a[i].ids, b[i].ids);
    EXPECT_EQ(a[i].ids[0], perm[i] + 1);  // the first max_samples records of the seeded order
  }
}

TEST(Dataset, TextRecordsUseTheTokenizersSpecials) {
  TempDir tmp("text");
  auto tok = text::Tokenizer::load(kData / "tokenizers" / "llama3_bpe");  // adds BOS
  const fs::path f = write_lines(tmp.path / "a.jsonl", {R"({"text": "Hello world, this is text."})"});
  const auto ex = data::load_jsonl(f, tok.get(), in_order());
  EXPECT_EQ(ex[0].ids, tok->encode("Hello world, this is text.", true));
  ASSERT_TRUE(tok->bos_id().has_value());
  EXPECT_EQ(ex[0].ids.front(), *tok->bos_id());
  EXPECT_EQ(ex[0].loss_mask, std::vector<uint8_t>(ex[0].ids.size(), 1));
}

TEST(Dataset, ChatRecordsMaskThePrompt) {
  TempDir tmp("chat");
  auto tok = text::Tokenizer::load(chat_tokenizer(tmp));
  ASSERT_NE(tok->chat_template(), nullptr);
  const fs::path f =
      write_lines(tmp.path / "a.jsonl", {R"({"prompt": "What is 2+2?", "response": "It is 4.", "source": "t"})"});
  const auto ex = data::load_jsonl(f, tok.get(), in_order());
  const std::string full = tok->chat_template()->render({{"user", "What is 2+2?"}, {"assistant", "It is 4."}}, false);
  const std::string prompt = tok->chat_template()->render({{"user", "What is 2+2?"}}, true);
  EXPECT_EQ(ex[0].ids, tok->encode(full, false));
  const auto prompt_ids = tok->encode(prompt, false);
  std::vector<int64_t> response_ids;
  for (size_t t = 0; t < ex[0].ids.size(); ++t) {
    EXPECT_EQ(ex[0].loss_mask[t], t >= prompt_ids.size() ? 1 : 0) << "token " << t;
    if (ex[0].loss_mask[t]) response_ids.push_back(ex[0].ids[t]);
  }
  EXPECT_EQ(tok->decode(response_ids), "It is 4.<|im_end|>\n");
  EXPECT_NE(full.find("You are a helpful AI assistant named SmolLM"), std::string::npos);  // default system turn

  // Truncated inside the prompt: no loss tokens left.
  const auto cut = data::load_jsonl(f, tok.get(), in_order(5));
  EXPECT_EQ(cut[0].ids.size(), 5u);
  EXPECT_EQ(data::summarize(cut).loss_tokens, 0);
}

// The loss tokens of example `e`, one decoded string per contiguous run.
std::vector<std::string> loss_runs(const text::Tokenizer& tok, const data::Example& e) {
  std::vector<std::string> runs;
  std::vector<int64_t> run;
  for (size_t t = 0; t <= e.ids.size(); ++t) {
    if (t < e.ids.size() && e.loss_mask[t]) {
      run.push_back(e.ids[t]);
    } else if (!run.empty()) {
      runs.push_back(tok.decode(run));
      run.clear();
    }
  }
  return runs;
}

TEST(Dataset, MessagesRecordsLearnEveryAssistantTurn) {
  TempDir tmp("messages");
  auto tok = text::Tokenizer::load(chat_tokenizer(tmp));
  const fs::path f = write_lines(
      tmp.path / "a.jsonl",
      {R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},)"
       R"( {"role": "assistant", "content": "4."}, {"role": "user", "content": "3+3?"},)"
       R"( {"role": "assistant", "content": "6."}]})",
       R"({"prompt": "What is 2+2?", "response": "It is 4."})",
       R"({"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]})"});
  const auto ex = data::load_jsonl(f, tok.get(), in_order());
  ASSERT_EQ(ex.size(), 3u);
  EXPECT_EQ(ex[0].kind, data::RecordKind::Chat);
  const std::vector<text::ChatMessage> conv = {
      {"system", "Be brief."}, {"user", "2+2?"}, {"assistant", "4."}, {"user", "3+3?"}, {"assistant", "6."}};
  EXPECT_EQ(ex[0].ids, tok->encode(tok->chat_template()->render(conv, false), false));
  EXPECT_EQ(loss_runs(*tok, ex[0]), (std::vector<std::string>{"4.<|im_end|>\n", "6.<|im_end|>\n"}));
  // A {"prompt","response"} record is the two-message conversation.
  EXPECT_EQ(ex[1].ids, ex[2].ids);
  EXPECT_EQ(ex[1].loss_mask, ex[2].loss_mask);
}

// Qwen3's template renders an earlier answer without its <think> block once a later turn follows, so the
// turns are found by their content; the end-of-turn token stays a loss target.
TEST(Dataset, MessagesWithATemplateThatRewritesEarlierTurns) {
  TempDir tmp("qwen3msg");
  const fs::path dir = tmp.path / "tok";
  fs::create_directories(dir);
  fs::copy_file(kData / "tokenizers" / "qwen2_bpe" / "tokenizer.json", dir / "tokenizer.json");
  fs::copy_file(kData / "tokenizers" / "chat" / "qwen3.json", dir / "tokenizer_config.json");
  auto tok = text::Tokenizer::load(dir);
  const fs::path f = write_lines(
      tmp.path / "a.jsonl",
      {R"({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>r1</think>a1"},)"
       R"( {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]})"});
  const auto ex = data::load_jsonl(f, tok.get(), in_order());
  const auto runs = loss_runs(*tok, ex[0]);
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0], "a1<|im_end|>");
  EXPECT_NE(runs[1].find("a2<|im_end|>"), std::string::npos) << runs[1];
}

TEST(Dataset, ChatWithoutTemplate) {
  TempDir tmp("notmpl");
  auto tok = text::Tokenizer::load(kData / "tokenizers" / "llama2_sp");  // no template, no ChatML specials
  ASSERT_EQ(tok->chat_template(), nullptr);
  const fs::path f = write_lines(tmp.path / "a.jsonl", {R"({"prompt": "Q", "response": "A"})"});
  expect_error([&] { data::load_jsonl(f, tok.get(), in_order()); }, {f.string() + ":1", "chat template"});
  auto o = in_order();
  o.plain_chat_fallback = true;
  const auto ex = data::load_jsonl(f, tok.get(), o);
  std::vector<int64_t> resp;
  for (size_t t = 0; t < ex[0].ids.size(); ++t)
    if (ex[0].loss_mask[t]) resp.push_back(ex[0].ids[t]);
  EXPECT_EQ(tok->decode(resp), "A");
  EXPECT_EQ(ex[0].ids.front(), tok->bos_id().value());
  EXPECT_EQ(ex[0].ids.size(), tok->encode("Q\n\n", true).size() + tok->encode("A", false).size());
}

TEST(Dataset, BadRecordsNameFileAndLine) {
  TempDir tmp("bad");
  auto tok = text::Tokenizer::load(kData / "tokenizers" / "qwen2_bpe");
  const std::string ok = R"({"ids": [1, 2]})";
  struct Case {
    std::string line;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {R"({"prompt": "only a prompt"})", "no \"response\""},
      {R"({"response": "only a response"})", "no \"prompt\""},
      {R"({"text": 5})", "\"text\" must be a string"},
      {R"({"prompt": "p", "response": ["x"]})", "\"response\" must be a string"},
      {R"({"ids": [1, "2"]})", "\"ids\"[1]"},
      {R"({"ids": [1, -2]})", "non-negative"},
      {R"({"ids": []})", "empty"},
      {R"({"ids": 3})", "list of integers"},
      {R"({"question": "q", "choices": ["a"], "answer": 0})", "none of"},
      {R"({"text": "a", "ids": [1]})", "mixes"},
      {R"([1, 2])", "JSON object"},
      {R"({"text": "unterminated)", "not valid JSON"},
      {R"({"messages": []})", "non-empty list"},
      {R"({"messages": [{"role": "user"}]})", "\"messages\"[0]"},
      {R"({"messages": [{"role": "user", "content": "only a question"}]})", "no assistant message"},
      {R"({"messages": [{"role": "assistant", "content": "a"}], "text": "t"})", "mixes"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const fs::path f = write_lines(tmp.path / ("bad" + std::to_string(i) + ".jsonl"), {ok, ok, cases[i].line});
    expect_error([&] { data::load_jsonl(f, tok.get(), in_order()); }, {f.string() + ":3", cases[i].needle});
  }
  // Even when the bad record is not among the selected ones.
  const fs::path f = write_lines(tmp.path / "late.jsonl", {ok, ok, R"({"text": 1})"});
  auto o = in_order();
  o.max_samples = 1;
  expect_error([&] { data::load_jsonl(f, tok.get(), o); }, {f.string() + ":3"});
  // A text record with no tokenizer.
  const fs::path g = write_lines(tmp.path / "text.jsonl", {R"({"text": "hi"})"});
  expect_error([&] { data::load_jsonl(g, nullptr, in_order()); }, {g.string() + ":1", "tokenizer"});
  expect_error([&] { data::load_jsonl(tmp.path / "missing.jsonl", nullptr, in_order()); }, {"missing.jsonl", "cannot open"});
}

TEST(Dataset, BatchesAreRightPadded) {
  std::vector<data::Example> ex(2);
  ex[0].ids = {10, 11, 12, 13};
  ex[0].loss_mask = {0, 0, 1, 1};
  ex[1].ids = {20, 21};
  ex[1].loss_mask = {1, 1};
  const auto b = data::make_batch(ex, 0, 2, /*pad_id=*/99);
  EXPECT_EQ(b.input_ids.sizes(), (at::IntArrayRef{2, 4}));
  EXPECT_TRUE(at::equal(b.input_ids, at::tensor({10, 11, 12, 13, 20, 21, 99, 99}, at::kLong).view({2, 4})));
  EXPECT_TRUE(at::equal(b.attention_mask, at::tensor({1, 1, 1, 1, 1, 1, 0, 0}, at::kLong).view({2, 4})));
  EXPECT_TRUE(at::equal(b.labels, at::tensor({-100, -100, 12, 13, 20, 21, -100, -100}, at::kLong).view({2, 4})));
  EXPECT_EQ(b.num_tokens, 6);
  EXPECT_EQ(b.num_label_tokens, 3);  // position 0 is never a target of the shifted loss
  EXPECT_EQ(b.lengths, (std::vector<int64_t>{4, 2}));
  EXPECT_THROW(data::make_batch(ex, 1, 1, 0), Error);
}

TEST(Dataset, BundledCodeDataWithSmolLM2Tokenizer) {
  const fs::path model = kRepo / "models" / "smollm2-135m-instruct";
  const fs::path file = kRepo / "data" / "code" / "train.jsonl";
  if (!fs::exists(model / "tokenizer.json") || !fs::exists(file))
    GTEST_SKIP() << "needs " << model << " and " << file << " (scripts/setup.sh fetches the model)";
  auto tok = text::Tokenizer::load(model);
  ASSERT_NE(tok->chat_template(), nullptr);
  data::LoadOptions o;
  o.max_samples = 24;
  o.max_length = 256;
  o.seed = 3;
  const auto ex = data::load_jsonl(file, tok.get(), o);
  ASSERT_EQ(ex.size(), 24u);
  int with_loss = 0;
  for (const auto& e : ex) {
    EXPECT_LE(e.ids.size(), 256u);
    EXPECT_EQ(e.kind, data::RecordKind::Chat);
    // The loss mask is one contiguous tail: prompt tokens, then response tokens.
    auto first = std::find(e.loss_mask.begin(), e.loss_mask.end(), 1);
    EXPECT_TRUE(std::all_of(first, e.loss_mask.end(), [](uint8_t m) { return m == 1; }));
    if (first != e.loss_mask.end()) {
      ++with_loss;
      // The prompt part ends with the assistant header.
      std::vector<int64_t> prompt(e.ids.begin(), e.ids.begin() + (first - e.loss_mask.begin()));
      const std::string text = tok->decode(prompt);
      EXPECT_TRUE(text.ends_with("<|im_start|>assistant\n")) << text.substr(text.size() > 60 ? text.size() - 60 : 0);
    }
  }
  EXPECT_GT(with_loss, 12);
  const auto b = data::make_batch(ex, 0, 8, data::pad_id_for(tok.get()));
  EXPECT_EQ(b.input_ids.size(0), 8);
  EXPECT_EQ(b.attention_mask.sum().item<int64_t>(), b.num_tokens);
}
