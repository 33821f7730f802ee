// Tokenizer unit tests: every case of tests/data/tokenizers/*/expected.json (made with HF tokenizers /
// transformers / sentencepiece) must give identical ids with and without special tokens and an
// identical decode; added-token flags (lstrip, rstrip, single_word, normalized) against ids recorded from
// HF tokenizers 0.23; lossy UTF-8 repair; and every bad input throws sparsecl::Error naming the file.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <unistd.h>

#include "sparsecl/common/error.h"
#include "sparsecl/text/tokenizer.h"
#include "sparsecl/text/unicode.h"

namespace fs = std::filesystem;
using nlohmann::json;
using sparsecl::Error;
using sparsecl::text::Tokenizer;

namespace {

const fs::path kData = fs::path(SPARSECL_TEST_DATA) / "tokenizers";

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

// A fresh temporary directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() / ("sparsecl_text_" + std::string(info->test_suite_name()) + "_" + info->name() +
                                         "_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// Runs `fn`, expecting sparsecl::Error whose message contains every string of `needles`.
template <class Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& needles) {
  try {
    fn();
    FAIL() << "expected sparsecl::Error";
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "message '" << msg << "' lacks '" << n << "'";
  }
}

json qwen2_json() { return read_json(kData / "qwen2_bpe" / "tokenizer.json"); }

}  // namespace

// ---- HF fixtures --------------------------------------------------------------------------------------
class FixtureParity : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureParity, IdsAndDecodeMatchHuggingFace) {
  const fs::path dir = kData / GetParam();
  auto tok = Tokenizer::load(dir);
  const json expected = read_json(dir / "expected.json");
  ASSERT_GT(expected["cases"].size(), 10u);
  for (const auto& c : expected["cases"]) {
    const std::string text = c["text"];
    SCOPED_TRACE("text: " + json(text).dump());
    auto ids = tok->encode(text, true);
    EXPECT_EQ(ids, c["ids"].get<std::vector<int64_t>>());
    EXPECT_EQ(tok->encode(text, false), c["ids_no_special"].get<std::vector<int64_t>>());
    EXPECT_EQ(tok->decode(c["ids"].get<std::vector<int64_t>>(), false), c["decoded"].get<std::string>());
  }
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, FixtureParity,
                         ::testing::Values("llama3_bpe", "qwen2_bpe", "llama2_sp", "gpt2_bpe"));

TEST(Fixtures, EveryExpectedJsonIsCovered) {
  const std::set<std::string> covered = {"llama3_bpe", "qwen2_bpe", "llama2_sp", "gpt2_bpe"};
  for (const auto& e : fs::directory_iterator(kData)) {
    if (fs::exists(e.path() / "expected.json") && e.path().filename() != "chat") {
      EXPECT_TRUE(covered.count(e.path().filename().string())) << e.path() << " is not in FixtureParity";
    }
  }
}

// ---- special tokens, vocabulary, loading forms ----------------------------------------------------------
TEST(Tokenizer, SpecialTokenIds) {
  auto llama3 = Tokenizer::load(kData / "llama3_bpe");
  EXPECT_EQ(llama3->bos_id(), 0);  // from the TemplateProcessing post-processor (no tokenizer_config.json)
  EXPECT_FALSE(llama3->eos_id());
  EXPECT_EQ(llama3->token_to_id("<|eot_id|>"), 4);
  EXPECT_EQ(llama3->id_to_token(4), "<|eot_id|>");
  EXPECT_TRUE(llama3->is_special(0));
  EXPECT_FALSE(llama3->is_special(100));
  EXPECT_FALSE(llama3->token_to_id("definitely-not-a-token"));
  EXPECT_EQ(llama3->vocab_size(), 3000);

  auto sp = Tokenizer::load(kData / "llama2_sp");
  EXPECT_EQ(sp->bos_id(), 1);
  EXPECT_EQ(sp->eos_id(), 2);
  EXPECT_EQ(sp->token_to_id("<s>"), 1);
  EXPECT_TRUE(sp->is_special(1));
  EXPECT_NE(sp->kind().find("SentencePiece"), std::string::npos);

  auto gpt2 = Tokenizer::load(kData / "gpt2_bpe");
  EXPECT_EQ(gpt2->bos_id(), gpt2->token_to_id("<|endoftext|>"));
  EXPECT_EQ(gpt2->eos_id(), gpt2->bos_id());
  EXPECT_FALSE(gpt2->chat_template() == nullptr);  // vocabulary has <|im_start|> / <|im_end|>
}

