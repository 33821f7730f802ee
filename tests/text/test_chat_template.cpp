// Chat template tests: every render recorded from HF apply_chat_template in
// tests/data/tokenizers/chat/expected.json (Llama-3, Llama-3-Instruct, Llama-3.1, Qwen2.5-style, Qwen3,
// SmolLM2, Mistral-Instruct, Llama-2-chat, Zephyr, Phi-3) must be reproduced exactly; stop tokens,
// the built-in templates, strftime_now, and errors (raise_exception, parse errors, missing templates).
#include <gtest/gtest.h>

#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "sparsecl/common/error.h"
#include "sparsecl/text/chat_template.h"
#include "sparsecl/text/tokenizer.h"

namespace fs = std::filesystem;
using nlohmann::json;
using sparsecl::text::ChatMessage;
using sparsecl::text::ChatTemplate;

namespace {
const fs::path kChat = fs::path(SPARSECL_TEST_DATA) / "tokenizers" / "chat";
}

TEST(ChatTemplate, MatchesHuggingFaceRenders) {
  std::ifstream in(kChat / "expected.json");
  const json expected = json::parse(in);
  std::map<std::string, std::unique_ptr<ChatTemplate>> templates;
  size_t n = 0;
  for (const auto& c : expected["cases"]) {
    const std::string name = c["template"];
    auto& t = templates[name];
    if (!t) t = ChatTemplate::from_file(kChat / (name + ".json"));
    std::vector<ChatMessage> messages;
    for (const auto& m : c["messages"]) messages.push_back({m["role"], m["content"]});
    SCOPED_TRACE(name + " " + c["messages"].dump() + " gen=" + c["add_generation_prompt"].dump());
    EXPECT_EQ(t->render(messages, c["add_generation_prompt"].get<bool>()), c["text"].get<std::string>());
    ++n;
  }
  EXPECT_EQ(templates.size(), 11u);
  EXPECT_GE(n, 180u);
}

TEST(ChatTemplate, EndOfTurnAndBuiltins) {
  EXPECT_EQ(ChatTemplate::from_file(kChat / "smollm2.json")->turn_suffix(), "<|im_end|>\n");
  // The original Llama-3 template appends the assistant header even without add_generation_prompt.
  EXPECT_EQ(ChatTemplate::from_file(kChat / "llama3.json")->turn_suffix(),
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(ChatTemplate::from_file(kChat / "mistral_instruct.json")->turn_suffix(), "</s> ");
  EXPECT_EQ(ChatTemplate::from_file(kChat / "llama2_chat.json")->turn_suffix(), "</s>");
  EXPECT_EQ(ChatTemplate::from_file(kChat / "phi3.json")->turn_suffix(), "<|end|>\n</s>");

  const std::vector<ChatMessage> conv = {{"user", "Hi"}};
  EXPECT_EQ(ChatTemplate::llama3("<|begin_of_text|>")->render(conv, true),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(ChatTemplate::chatml()->render({{"system", "S"}, {"user", "Hi"}}, true),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, Llama32DateComesFromTheClock) {
  auto llama32 = ChatTemplate::from_file(kChat / "llama32.json");
  char today[64];
  std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  std::strftime(today, sizeof(today), "%d %b %Y", &local);
  const std::string r = llama32->render({{"user", "hi"}}, true);
  EXPECT_EQ(r.rfind("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: " + std::string(today), 0), 0u) << r;
}

TEST(ChatTemplate, Errors) {
  auto qwen3 = ChatTemplate::from_file(kChat / "qwen3.json");
  EXPECT_THROW(qwen3->render({}, true), sparsecl::Error);
  // raise_exception in the template: an error naming the template file and carrying its message.
  auto mistral = ChatTemplate::from_file(kChat / "mistral_instruct.json");
  try {
    mistral->render({{"user", "a"}, {"user", "b"}}, true);
    FAIL() << "expected sparsecl::Error";
  } catch (const sparsecl::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("Conversation roles must alternate"), std::string::npos) << what;
    EXPECT_NE(what.find("mistral_instruct.json"), std::string::npos) << what;
  }
  // A template that does not parse names its file; a config without a template too.
  const fs::path tmp = fs::temp_directory_path() / "sparsecl_text_bad_template.json";
  {
    std::ofstream out(tmp);
    out << R"({"chat_template": "{% for m in messages %}{{ m['content'] }"})";
  }
  try {
    ChatTemplate::from_file(tmp);
    FAIL() << "expected sparsecl::Error";
  } catch (const sparsecl::Error& e) {
    EXPECT_NE(std::string(e.what()).find(tmp.string()), std::string::npos) << e.what();
  }
  {
    std::ofstream out(tmp);
    out << R"({"bos_token": "<s>"})";
  }
  EXPECT_THROW(ChatTemplate::from_file(tmp), sparsecl::Error);
  fs::remove(tmp);
  EXPECT_THROW(ChatTemplate::from_file(kChat / "no_such_template.json"), sparsecl::Error);
}

TEST(ChatTemplate, TokenizerDetectsTemplateFromVocabulary) {
  const fs::path data = fs::path(SPARSECL_TEST_DATA) / "tokenizers";
  auto llama3 = sparsecl::text::Tokenizer::load(data / "llama3_bpe");
  ASSERT_NE(llama3->chat_template(), nullptr);
  EXPECT_EQ(llama3->end_of_turn_id(), llama3->token_to_id("<|eot_id|>"));
  ASSERT_TRUE(llama3->end_of_turn_id());
  auto qwen2 = sparsecl::text::Tokenizer::load(data / "qwen2_bpe");
  ASSERT_NE(qwen2->chat_template(), nullptr);
  EXPECT_EQ(qwen2->end_of_turn_id(), qwen2->token_to_id("<|im_end|>"));
  ASSERT_TRUE(qwen2->end_of_turn_id());
  EXPECT_EQ(sparsecl::text::Tokenizer::load(data / "llama2_sp")->chat_template(), nullptr);
  // The rendered prompt encodes to one id per special token, BOS from the vocabulary.
  const auto text = llama3->chat_template()->render({{"user", "hi"}}, true);
  EXPECT_EQ(text.rfind("<|begin_of_text|><|start_header_id|>user", 0), 0u) << text;
  const auto ids = llama3->encode(text, false);
  EXPECT_EQ(ids.front(), 0);
  EXPECT_EQ(llama3->decode(ids), text);
}
