// Chat template tests: every render recorded from HF apply_chat_template in
// tests/data/tokenizers/chat/expected.json (Llama-3, Llama-3-Instruct, Llama-3.1, Qwen2.5-style, Qwen3,
// SmolLM2)
// must be reproduced exactly; template recognition (default system prompts, variants) and errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "sparsecl/common/error.h"
#include "sparsecl/text/chat_template.h"
#include "sparsecl/text/tokenizer.h"

namespace fs = std::filesystem;
using nlohmann::json;
using sparsecl::text::ChatFormat;
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
  EXPECT_EQ(templates.size(), 6u);
  EXPECT_GE(n, 120u);
}

TEST(ChatTemplate, RecognisesVariants) {
  auto smol = ChatTemplate::from_file(kChat / "smollm2.json");
  EXPECT_EQ(smol->format(), ChatFormat::ChatML);
  EXPECT_EQ(smol->default_system_prompt(), "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  EXPECT_EQ(smol->end_of_turn(), "<|im_end|>");

  auto qwen25 = ChatTemplate::from_file(kChat / "qwen25.json");
  EXPECT_EQ(qwen25->default_system_prompt(), "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
  EXPECT_TRUE(qwen25->options().qwen_tools);
  EXPECT_FALSE(qwen25->options().qwen3_thinking);

  auto qwen3 = ChatTemplate::from_file(kChat / "qwen3.json");
  EXPECT_FALSE(qwen3->default_system_prompt());
  EXPECT_TRUE(qwen3->options().qwen3_thinking);

  auto llama3 = ChatTemplate::from_file(kChat / "llama3.json");
  EXPECT_EQ(llama3->format(), ChatFormat::Llama3);
  EXPECT_EQ(llama3->options().bos_text, "<|begin_of_text|>");
  EXPECT_TRUE(llama3->options().generation_prompt_always);
  EXPECT_EQ(llama3->end_of_turn(), "<|eot_id|>");
  EXPECT_FALSE(ChatTemplate::from_file(kChat / "llama3_instruct.json")->options().generation_prompt_always);

  auto llama31 = ChatTemplate::from_file(kChat / "llama31.json");
  EXPECT_EQ(llama31->options().knowledge_line, "Cutting Knowledge Date: December 2023\n");
  EXPECT_EQ(llama31->options().date_string, "26 Jul 2024");
  EXPECT_FALSE(llama31->options().date_from_clock);
  EXPECT_THROW(llama31->render({{"user", "q"}, {"tool", "{}"}}, true), sparsecl::Error);
  auto llama32 = ChatTemplate::from_file(kChat / "llama32.json");
  EXPECT_TRUE(llama32->options().date_from_clock);
  const std::string r32 = llama32->render({{"user", "hi"}}, true);
  EXPECT_EQ(r32.rfind("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                      "December 2023\nToday Date: ", 0), 0u) << r32;

  const std::vector<ChatMessage> conv = {{"user", "Hi"}};
  EXPECT_EQ(llama3->render(conv, true),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(smol->render(conv, true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, UnsupportedTemplates) {
  std::string why;
  EXPECT_EQ(ChatTemplate::from_jinja("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
                                     "<s>", &why),
            nullptr);
  EXPECT_NE(why.find("neither"), std::string::npos);
  // A Llama-3.1-like template whose date line is not a string literal we can read.
  EXPECT_EQ(ChatTemplate::from_jinja("{{- bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
                                     "Date: December 2023<|eot_id|>",
                                     "<|begin_of_text|>", &why),
            nullptr);
  EXPECT_NE(why.find("3.1"), std::string::npos);

  const fs::path tmp = fs::temp_directory_path() / "sparsecl_text_mistral_template.json";
  {
    std::ofstream out(tmp);
    out << R"({"chat_template": "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"})";
  }
  try {
    ChatTemplate::from_file(tmp);
    FAIL() << "expected sparsecl::Error";
  } catch (const sparsecl::Error& e) {
    EXPECT_NE(std::string(e.what()).find(tmp.string()), std::string::npos) << e.what();
  }
  fs::remove(tmp);
  EXPECT_THROW(ChatTemplate::from_file(kChat / "no_such_template.json"), sparsecl::Error);
}

TEST(ChatTemplate, Errors) {
  auto qwen3 = ChatTemplate::from_file(kChat / "qwen3.json");
  EXPECT_THROW(qwen3->render({}, true), sparsecl::Error);
  EXPECT_THROW(qwen3->render({{"developer", "x"}}, true), sparsecl::Error);
}

TEST(ChatTemplate, TokenizerDetectsTemplateFromVocabulary) {
  const fs::path data = fs::path(SPARSECL_TEST_DATA) / "tokenizers";
  auto llama3 = sparsecl::text::Tokenizer::load(data / "llama3_bpe");
  ASSERT_NE(llama3->chat_template(), nullptr);
  EXPECT_EQ(llama3->chat_template()->format(), ChatFormat::Llama3);
  EXPECT_EQ(llama3->chat_template()->options().bos_text, "<|begin_of_text|>");
  auto qwen2 = sparsecl::text::Tokenizer::load(data / "qwen2_bpe");
  ASSERT_NE(qwen2->chat_template(), nullptr);
  EXPECT_EQ(qwen2->chat_template()->format(), ChatFormat::ChatML);
  EXPECT_EQ(sparsecl::text::Tokenizer::load(data / "llama2_sp")->chat_template(), nullptr);
  // The rendered prompt encodes to one id per special token.
  const auto text = llama3->chat_template()->render({{"user", "hi"}}, true);
  const auto ids = llama3->encode(text, false);
  EXPECT_EQ(ids.front(), 0);
  EXPECT_EQ(llama3->decode(ids), text);
}