TEST(Tokenizer, LoadsFromTheFileItself) {
  auto by_dir = Tokenizer::load(kData / "qwen2_bpe");
  auto by_file = Tokenizer::load(kData / "qwen2_bpe" / "tokenizer.json");
  auto sp = Tokenizer::load(kData / "llama2_sp" / "tokenizer.model");
  auto gpt2 = Tokenizer::load(kData / "gpt2_bpe" / "vocab.json");
  const std::string text = "Hello world, naïve café 123";
  EXPECT_EQ(by_dir->encode(text), by_file->encode(text));
  EXPECT_EQ(sp->encode(text), Tokenizer::load(kData / "llama2_sp")->encode(text));
  EXPECT_EQ(gpt2->encode(text), Tokenizer::load(kData / "gpt2_bpe")->encode(text));
}

TEST(Tokenizer, DecodeSkipsSpecialTokensOnRequest) {
  auto tok = Tokenizer::load(kData / "llama3_bpe");
  auto ids = tok->encode("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", true);
  EXPECT_EQ(tok->decode(ids, false), "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>");
  EXPECT_EQ(tok->decode(ids, true), "user\n\nhi");
  // Ids outside the vocabulary are skipped, as HF does.
  EXPECT_EQ(tok->decode({-1, 999999, ids[1]}, false), "<|start_header_id|>");
}

TEST(Tokenizer, DecodeOfCutCharacterGivesReplacementCharacter) {
  auto tok = Tokenizer::load(kData / "qwen2_bpe");
  auto ids = tok->encode("日", false);
  ASSERT_GT(ids.size(), 1u);  // not a single token in this small vocabulary
  std::vector<int64_t> first(ids.begin(), ids.end() - 1);
  EXPECT_EQ(tok->decode(first), "\xEF\xBF\xBD");
  EXPECT_EQ(tok->decode(ids), "日");
}

