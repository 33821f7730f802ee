// SentencePiece tokenizer.model files (Llama-2, Mistral v1, TinyLlama) through libsentencepiece, so
// normalisation rules, byte fallback and the BPE/unigram algorithm are the model's own. Encoding with
// special tokens prepends the model's BOS (what HF's LlamaTokenizer and `sp.encode(add_bos=True)` do);
// decoding is sentencepiece's (control tokens such as <s> produce no text).
#include <sentencepiece_processor.h>

#include "sparsecl/text/backends.h"

namespace sparsecl::text {

namespace fs = std::filesystem;

namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(const fs::path& file, const TokenizerConfig& config) : source_(file.string()) {
    auto status = sp_.Load(file.string());
    if (!status.ok()) throw Error(file.string() + ": cannot load SentencePiece model: " + status.ToString());
    n_ = sp_.GetPieceSize();
    auto valid = [&](int id) -> std::optional<int64_t> {
      if (id < 0 || id >= n_) return std::nullopt;
      return id;
    };
    auto named = [&](const std::optional<std::string>& piece, std::optional<int64_t> fallback,
                     const char* what) -> std::optional<int64_t> {
      if (!piece) return fallback;
      auto id = find_token(*piece);
      if (!id)
        throw Error(config.file.string() + ": " + what + " '" + *piece + "' is not a piece of " + file.string());
      return id;
    };
    bos_id_ = named(config.bos_token, valid(sp_.bos_id()), "bos_token");
    eos_id_ = named(config.eos_token, valid(sp_.eos_id()), "eos_token");
    pad_id_ = named(config.pad_token, valid(sp_.pad_id()), "pad_token");
    add_bos_ = config.add_bos_token.value_or(true);
    add_eos_ = config.add_eos_token.value_or(false);
    if (add_bos_ && !bos_id_) add_bos_ = false;  // a model without BOS (bos_id -1) adds none
    if (add_eos_ && !eos_id_)
      throw Error(config.file.string() + ": add_eos_token is true but " + file.string() + " has no EOS piece");
  }

  std::vector<int64_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<int> pieces;
    auto status = sp_.Encode(text, &pieces);
    if (!status.ok()) throw Error(source_ + ": SentencePiece encode failed: " + status.ToString());
    std::vector<int64_t> ids;
    ids.reserve(pieces.size() + 2);
    if (add_special_tokens && add_bos_) ids.push_back(*bos_id_);
    ids.insert(ids.end(), pieces.begin(), pieces.end());
    if (add_special_tokens && add_eos_) ids.push_back(*eos_id_);
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const override {
    std::vector<int> keep;
    keep.reserve(ids.size());
    for (int64_t id : ids) {
      if (id < 0 || id >= n_) continue;
      if (skip_special_tokens && is_special(id)) continue;
      keep.push_back(static_cast<int>(id));
    }
    std::string out;
    auto status = sp_.Decode(keep, &out);
    if (!status.ok()) throw Error(source_ + ": SentencePiece decode failed: " + status.ToString());
    return out;
  }

  int64_t vocab_size() const override { return n_; }

  std::optional<std::string> id_to_token(int64_t id) const override {
    if (id < 0 || id >= n_) return std::nullopt;
    return sp_.IdToPiece(static_cast<int>(id));
  }

  bool is_special(int64_t id) const override {
    if (id < 0 || id >= n_) return false;
    return sp_.IsControl(static_cast<int>(id)) || sp_.IsUnknown(static_cast<int>(id));
  }

  std::string kind() const override { return "tokenizer.model (SentencePiece)"; }

 protected:
  std::optional<int64_t> find_token(std::string_view token) const override {
    int id = sp_.PieceToId(token);
    if (id < 0 || id >= n_ || sp_.IdToPiece(id) != token) return std::nullopt;
    return id;
  }

 private:
  std::string source_;
  sentencepiece::SentencePieceProcessor sp_;
  int n_ = 0;
  bool add_bos_ = true, add_eos_ = false;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_model(const fs::path& file, const TokenizerConfig& config) {
  return std::make_unique<SentencePieceTokenizer>(file, config);
}

}  // namespace sparsecl::text
