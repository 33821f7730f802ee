// Tokenizers as Hugging Face checkpoints ship them, reproduced exactly (ids and decoded text):
//   tokenizer.json            HF `tokenizers` BPE: byte-level (Llama-3, Qwen2/2.5/3, SmolLM, Tekken) or
//                             SentencePiece-style with byte fallback (Llama-2, Mistral, TinyLlama)
//   tokenizer.model           SentencePiece (Llama-2, Mistral v1, TinyLlama) through libsentencepiece
//   vocab.json + merges.txt   GPT-2 byte-level BPE
// plus tokenizer_config.json when present (bos/eos/pad tokens, add_bos_token, chat_template).
// Everything a model needs from text goes through this interface; it has no libtorch dependency.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "sparsecl/text/chat_template.h"

namespace sparsecl::text {

class Tokenizer {
 public:
  virtual ~Tokenizer();

  // `path` is a directory holding tokenizer.json, tokenizer.model or vocab.json + merges.txt (checked in
  // that order; a tokenizer.json whose components are unsupported falls back to a tokenizer.model beside
  // it), or the path of one of those files. Throws sparsecl::Error naming the file on any problem.
  static std::unique_ptr<Tokenizer> load(const std::filesystem::path& path);
  // load(dir) when `dir` holds tokenizer files (tokenizer.json, tokenizer.model or vocab.json), else
  // nullptr: model directories of pre-tokenized work ({"ids"} records) need none.
  static std::unique_ptr<Tokenizer> load_if_present(const std::filesystem::path& dir);

  // Token ids of `text`. With add_special_tokens the tokenizer's own specials are added (e.g. BOS for
  // Llama-3 / Llama-2); special-token text inside `text` (e.g. "<|im_start|>") is always recognised.
  virtual std::vector<int64_t> encode(std::string_view text, bool add_special_tokens = true) const = 0;
  // Text of `ids`, exactly as HF `tokenizers` (or sentencepiece) decodes them. Ids outside the vocabulary
  // are skipped (as HF does). Invalid UTF-8 from partial byte tokens becomes U+FFFD.
  virtual std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const = 0;
  // Number of ids the tokenizer can produce, added tokens included (max id + 1).
  virtual int64_t vocab_size() const = 0;

  std::optional<int64_t> bos_id() const { return bos_id_; }
  std::optional<int64_t> eos_id() const { return eos_id_; }
  std::optional<int64_t> pad_id() const { return pad_id_; }
  // Id of one exact token string (vocabulary entry or added token), nullopt if absent.
  std::optional<int64_t> token_to_id(std::string_view token) const { return find_token(token); }
  // The token string of an id (byte-level form for BPE, piece for SentencePiece); nullopt if out of range.
  virtual std::optional<std::string> id_to_token(int64_t id) const = 0;
  // True for ids of special tokens (added tokens marked special, SentencePiece control tokens).
  virtual bool is_special(int64_t id) const = 0;
  // nullptr when the tokenizer has no chat template (or one that does not parse; see chat_template.h).
  const ChatTemplate* chat_template() const { return chat_template_.get(); }
  // The special token that ends an assistant turn in the chat template ("<|im_end|>", "<|eot_id|>",
  // "</s>"): the first token of its turn suffix when that token is special; nullopt otherwise.
  std::optional<int64_t> end_of_turn_id() const { return end_of_turn_id_; }
  // Short description of the format, e.g. "tokenizer.json (BPE)", for logs.
  virtual std::string kind() const = 0;

 protected:
  Tokenizer();
  virtual std::optional<int64_t> find_token(std::string_view token) const = 0;

  std::optional<int64_t> bos_id_, eos_id_, pad_id_, end_of_turn_id_;
  std::unique_ptr<ChatTemplate> chat_template_;
  friend struct TokenizerLoader;
};

}  // namespace sparsecl::text