TEST(Tokenizer, AddedTokenFlagsMatchHuggingFace) {
  // qwen2_bpe plus added tokens with each flag; expected ids recorded from HF tokenizers 0.23.3.
  TempDir tmp;
  json j = qwen2_json();
  auto add = [&](int id, const char* content, bool sw, bool ls, bool rs, bool norm, bool special) {
    j["added_tokens"].push_back({{"id", id}, {"content", content}, {"single_word", sw}, {"lstrip", ls},
                                 {"rstrip", rs}, {"normalized", norm}, {"special", special}});
  };
  add(2500, "<mask>", false, true, false, false, true);
  add(2501, "[R]", false, false, true, false, true);
  add(2502, "word", true, false, false, false, false);
  add(2503, "caf\xC3\xA9", false, false, false, true, false);
  add(2504, "<mask>x", false, false, false, false, false);
  write_file(tmp.path() / "tokenizer.json", j.dump());
  auto tok = Tokenizer::load(tmp.path());
  struct Case {
    std::string text;
    std::vector<int64_t> ids;
    std::string decoded;
  };
  const std::vector<Case> cases = {
      {"a  <mask> b", {67, 2500, 341}, "a<mask> b"},
      {"hi <mask>x y", {2378, 223, 2504, 859}, "hi <mask>x y"},
      {"x[R]   y", {90, 2501, 91}, "x[R]y"},
      {"[R]\n\nz", {2501, 92}, "[R]z"},
      {"a word here", {67, 223, 2502, 674, 967}, "a word here"},
      {"swordfish words word.", {85, 89, 1155, 72, 385, 74, 364, 2308, 223, 2502, 16}, "swordfish words word."},
      {"cafe\xCC\x81 and caf\xC3\xA9", {2503, 457, 223, 2503}, "caf\xEF\xBF\xBD and caf\xEF\xBF\xBD"},
      {"  <mask>", {2500}, "<mask>"},
      {"\xC2\xA0\xE2\x80\x83<mask>[R]\xE3\x80\x80" "end", {2500, 2501, 791}, "<mask>[R]end"},
      {"word", {2502}, "word"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(json(c.text).dump());
    EXPECT_EQ(tok->encode(c.text, false), c.ids);
    EXPECT_EQ(tok->decode(c.ids, false), c.decoded);
  }
}

TEST(Tokenizer, DigitsAndStringSplitPreTokenizers) {
  // SmolLM-style Digits(individual) + ByteLevel(use_regex), and Split with a String pattern after NFD;
  // expected ids recorded from HF tokenizers 0.23.3 on these variants of qwen2_bpe.
  TempDir tmp;
  json bl = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  json digits = qwen2_json();
  digits["normalizer"] = nullptr;
  digits["pre_tokenizer"] = {{"type", "Sequence"},
                             {"pretokenizers", json::array({{{"type", "Digits"}, {"individual_digits", true}}, bl})}};
  fs::create_directories(tmp.path() / "digits");
  write_file(tmp.path() / "digits" / "tokenizer.json", digits.dump());
  auto d = Tokenizer::load(tmp.path() / "digits");
  EXPECT_EQ(d->encode("Year 2024: 3.14 and \xD9\xA1\xD9\xA2\xD9\xA3"),
            (std::vector<int64_t>{59, 71, 301, 223, 20, 18, 20, 22, 28, 223, 21, 16, 19, 22, 457, 223, 152, 97, 152, 98,
                                  152, 99}));

  json split = qwen2_json();
  bl["use_regex"] = false;
  split["normalizer"] = {{"type", "NFD"}};
  split["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers", json::array({{{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Isolated"},
                                      {"invert", false}},
                                     bl})}};
  fs::create_directories(tmp.path() / "split");
  write_file(tmp.path() / "split" / "tokenizer.json", split.dump());
  auto sp = Tokenizer::load(tmp.path() / "split");
  EXPECT_EQ(sp->encode("a  b  caf\xC3\xA9"), (std::vector<int64_t>{67, 223, 223, 68, 223, 223, 69, 2088, 71, 139, 226}));
}

TEST(Tokenizer, LongAndRepetitiveInputs) {
  auto tok = Tokenizer::load(kData / "llama3_bpe");
  std::string text;
  for (int i = 0; i < 2000; ++i) text += "The quick brown fox jumps over the lazy dog " + std::to_string(i) + ".\n";
  auto ids = tok->encode(text, false);
  EXPECT_EQ(tok->decode(ids), text);
  std::string spaces(5000, ' ');
  EXPECT_EQ(tok->decode(tok->encode(spaces, false)), spaces);
  std::string xs(20000, 'x');
  EXPECT_EQ(tok->decode(tok->encode(xs, false)), xs);
}

// ---- chat template discovery from tokenizer_config.json ------------------------------------------------
TEST(Tokenizer, ReadsTokenizerConfig) {
  TempDir tmp;
  fs::copy_file(kData / "qwen2_bpe" / "tokenizer.json", tmp.path() / "tokenizer.json");
  fs::copy_file(kData / "chat" / "smollm2.json", tmp.path() / "tokenizer_config.json");
  auto tok = Tokenizer::load(tmp.path());
  EXPECT_EQ(tok->bos_id(), 1);  // "<|im_start|>"
  EXPECT_EQ(tok->eos_id(), 2);  // "<|im_end|>"
  ASSERT_NE(tok->chat_template(), nullptr);
  // SmolLM2's template injects its default system prompt.
  EXPECT_EQ(tok->chat_template()->render({{"user", "Hi"}}, false),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n");
  // add_bos_token: true adds BOS even though the post-processor does not.
  json cfg = read_json(tmp.path() / "tokenizer_config.json");
  cfg["add_bos_token"] = true;
  write_file(tmp.path() / "tokenizer_config.json", cfg.dump());
  auto with_bos = Tokenizer::load(tmp.path());
  EXPECT_EQ(with_bos->encode("hi", true).front(), 1);
  EXPECT_EQ(with_bos->encode("hi", false), tok->encode("hi", false));
}

// ---- unicode helpers ----------------------------------------------------------------------------------
TEST(Unicode, LossyRepairMatchesRust) {
  using sparsecl::text::unicode::repair_utf8;
  EXPECT_EQ(repair_utf8("Hello \xF0\x90\x80World"), "Hello \xEF\xBF\xBDWorld");  // one U+FFFD per cut sequence
  EXPECT_EQ(repair_utf8("\xC3\x28"), "\xEF\xBF\xBD(");
  EXPECT_EQ(repair_utf8("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: 3 replacements
  EXPECT_EQ(repair_utf8("\xE6\x97"), "\xEF\xBF\xBD");
  EXPECT_EQ(repair_utf8("\xFF\xFEok"), "\xEF\xBF\xBD\xEF\xBF\xBDok");
  EXPECT_EQ(repair_utf8("caf\xC3\xA9"), "caf\xC3\xA9");
}

TEST(Unicode, PythonStrip) {
  using sparsecl::text::unicode::python_strip;
  EXPECT_EQ(python_strip("  a b \n\t"), "a b");
  EXPECT_EQ(python_strip("\xC2\xA0\xE3\x80\x80x\xE2\x80\x83"), "x");  // NBSP, ideographic space, em space
  EXPECT_EQ(python_strip(" \n "), "");
  EXPECT_EQ(python_strip("\xE2\x80\x8Bzw"), "\xE2\x80\x8Bzw");  // zero-width space is not whitespace
}

// ---- bad inputs -----------------------------------------------------------------------------------------
TEST(TokenizerErrors, MissingPath) {
  expect_error([] { Tokenizer::load("/nonexistent/sparsecl/tokenizer"); },
               {"/nonexistent/sparsecl/tokenizer", "does not exist"});
}

TEST(TokenizerErrors, DirectoryWithoutTokenizerFiles) {
  TempDir tmp;
  expect_error([&] { Tokenizer::load(tmp.path()); }, {tmp.path().string(), "no tokenizer.json"});
}

TEST(TokenizerErrors, MalformedTokenizerJson) {
  TempDir tmp;
  write_file(tmp.path() / "tokenizer.json", "{\"model\": {\"vocab\": {\"a\": 0,, }");
  const std::string file = (tmp.path() / "tokenizer.json").string();
  expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "malformed JSON"});
}

TEST(TokenizerErrors, UnknownPreTokenizerType) {
  TempDir tmp;
  json j = qwen2_json();
  j["pre_tokenizer"]["pretokenizers"][0]["type"] = "BertPreTokenizer";
  write_file(tmp.path() / "tokenizer.json", j.dump());
  expect_error([&] { Tokenizer::load(tmp.path()); },
               {(tmp.path() / "tokenizer.json").string(), "pre_tokenizer", "BertPreTokenizer"});
}

TEST(TokenizerErrors, UnsupportedComponents) {
  TempDir tmp;
  const std::string file = (tmp.path() / "tokenizer.json").string();
  {
    json j = qwen2_json();
    j["normalizer"] = {{"type", "Lowercase"}};
    write_file(file, j.dump());
    expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "normalizer", "Lowercase"});
  }
  {
    json j = qwen2_json();
    j["model"]["type"] = "WordPiece";
    write_file(file, j.dump());
    expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "WordPiece"});
  }
  {
    json j = qwen2_json();
    j["decoder"] = {{"type", "WordPiece"}};
    write_file(file, j.dump());
    expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "decoder", "WordPiece"});
  }
  {
    json j = qwen2_json();
    j["decoder"] = {{"type", "Metaspace"}};  // no replacement
    write_file(file, j.dump());
    expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "Metaspace decoder", "replacement"});
  }
  {
    json j = qwen2_json();
    j["post_processor"] = {{"type", "RobertaProcessing"}};
    write_file(file, j.dump());
    expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "post_processor", "RobertaProcessing"});
  }
  {
    json j = qwen2_json();
    j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedSideways";
    write_file(file, j.dump());
    expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "MergedSideways"});
  }
}

