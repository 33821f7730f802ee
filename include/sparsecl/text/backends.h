// Internal to sparsecl_text: the tokenizer_config.json fields the loaders use and the three format
// loaders behind Tokenizer::load (BPE from tokenizer.json or GPT-2 files, SentencePiece).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "sparsecl/common/error.h"
#include "sparsecl/text/chat_template.h"
#include "sparsecl/text/tokenizer.h"

namespace sparsecl::text {

// What we read from tokenizer_config.json (all optional; `file` empty when there is none).
struct TokenizerConfig {
  std::filesystem::path file;
  std::optional<std::string> bos_token, eos_token, pad_token, unk_token;
  std::optional<bool> add_bos_token, add_eos_token;
  std::optional<std::string> chat_template;
  std::filesystem::path chat_template_source;  // file the template came from (config or chat_template.jinja)
};

// Reads one tokenizer_config.json; throws sparsecl::Error naming the file when it is malformed.
TokenizerConfig read_tokenizer_config_file(const std::filesystem::path& file);
// Reads `dir`/tokenizer_config.json, the special tokens of `dir`/special_tokens_map.json that it does not
// name, and `dir`/chat_template.jinja, each when present; throws sparsecl::Error naming a malformed file.
TokenizerConfig read_tokenizer_config(const std::filesystem::path& dir);

// Thrown by the tokenizer.json loader for a component type it does not implement (lets load() fall back
// to a tokenizer.model beside it, as HF's slow tokenizer would be used).
class UnsupportedComponent : public Error {
 public:
  using Error::Error;
};

std::unique_ptr<Tokenizer> load_hf_tokenizer_json(const std::filesystem::path& file, const TokenizerConfig& config);
std::unique_ptr<Tokenizer> load_gpt2_files(const std::filesystem::path& vocab_json,
                                           const std::filesystem::path& merges_txt, const TokenizerConfig& config);
std::unique_ptr<Tokenizer> load_sentencepiece_model(const std::filesystem::path& file, const TokenizerConfig& config);

// Sets the protected members of Tokenizer from the loaders.
struct TokenizerLoader {
  static void set_ids(Tokenizer& t, std::optional<int64_t> bos, std::optional<int64_t> eos,
                      std::optional<int64_t> pad) {
    t.bos_id_ = bos;
    t.eos_id_ = eos;
    t.pad_id_ = pad;
  }
  static void set_chat_template(Tokenizer& t, std::unique_ptr<ChatTemplate> tmpl) {
    t.chat_template_ = std::move(tmpl);
    t.end_of_turn_id_.reset();
    if (!t.chat_template_ || t.chat_template_->turn_suffix().empty()) return;
    const std::vector<int64_t> ids = t.encode(t.chat_template_->turn_suffix(), /*add_special_tokens=*/false);
    if (!ids.empty() && t.is_special(ids.front())) t.end_of_turn_id_ = ids.front();
  }
  static std::optional<int64_t> lookup(const Tokenizer& t, std::string_view token) { return t.find_token(token); }
};

}  // namespace sparsecl::text
