// ChatTemplate (see chat_template.h): a checkpoint's Jinja chat template run by minja in the environment
// HF transformers gives it (render_jinja_template: ImmutableSandboxedEnvironment with trim_blocks and
// lstrip_blocks, raise_exception, strftime_now, the special tokens as variables).
// tests/python/test_chat_template.py compares renders with HF apply_chat_template.
#include "sparsecl/text/chat_template.h"

#include <chrono>
#include <ctime>
#include <nlohmann/json.hpp>

#include "minja/minja.hpp"
#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/text/backends.h"
#include "sparsecl/text/unicode.h"

namespace sparsecl::text {

namespace {

using ordered_json = nlohmann::ordered_json;

// Meta-Llama-3-8B-Instruct's template, for Llama-3 vocabularies that ship none.
constexpr const char* kLlama3Template =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}";

// The plain ChatML template (as HF's default for <|im_start|> vocabularies used to be).
constexpr const char* kChatMLTemplate =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

// strftime_now(format): the local time now, as HF's (datetime.now().strftime).
minja::Value strftime_now() {
  return minja::Value::callable([](const std::shared_ptr<minja::Context>&, minja::ArgumentsValue& args) {
    args.expectArgs("strftime_now", {1, 1}, {0, 0});
    const std::string format = args.args[0].get<std::string>();
    std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    std::tm local{};
    localtime_r(&now, &local);
    char buf[256];
    size_t n = std::strftime(buf, sizeof(buf), format.c_str(), &local);
    return minja::Value(std::string(buf, n));
  });
}

// The text after `marker` in `rendered`, from its first non-whitespace character on.
std::string text_after(const std::string& rendered, const std::string& marker) {
  size_t p = rendered.find(marker);
  if (p == std::string::npos) return {};
  p += marker.size();
  while (p < rendered.size() && (rendered[p] == ' ' || rendered[p] == '\n' || rendered[p] == '\t' || rendered[p] == '\r')) ++p;
  return rendered.substr(p);
}

}  // namespace

ChatTemplate::ChatTemplate(std::string source, ChatSpecialTokens tokens, std::string where)
    : source_(std::move(source)), where_(std::move(where)), tokens_(std::move(tokens)) {
  minja::Options options{};
  options.trim_blocks = true;
  options.lstrip_blocks = true;
  options.keep_trailing_newline = false;
  try {
    root_ = minja::Parser::parse(source_, options);
  } catch (const std::exception& e) {
    throw Error(where_ + ": chat template does not parse: " + e.what());
  }
  // The stop token: what follows an assistant message. A template may insist on a system message first
  // or refuse this exchange; then there is none.
  const std::string probe = "sparsecl-probe-response";
  for (const auto& conv : {std::vector<ChatMessage>{{"user", "q"}, {"assistant", probe}},
                           std::vector<ChatMessage>{{"system", "s"}, {"user", "q"}, {"assistant", probe}}}) {
    try {
      turn_suffix_ = text_after(render(conv, false), probe);
      break;
    } catch (const Error&) {
    }
  }
}

ChatTemplate::~ChatTemplate() = default;

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  if (messages.empty()) throw Error(where_ + ": cannot render an empty conversation");
  ordered_json msgs = ordered_json::array();
  for (const auto& m : messages) {
    if (!unicode::valid_utf8(m.content)) throw Error(where_ + ": a " + m.role + " message is not valid UTF-8");
    msgs.push_back({{"role", m.role}, {"content", m.content}});
  }
  auto context = minja::Context::make(minja::Value(ordered_json{
      {"messages", msgs},
      {"add_generation_prompt", add_generation_prompt},
  }));
  const std::pair<const char*, const std::optional<std::string>*> specials[] = {
      {"bos_token", &tokens_.bos}, {"eos_token", &tokens_.eos}, {"unk_token", &tokens_.unk}, {"pad_token", &tokens_.pad}};
  for (const auto& [name, value] : specials)
    if (*value) context->set(name, minja::Value(**value));
  context->set("strftime_now", strftime_now());
  try {
    return root_->render(context);
  } catch (const std::exception& e) {
    throw Error(where_ + ": chat template: " + e.what());
  }
}

std::unique_ptr<ChatTemplate> ChatTemplate::from_file(const std::filesystem::path& path) {
  // A .jinja file takes its special tokens from the tokenizer_config.json beside it, if any.
  const bool jinja = path.extension() == ".jinja";
  const std::filesystem::path config_file = jinja ? path.parent_path() / "tokenizer_config.json" : path;
  TokenizerConfig config;
  if (!jinja || std::filesystem::exists(config_file)) config = read_tokenizer_config_file(config_file);
  std::string source;
  if (jinja) source = read_file(path, "chat template file");
  else if (config.chat_template) source = *config.chat_template;
  else throw Error(path.string() + ": no \"chat_template\" (or no \"default\" one in its list)");
  return std::make_unique<ChatTemplate>(
      std::move(source), ChatSpecialTokens{config.bos_token, config.eos_token, config.unk_token, config.pad_token},
      path.string());
}

std::unique_ptr<ChatTemplate> ChatTemplate::chatml() {
  return std::make_unique<ChatTemplate>(kChatMLTemplate, ChatSpecialTokens{}, "built-in ChatML template");
}

std::unique_ptr<ChatTemplate> ChatTemplate::llama3(std::string bos_text) {
  return std::make_unique<ChatTemplate>(kLlama3Template, ChatSpecialTokens{std::move(bos_text), {}, {}, {}},
                                        "built-in Llama-3 template");
}

}  // namespace sparsecl::text