TEST(TokenizerErrors, MissingVocabAndBadMerges) {
  TempDir tmp;
  const std::string file = (tmp.path() / "tokenizer.json").string();
  {
    json j = qwen2_json();
    j["model"].erase("vocab");
    write_file(file, j.dump());
    expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "model.vocab"});
  }
  {
    json j = qwen2_json();
    j["model"]["merges"].push_back(json::array({"zzz_not_in_vocab", "a"}));
    write_file(file, j.dump());
    expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "zzz_not_in_vocab"});
  }
  {
    json j = qwen2_json();
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
    write_file(file, j.dump());
    expect_error([&] { Tokenizer::load(tmp.path()); }, {file, "(unclosed"});
  }
}

TEST(TokenizerErrors, UnsupportedTokenizerJsonFallsBackToSentencePieceModel) {
  TempDir tmp;
  json j = qwen2_json();
  j["normalizer"] = {{"type", "Precompiled"}};
  write_file(tmp.path() / "tokenizer.json", j.dump());
  fs::copy_file(kData / "llama2_sp" / "tokenizer.model", tmp.path() / "tokenizer.model");
  auto tok = Tokenizer::load(tmp.path());
  EXPECT_NE(tok->kind().find("SentencePiece"), std::string::npos);
}

TEST(TokenizerErrors, CorruptSentencePieceModel) {
  TempDir tmp;
  write_file(tmp.path() / "tokenizer.model", "this is not a protobuf");
  expect_error([&] { Tokenizer::load(tmp.path()); }, {(tmp.path() / "tokenizer.model").string()});
}

