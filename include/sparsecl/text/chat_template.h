// Chat prompt rendering without a Jinja engine. The checkpoints we run use two families of templates:
//   Llama-3  "<|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>..."
//            (and Llama-3.1/3.2, which always open with a system turn carrying the knowledge/today dates)
//   ChatML   "<|im_start|>role\ncontent<|im_end|>\n..." (Qwen2/2.5/3, SmolLM/SmolLM2)
// The variant details (default system prompt injected by SmolLM2 / Qwen2.5, Qwen3's <think> block on the
// final assistant turn, Qwen's tool-response wrapping, Llama-3's trimming and BOS, whether the generation
// prompt is conditional) are read from the template text in tokenizer_config.json. render() produces
// exactly the string HF `apply_chat_template(..., tokenize=False)` produces for those templates; the
// result is meant to be encoded with add_special_tokens=false.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace sparsecl::text {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant" (ChatML Qwen templates: also "tool")
  std::string content;
};

enum class ChatFormat { Llama3, ChatML };

class ChatTemplate {
 public:
  struct Options {
    ChatFormat format = ChatFormat::ChatML;
    std::string bos_text;                       // Llama-3: prepended to the first message ("<|begin_of_text|>")
    std::optional<std::string> default_system;  // injected when the first message is not a system message
    bool trim_content = false;                  // Llama-3: content | trim
    bool generation_prompt_always = false;      // the original Llama-3 template ignores add_generation_prompt
    bool qwen_tools = false;                    // "tool" messages wrapped in <tool_response> user turns
    bool qwen3_thinking = false;                // Qwen3: <think> handling of assistant turns after the last query
    // Llama-3.1/3.2: a system turn always comes first, "Cutting Knowledge Date: ...\nToday Date: <date>\n\n"
    // followed by the (trimmed) system message; empty `knowledge_line` means the plain Llama-3 form.
    std::string knowledge_line;                 // e.g. "Cutting Knowledge Date: December 2023\n"
    std::string date_string;                    // fixed date ("26 Jul 2024") ...
    bool date_from_clock = false;               // ... or today's, strftime("%d %b %Y") (Llama-3.2's strftime_now)
  };

  explicit ChatTemplate(Options options);

  // Recognises a Jinja chat template by its markers. Returns nullptr when the template is neither a
  // Llama-3 nor a ChatML template (or uses features we do not reproduce); `why` then says why.
  static std::unique_ptr<ChatTemplate> from_jinja(std::string_view jinja, std::string_view bos_token,
                                                  std::string* why = nullptr);
  // Reads `chat_template` (string, or list of {name, template}: the "default" one), `bos_token` from a
  // tokenizer_config.json (or a chat_template.jinja file). Throws sparsecl::Error naming the file when it
  // has no chat template or an unsupported one.
  static std::unique_ptr<ChatTemplate> from_file(const std::filesystem::path& path);

  // The prompt string for `messages`; add_generation_prompt appends the assistant header. Throws
  // sparsecl::Error for an empty conversation or a role the template does not render.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;

  ChatFormat format() const { return opt_.format; }
  const Options& options() const { return opt_; }
  const std::optional<std::string>& default_system_prompt() const { return opt_.default_system; }
  // Token text that ends every turn ("<|eot_id|>" / "<|im_end|>"): a stop token for generation.
  std::string end_of_turn() const;
  // Text of the assistant header that render(..., true) appends (what generation continues from).
  std::string generation_prompt() const;

 private:
  Options opt_;
};

}  // namespace sparsecl::text
