// Chat prompts rendered from a checkpoint's own Jinja chat template, exactly as HF
// `apply_chat_template(..., tokenize=False)` renders them: the template is parsed and run by minja
// (src/text/minja, a C++ Jinja2 engine written for chat templates) with HF's environment — trim_blocks,
// lstrip_blocks, `messages`, `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`,
// `unk_token`, `pad_token`), `raise_exception` and `strftime_now`. Any template works (Llama-2/3/3.1/3.2,
// Mistral [INST], ChatML for Qwen/SmolLM, Zephyr, Phi-3, ...), with no per-family code. The rendered
// string is meant to be encoded with add_special_tokens=false. Tokenizers without a template but with the
// ChatML or Llama-3 turn tokens get that family's standard template (ChatTemplate::chatml / ::llama3).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace minja {
class TemplateNode;
}

namespace sparsecl::text {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant", "tool", ... (whatever the template renders)
  std::string content;
};

// The special-token strings a template sees (HF passes the tokenizer's special_tokens_map).
struct ChatSpecialTokens {
  std::optional<std::string> bos, eos, unk, pad;
};

class ChatTemplate {
 public:
  // Parses `source`; throws sparsecl::Error naming `where` and the parse error.
  ChatTemplate(std::string source, ChatSpecialTokens tokens, std::string where);
  ~ChatTemplate();
  ChatTemplate(const ChatTemplate&) = delete;
  ChatTemplate& operator=(const ChatTemplate&) = delete;

  // The template of a tokenizer_config.json ("chat_template": a string, or a list of {name, template}:
  // the "default" one, with its special tokens) or of a chat_template.jinja file. Throws sparsecl::Error
  // naming the file when it has no template or the template does not parse.
  static std::unique_ptr<ChatTemplate> from_file(const std::filesystem::path& path);
  // The standard templates of the two families whose turn tokens we recognise in a vocabulary.
  static std::unique_ptr<ChatTemplate> chatml();                     // <|im_start|>role\n...<|im_end|>\n
  static std::unique_ptr<ChatTemplate> llama3(std::string bos_text);  // Meta-Llama-3-Instruct's template

  // The prompt string for `messages`; add_generation_prompt appends the assistant header. Throws
  // sparsecl::Error for an empty conversation or when the template raises (an unsupported role, roles
  // that do not alternate, ...), with the template's message.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;

  // Text the template emits right after an assistant message's content, leading whitespace removed
  // ("<|im_end|>\n", "<|eot_id|>", "</s> ", "<|end|>\n"): its first token ends a turn, a stop token for
  // generation (Tokenizer::end_of_turn_id). Empty when the template emits nothing there or cannot render
  // a user/assistant exchange.
  const std::string& turn_suffix() const { return turn_suffix_; }
  const std::string& source() const { return source_; }
  const std::string& where() const { return where_; }

 private:
  std::string source_, where_;
  ChatSpecialTokens tokens_;
  std::shared_ptr<minja::TemplateNode> root_;
  std::string turn_suffix_;
};

}  // namespace sparsecl::text