TEST(TokenizerErrors, MalformedTokenizerConfig) {
  TempDir tmp;
  fs::copy_file(kData / "qwen2_bpe" / "tokenizer.json", tmp.path() / "tokenizer.json");
  write_file(tmp.path() / "tokenizer_config.json", "{\"bos_token\": ");
  expect_error([&] { Tokenizer::load(tmp.path()); }, {(tmp.path() / "tokenizer_config.json").string(), "malformed"});
  write_file(tmp.path() / "tokenizer_config.json", "{\"eos_token\": \"<|no_such_token|>\"}");
  expect_error([&] { Tokenizer::load(tmp.path()); },
               {(tmp.path() / "tokenizer_config.json").string(), "eos_token", "<|no_such_token|>"});
}

TEST(TokenizerErrors, MissingMergesFile) {
  TempDir tmp;
  fs::copy_file(kData / "gpt2_bpe" / "vocab.json", tmp.path() / "vocab.json");
  expect_error([&] { Tokenizer::load(tmp.path() / "vocab.json"); }, {(tmp.path() / "merges.txt").string()});
}

TEST(TokenizerErrors, InvalidUtf8Input) {
  auto tok = Tokenizer::load(kData / "llama3_bpe");
  expect_error([&] { tok->encode("bad \xC3\x28 byte"); }, {"tokenizer.json", "not valid UTF-8"});
}
