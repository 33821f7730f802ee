// BPE exactly as HF `tokenizers` runs it, for tokenizer.json files — byte-level (Llama-3, Qwen2/2.5/3,
// SmolLM2, Mistral's Tekken) and SentencePiece-style with byte fallback (Llama-2, Mistral v0.1-v0.3,
// TinyLlama: "▁" for spaces, <0xXX> byte tokens) — and GPT-2 vocab.json + merges.txt. The pipeline
// mirrors tokenizers' TokenizerImpl::encode:
//   1. added tokens (non-normalized ones) are cut out of the raw text, leftmost-longest;
//   2. the rest is normalised (NFC/NFD/NFKC/NFKD, Prepend, Replace, or a Sequence of them), then
//      normalized added tokens are cut out;
//   3. pre-tokenisation: Split (PCRE2 regex or string, every delimiter behaviour, invert), Digits
//      (SmolLM's individual digits), ByteLevel (prefix space, GPT-2 regex, bytes -> printable
//      characters) and Metaspace (spaces -> "▁", prepend scheme always/first/never, optional split
//      before each "▁"), each applied to every piece the previous step produced, all splitting through
//      one transcription of tokenizers' NormalizedString::split;
//   4. the BPE model: whole piece in the vocabulary when ignore_merges, otherwise the lowest-rank merge
//      first (ties: leftmost), with the same heap-and-linked-list procedure as tokenizers' Word::merge_all;
//      characters outside the vocabulary become <0xXX> byte tokens (byte_fallback) or the unk token;
//   5. post-processing: TemplateProcessing (BOS etc.) when add_special_tokens.
// Decoding runs the decoder chain over the token strings as tokenizers' decode_chain does: ByteLevel
// (characters back to bytes, invalid UTF-8 repaired like Rust's from_utf8_lossy), Replace, ByteFallback,
// Fuse, Strip and Metaspace. Any component we do not implement is an error naming it.
#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <nlohmann/json.hpp>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <functional>
#include <mutex>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "sparsecl/common/files.h"
#include "sparsecl/text/backends.h"
#include "sparsecl/text/unicode.h"

namespace sparsecl::text {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Pieces at least this long are not cached (tokenizers' BPE cache: MAX_LENGTH 256).
constexpr size_t kMaxCachedWordBytes = 256;

// The GPT-2 pre-tokenisation regex (what ByteLevel's use_regex applies).
constexpr const char* kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using Vocab = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;


// ---- PCRE2 regex ---------------------------------------------------------------------------------
class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    uint32_t flags = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), flags, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof(buf));
      throw Error(where + ": cannot compile pre-tokenizer regex '" + pattern + "' at offset " + std::to_string(off) +
                  ": " + reinterpret_cast<const char*>(buf));
    }
    (void)pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // without JIT support pcre2_match interprets
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Byte ranges [begin, end) of the successive non-overlapping matches in `s` (valid UTF-8).
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    struct ThreadState {
      pcre2_match_context* ctx = nullptr;
      pcre2_jit_stack* stack = nullptr;
      ThreadState() {
        ctx = pcre2_match_context_create(nullptr);
        stack = pcre2_jit_stack_create(64 * 1024, 8 * 1024 * 1024, nullptr);
        if (ctx && stack) pcre2_jit_stack_assign(ctx, nullptr, stack);
      }
      ~ThreadState() {
        pcre2_jit_stack_free(stack);
        pcre2_match_context_free(ctx);
      }
    };
    thread_local ThreadState state;
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(code_, nullptr), &pcre2_match_data_free);
    std::vector<std::pair<size_t, size_t>> out;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t offset = 0;
    while (offset <= s.size()) {
      int rc = pcre2_match(code_, subject, s.size(), offset, PCRE2_NO_UTF_CHECK, md.get(), state.ctx);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR buf[256];
        pcre2_get_error_message(rc, buf, sizeof(buf));
        throw Error(std::string("pre-tokenizer regex match failed: ") + reinterpret_cast<const char*>(buf));
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: no split here, move one character on
        if (b >= s.size()) break;
        offset = b + unicode::char_len(static_cast<unsigned char>(s[b]));
        continue;
      }
      out.emplace_back(b, e);
      offset = e;
    }
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};

// ---- components ----------------------------------------------------------------------------------
struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
  std::string pattern;  // what is matched: content, normalised like the text when `normalized`
};

struct NormStep {
  enum class Kind { Unicode, Prepend, Replace } kind;
  unicode::NormalForm form = unicode::NormalForm::NFC;  // Unicode
  std::string text;                                     // Prepend: the prefix; Replace: the replacement
  std::shared_ptr<Regex> pattern;                       // Replace: what is replaced
};

struct PreStep {
  enum class Kind { Split, ByteLevel, Digits, Metaspace };
  explicit PreStep(Kind k, std::shared_ptr<Regex> re = nullptr) : kind(k), regex(std::move(re)) {}
  Kind kind;
  std::shared_ptr<Regex> regex;  // Split: its pattern; ByteLevel: the GPT-2 regex when use_regex
  // tokenizers' SplitDelimiterBehavior: what becomes of the matched delimiters.
  enum class Behavior { Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous } behavior = Behavior::Isolated;
  bool invert = false;  // Split: the pattern matches the pieces, what lies between them is the delimiter
  bool add_prefix_space = false;
  bool individual_digits = false;  // Digits: each digit alone (else runs of digits)
  // Metaspace: spaces become `replacement`, which is prepended to every piece (always), to the piece
  // that starts the input (first) or never; split: a new piece starts at every replacement.
  std::string replacement;
  enum class Prepend { Always, First, Never } prepend = Prepend::Always;
  bool split = true;
};

// One step of tokenizers' decoder chain (each maps the list of token strings to a new list).
struct DecodeStep {
  enum class Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace };
  explicit DecodeStep(Kind k, std::shared_ptr<Regex> p = nullptr) : kind(k), pattern(std::move(p)) {}
  Kind kind;
  std::shared_ptr<Regex> pattern;  // Replace: what is replaced ...
  std::string content;             // ... by this; Strip: the character removed; Metaspace: the replacement
  size_t strip_start = 0, strip_stop = 0;  // Strip: at most this many from the start / end of each token
  bool metaspace_prepend = true;           // Metaspace: the first token's replacements are dropped
};

struct TemplateItem {
  bool is_sequence = false;
  std::vector<int32_t> ids;  // SpecialToken: its ids
};

// One piece of the input after added-token splitting: either text to tokenise or an added token id.
struct Segment {
  std::string text;
  int32_t added_id = -1;
  bool at_input_start = false;  // the text begins at byte 0 of the whole input (Metaspace "first")
};

// A pre-tokenised piece of text and whether it begins at byte 0 of the whole input.
struct Piece {
  std::string text;
  bool at_input_start = false;
};

// `s` with every match of `re` replaced by `with`.
std::string replace_all(const std::string& s, const Regex& re, const std::string& with) {
  std::string out;
  size_t prev = 0;
  for (auto [b, e] : re.find_all(s)) {
    out.append(s, prev, b - prev);
    out += with;
    prev = e;
  }
  out.append(s, prev, std::string::npos);
  return out;
}

bool is_numeric(char32_t cp) {  // Rust char::is_numeric: general categories Nd, Nl, No
  auto c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

bool is_word_char(char32_t cp) {
  // tokenizers' single_word check: the neighbouring character is alphanumeric or '_'.
  if (cp == U'_') return true;
  auto c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return (c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO) || is_numeric(cp);
}

}  // namespace

class BpeTokenizer final : public Tokenizer {
 public:
  // ---- construction ------------------------------------------------------------------------------
  BpeTokenizer(std::string source, std::string kind) : source_(std::move(source)), kind_(std::move(kind)) {}

  void set_vocab(Vocab vocab) {
    vocab_ = std::move(vocab);
    for (const auto& [tok, id] : vocab_) {
      if (id < 0) throw Error(source_ + ": negative id " + std::to_string(id) + " for token '" + tok + "'");
      if (static_cast<size_t>(id) >= id_to_token_.size()) id_to_token_.resize(static_cast<size_t>(id) + 1);
      id_to_token_[static_cast<size_t>(id)] = tok;
    }
  }

  void add_merge(std::string_view a, std::string_view b, int32_t rank) {
    auto ia = vocab_.find(a), ib = vocab_.find(b);
    if (ia == vocab_.end() || ib == vocab_.end())
      throw Error(source_ + ": merge '" + std::string(a) + " " + std::string(b) + "' (rank " + std::to_string(rank) +
                  ") uses a token missing from the vocabulary");
    std::string merged = std::string(a) + std::string(b);
    auto im = vocab_.find(merged);
    if (im == vocab_.end())
      throw Error(source_ + ": merge '" + std::string(a) + " " + std::string(b) + "' (rank " + std::to_string(rank) +
                  ") produces '" + merged + "', missing from the vocabulary");
    // A repeated pair keeps its last rank, as tokenizers' HashMap collect does.
    merges_.insert_or_assign(pair_key(ia->second, ib->second), std::pair<int32_t, int32_t>{rank, im->second});
  }

  void add_token(AddedToken t) {
    if (t.content.empty()) throw Error(source_ + ": added token with empty content (id " + std::to_string(t.id) + ")");
    if (static_cast<size_t>(t.id) >= id_to_added_.size()) id_to_added_.resize(static_cast<size_t>(t.id) + 1, -1);
    id_to_added_[static_cast<size_t>(t.id)] = static_cast<int32_t>(added_.size());
    added_.push_back(std::move(t));
  }

  // Call after the normalizers are known.
  void finish_added_tokens() {
    for (auto& v : by_first_byte_raw_) v.clear();
    for (auto& v : by_first_byte_norm_) v.clear();
    any_normalized_added_ = false;
    for (size_t i = 0; i < added_.size(); ++i) {
      AddedToken& t = added_[i];
      t.pattern = t.normalized ? normalize(t.content) : t.content;
      if (t.pattern.empty()) continue;
      auto& table = t.normalized ? by_first_byte_norm_ : by_first_byte_raw_;
      table[static_cast<unsigned char>(t.pattern[0])].push_back(static_cast<int32_t>(i));
      if (t.normalized) any_normalized_added_ = true;
    }
    auto longer = [&](int32_t a, int32_t b) { return added_[a].pattern.size() > added_[b].pattern.size(); };
    for (auto& v : by_first_byte_raw_) std::stable_sort(v.begin(), v.end(), longer);
    for (auto& v : by_first_byte_norm_) std::stable_sort(v.begin(), v.end(), longer);
  }

  std::string source_, kind_;
  Vocab vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a,b) -> (rank, merged id)
  bool ignore_merges_ = false;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  std::vector<AddedToken> added_;
  std::vector<int32_t> id_to_added_;  // id -> index in added_, or -1
  std::array<std::vector<int32_t>, 256> by_first_byte_raw_, by_first_byte_norm_;
  bool any_normalized_added_ = false;
  std::vector<NormStep> normalizers_;
  std::vector<PreStep> pre_steps_;
  std::vector<TemplateItem> template_;  // empty: no TemplateProcessing
  std::optional<int32_t> extra_bos_, extra_eos_;  // from tokenizer_config add_bos_token / add_eos_token
  std::optional<std::vector<DecodeStep>> decoder_;  // none: tokens joined with spaces (as tokenizers)

  // ---- Tokenizer interface -----------------------------------------------------------------------
  std::vector<int64_t> encode(std::string_view text, bool add_special_tokens) const override {
    if (!unicode::valid_utf8(text)) throw Error("tokenizer " + source_ + ": input text is not valid UTF-8");
    std::vector<int64_t> ids;
    std::vector<Segment> segments;
    split_added(text, by_first_byte_raw_, true, segments);
    for (auto& seg : segments) {
      if (seg.added_id >= 0) {
        ids.push_back(seg.added_id);
        continue;
      }
      std::string normalized = normalize(seg.text);
      if (any_normalized_added_) {
        std::vector<Segment> inner;
        split_added(normalized, by_first_byte_norm_, seg.at_input_start, inner);
        for (auto& s : inner) {
          if (s.added_id >= 0) ids.push_back(s.added_id);
          else encode_text(s.text, s.at_input_start, ids);
        }
      } else {
        encode_text(normalized, seg.at_input_start, ids);
      }
    }
    if (!add_special_tokens) return ids;
    std::vector<int64_t> out;
    if (!template_.empty()) {
      for (const auto& item : template_) {
        if (item.is_sequence) out.insert(out.end(), ids.begin(), ids.end());
        else out.insert(out.end(), item.ids.begin(), item.ids.end());
      }
    } else {
      out = std::move(ids);
    }
    if (extra_bos_ && (out.empty() || out.front() != *extra_bos_)) out.insert(out.begin(), *extra_bos_);
    if (extra_eos_ && (out.empty() || out.back() != *extra_eos_)) out.push_back(*extra_eos_);
    return out;
  }

  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int64_t id : ids) {
      const std::string* tok = token_ptr(id);
      if (!tok) continue;
      if (skip_special_tokens && is_special(id)) continue;
      tokens.push_back(*tok);
    }
    if (!decoder_) {
      std::string out;
      for (size_t i = 0; i < tokens.size(); ++i) {
        if (i) out.push_back(' ');
        out += tokens[i];
      }
      return out;
    }
    for (const DecodeStep& step : *decoder_) run_decode_step(step, tokens);
    std::string out;
    for (const auto& t : tokens) out += t;
    return out;
  }

  int64_t vocab_size() const override {
    return static_cast<int64_t>(std::max(id_to_token_.size(), id_to_added_.size()));
  }

  std::optional<std::string> id_to_token(int64_t id) const override {
    const std::string* t = token_ptr(id);
    if (!t) return std::nullopt;
    return *t;
  }

  bool is_special(int64_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= id_to_added_.size()) return false;
    int32_t k = id_to_added_[static_cast<size_t>(id)];
    return k >= 0 && added_[static_cast<size_t>(k)].special;
  }

  std::string kind() const override { return kind_; }

 protected:
  std::optional<int64_t> find_token(std::string_view token) const override {
    for (const auto& a : added_)
      if (a.content == token) return a.id;
    auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }

 private:
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  const std::string* token_ptr(int64_t id) const {
    if (id < 0) return nullptr;
    auto u = static_cast<size_t>(id);
    if (u < id_to_added_.size() && id_to_added_[u] >= 0) return &added_[static_cast<size_t>(id_to_added_[u])].content;
    if (u < id_to_token_.size() && !id_to_token_[u].empty()) return &id_to_token_[u];
    return nullptr;
  }

  std::string normalize(const std::string& s) const {
    std::string out = s;
    for (const NormStep& n : normalizers_) {
      switch (n.kind) {
        case NormStep::Kind::Unicode: out = unicode::normalize(out, n.form); break;
        case NormStep::Kind::Prepend: if (!out.empty()) out.insert(0, n.text); break;
        case NormStep::Kind::Replace: out = replace_all(out, *n.pattern, n.text); break;
      }
    }
    return out;
  }

  // tokenizers' decoders, one decode_chain step over the token strings.
  static void run_decode_step(const DecodeStep& step, std::vector<std::string>& tokens) {
    switch (step.kind) {
      case DecodeStep::Kind::ByteLevel: {  // all tokens -> one string; unmapped tokens copied as bytes
        std::string bytes;
        for (const std::string& tok : tokens) {
          size_t start = bytes.size(), i = 0;
          bool all_mapped = true;
          while (i < tok.size()) {
            int b = unicode::unicode_to_byte(unicode::next_code_point(tok, i));
            if (b < 0) {
              all_mapped = false;
              break;
            }
            bytes.push_back(static_cast<char>(b));
          }
          if (!all_mapped) {
            bytes.resize(start);
            bytes += tok;
          }
        }
        tokens.assign(1, unicode::repair_utf8(bytes));
        return;
      }
      case DecodeStep::Kind::Replace:
        for (auto& t : tokens) t = replace_all(t, *step.pattern, step.content);
        return;
      case DecodeStep::Kind::ByteFallback: {  // runs of <0xXX> -> their UTF-8 text, or one U+FFFD per byte
        std::vector<std::string> out;
        std::string run;
        size_t run_len = 0;
        auto flush = [&] {
          if (run_len == 0) return;
          if (unicode::valid_utf8(run)) out.push_back(run);
          else for (size_t k = 0; k < run_len; ++k) out.emplace_back("\xEF\xBF\xBD");
          run.clear();
          run_len = 0;
        };
        for (auto& t : tokens) {
          int byte = byte_token_value(t);
          if (byte >= 0) {
            run.push_back(static_cast<char>(byte));
            ++run_len;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        tokens.swap(out);
        return;
      }
      case DecodeStep::Kind::Fuse: {
        std::string all;
        for (const auto& t : tokens) all += t;
        tokens.assign(1, std::move(all));
        return;
      }
      case DecodeStep::Kind::Strip:
        for (auto& t : tokens) {
          size_t b = 0, e = t.size();
          for (size_t k = 0; k < step.strip_start && t.compare(b, step.content.size(), step.content) == 0 &&
                             b < e; ++k)
            b += step.content.size();
          for (size_t k = 0; k < step.strip_stop && e >= b + step.content.size() &&
                             t.compare(e - step.content.size(), step.content.size(), step.content) == 0; ++k)
            e -= step.content.size();
          t = t.substr(b, e - b);
        }
        return;
      case DecodeStep::Kind::Metaspace:
        for (size_t i = 0; i < tokens.size(); ++i) {
          std::string out;
          const std::string& t = tokens[i];
          for (size_t k = 0; k < t.size();) {
            if (t.compare(k, step.content.size(), step.content) == 0) {
              if (!(i == 0 && step.metaspace_prepend)) out.push_back(' ');
              k += step.content.size();
            } else {
              out.push_back(t[k++]);
            }
          }
          tokens[i] = std::move(out);
        }
        return;
    }
  }

  // The byte of a "<0xXX>" token (tokenizers' ByteFallback test: 6 bytes, hex digits), or -1.
  static int byte_token_value(const std::string& t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    auto hex = [](char c) {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    int hi = hex(t[3]), lo = hex(t[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
  }

  // Cuts added tokens out of `text` (leftmost-longest), honouring lstrip/rstrip/single_word.
  // `text_at_input_start`: `text` itself begins at byte 0 of the input (so may its first segment).
  void split_added(std::string_view text, const std::array<std::vector<int32_t>, 256>& table,
                   bool text_at_input_start, std::vector<Segment>& out) const {
    size_t last = 0;  // end of the previous token (start of pending text)
    size_t i = 0;
    while (i < text.size()) {
      const auto& cands = table[static_cast<unsigned char>(text[i])];
      const AddedToken* hit = nullptr;
      for (int32_t k : cands) {
        const AddedToken& t = added_[static_cast<size_t>(k)];
        if (text.compare(i, t.pattern.size(), t.pattern) != 0) continue;
        if (t.single_word && !single_word_ok(text, i, i + t.pattern.size())) continue;
        hit = &t;
        break;
      }
      if (!hit) {
        i += unicode::char_len(static_cast<unsigned char>(text[i]));
        continue;
      }
      size_t start = i, end = i + hit->pattern.size();
      if (hit->lstrip) {
        while (start > last) {
          size_t p = start - 1;
          while (p > last && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
          size_t q = p;
          if (!unicode::is_rust_whitespace(unicode::next_code_point(text, q))) break;
          start = p;
        }
      }
      if (hit->rstrip) {
        while (end < text.size()) {
          size_t q = end;
          if (!unicode::is_rust_whitespace(unicode::next_code_point(text, q))) break;
          end = q;
        }
      }
      if (start > last)
        out.push_back(Segment{std::string(text.substr(last, start - last)), -1, text_at_input_start && last == 0});
      out.push_back(Segment{{}, hit->id});
      last = i = end;
    }
    if (last < text.size()) out.push_back(Segment{std::string(text.substr(last)), -1, text_at_input_start && last == 0});
  }

  static bool single_word_ok(std::string_view text, size_t b, size_t e) {
    if (b > 0) {
      size_t p = b - 1;
      while (p > 0 && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
      if (is_word_char(unicode::next_code_point(text, p))) return false;
    }
    if (e < text.size()) {
      size_t q = e;
      if (is_word_char(unicode::next_code_point(text, q))) return false;
    }
    return true;
  }

  // Pre-tokenises normalised text and appends the BPE ids of every piece. `at_input_start`: the text
  // begins at byte 0 of the whole input (what Metaspace's "first" prepend scheme asks).
  void encode_text(const std::string& text, bool at_input_start, std::vector<int64_t>& ids) const {
    if (text.empty()) return;
    std::vector<Piece> pieces{Piece{text, at_input_start}};
    std::vector<Piece> next;
    for (const auto& step : pre_steps_) {
      next.clear();
      for (auto& piece : pieces) {
        switch (step.kind) {
          case PreStep::Kind::Split: split_regex(piece, *step.regex, step.behavior, step.invert, next); break;
          case PreStep::Kind::Digits: split_digits(piece, step.individual_digits, next); break;
          case PreStep::Kind::ByteLevel: byte_level(std::move(piece), step, next); break;
          case PreStep::Kind::Metaspace: metaspace(std::move(piece), step, next); break;
        }
      }
      pieces.swap(next);
    }
    for (const auto& piece : pieces)
      if (!piece.text.empty()) bpe(piece.text, ids);
  }

  // One stretch of a piece and whether it is a delimiter (a match of the split pattern).
  struct Span {
    size_t begin, end;
    bool is_match;
  };

  // tokenizers' NormalizedString::split: `spans` cover in.text in order (matches and the text between
  // them); `behavior` decides what becomes of the matches; empty pieces are dropped.
  static void split_spans(const Piece& in, const std::vector<Span>& spans, PreStep::Behavior behavior,
                          std::vector<Piece>& out) {
    using B = PreStep::Behavior;
    std::vector<std::pair<Span, bool>> kept;  // (stretch, removed)
    bool previous_match = false;
    switch (behavior) {
      case B::Isolated:
        for (const Span& sp : spans) kept.push_back({sp, false});
        break;
      case B::Removed:
        for (const Span& sp : spans) kept.push_back({sp, sp.is_match});
        break;
      case B::Contiguous:  // runs of matches (and of non-matches) become one piece
        for (const Span& sp : spans) {
          if (sp.is_match == previous_match && !kept.empty()) kept.back().first.end = sp.end;
          else kept.push_back({sp, false});
          previous_match = sp.is_match;
        }
        break;
      case B::MergedWithPrevious:  // a match joins the piece before it
        for (const Span& sp : spans) {
          if (sp.is_match && !previous_match && !kept.empty()) kept.back().first.end = sp.end;
          else kept.push_back({sp, false});
          previous_match = sp.is_match;
        }
        break;
      case B::MergedWithNext:  // a match joins the piece after it (folded from the end, as tokenizers does)
        for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
          if (it->is_match && !previous_match && !kept.empty()) kept.back().first.begin = it->begin;
          else kept.push_back({*it, false});
          previous_match = it->is_match;
        }
        std::reverse(kept.begin(), kept.end());
        break;
    }
    for (const auto& [sp, removed] : kept)
      if (!removed && sp.end > sp.begin)
        out.push_back(Piece{in.text.substr(sp.begin, sp.end - sp.begin), in.at_input_start && sp.begin == 0});
  }

  // The spans of `s` given its matches [begin, end) in order (tokenizers' Pattern::find_matches).
  static std::vector<Span> spans_of(const std::string& s, const std::vector<std::pair<size_t, size_t>>& matches,
                                    bool invert) {
    std::vector<Span> spans;
    size_t prev = 0;
    for (auto [b, e] : matches) {
      if (b > prev) spans.push_back({prev, b, invert});
      spans.push_back({b, e, !invert});
      prev = e;
    }
    if (prev < s.size()) spans.push_back({prev, s.size(), invert});
    return spans;
  }

  static void split_regex(const Piece& in, const Regex& re, PreStep::Behavior behavior, bool invert,
                          std::vector<Piece>& out) {
    split_spans(in, spans_of(in.text, re.find_all(in.text), invert), behavior, out);
  }

  // tokenizers' Digits: every numeric character a match, Isolated (individual_digits) or Contiguous.
  static void split_digits(const Piece& in, bool individual, std::vector<Piece>& out) {
    std::vector<std::pair<size_t, size_t>> matches;
    for (size_t i = 0; i < in.text.size();) {
      const size_t at = i;
      if (is_numeric(unicode::next_code_point(in.text, i))) matches.emplace_back(at, i);
    }
    split_spans(in, spans_of(in.text, matches, false),
                individual ? PreStep::Behavior::Isolated : PreStep::Behavior::Contiguous, out);
  }

  // tokenizers' ByteLevel: optional prefix space, the GPT-2 regex, bytes -> printable characters.
  static void byte_level(Piece in, const PreStep& step, std::vector<Piece>& out) {
    if (step.add_prefix_space && (in.text.empty() || in.text[0] != ' ')) in.text.insert(in.text.begin(), ' ');
    std::vector<Piece> parts;
    if (step.regex) split_regex(in, *step.regex, PreStep::Behavior::Isolated, false, parts);
    else parts.push_back(std::move(in));
    const auto& table = unicode::bytes_to_unicode();
    for (auto& part : parts) {
      std::string mapped;
      mapped.reserve(part.text.size() * 2);
      for (unsigned char c : part.text) mapped += table[c];
      out.push_back(Piece{std::move(mapped), part.at_input_start});
    }
  }

  // tokenizers' Metaspace: ' ' -> replacement, the prepend scheme, then (split) a new piece at every
  // replacement (SplitDelimiterBehavior::MergedWithNext: "a▁▁b" -> "a", "▁", "▁b").
  static void metaspace(Piece in, const PreStep& step, std::vector<Piece>& out) {
    const std::string& r = step.replacement;
    std::string s;
    s.reserve(in.text.size() + r.size());
    for (char c : in.text) {
      if (c == ' ') s += r;
      else s.push_back(c);
    }
    bool prepend = step.prepend == PreStep::Prepend::Always ||
                   (step.prepend == PreStep::Prepend::First && in.at_input_start);
    if (prepend && s.compare(0, r.size(), r) != 0) s.insert(0, r);
    if (!step.split) {
      out.push_back(Piece{std::move(s), in.at_input_start});
      return;
    }
    std::vector<std::pair<size_t, size_t>> matches;
    for (size_t k = s.find(r); k != std::string::npos; k = s.find(r, k + r.size())) matches.emplace_back(k, k + r.size());
    split_spans(Piece{s, in.at_input_start}, spans_of(s, matches, false), PreStep::Behavior::MergedWithNext, out);
  }

  void bpe(const std::string& word, std::vector<int64_t>& ids) const {
    if (ignore_merges_) {
      auto it = vocab_.find(word);
      if (it != vocab_.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      auto it = cache_.find(word);
      if (it != cache_.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> result = merge_word(word);
    ids.insert(ids.end(), result.begin(), result.end());
    if (word.size() >= kMaxCachedWordBytes) return;  // long pieces (Metaspace without split) are not cached
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() > 200000) cache_.clear();
    cache_.emplace(word, std::move(result));
  }

  // tokenizers' Word::merge_all: a heap of (rank, position), lowest rank first, then leftmost.
  std::vector<int32_t> merge_word(const std::string& word) const {
    struct Sym {
      int32_t id;
      int32_t prev, next;
      bool alive;
    };
    std::vector<Sym> syms;
    size_t i = 0;
    while (i < word.size()) {
      size_t start = i;
      unicode::next_code_point(word, i);
      std::string_view ch(word.data() + start, i - start);
      auto it = vocab_.find(ch);
      if (it != vocab_.end()) {
        syms.push_back({it->second, 0, 0, true});
      } else if (byte_fallback_) {
        bool ok = true;
        std::vector<int32_t> bytes;
        for (unsigned char c : ch) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "<0x%02X>", c);
          auto bt = vocab_.find(std::string_view(buf));
          if (bt == vocab_.end()) { ok = false; break; }
          bytes.push_back(bt->second);
        }
        if (ok) {
          for (int32_t b : bytes) syms.push_back({b, 0, 0, true});
        } else if (unk_id_) {
          push_unk(syms);
        }
      } else if (unk_id_) {
        push_unk(syms);
      }
      // no vocabulary entry and no unk token: the character is dropped, as tokenizers does
    }
    const int32_t n = static_cast<int32_t>(syms.size());
    for (int32_t k = 0; k < n; ++k) {
      syms[static_cast<size_t>(k)].prev = k - 1;
      syms[static_cast<size_t>(k)].next = k + 1 < n ? k + 1 : -1;
    }
    struct Merge {
      int32_t rank, pos, new_id;
      bool operator>(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Merge, std::vector<Merge>, std::greater<Merge>> queue;
    auto push_pair = [&](int32_t pos) {
      if (pos < 0) return;
      int32_t nx = syms[static_cast<size_t>(pos)].next;
      if (nx < 0) return;
      auto it = merges_.find(pair_key(syms[static_cast<size_t>(pos)].id, syms[static_cast<size_t>(nx)].id));
      if (it != merges_.end()) queue.push({it->second.first, pos, it->second.second});
    };
    for (int32_t k = 0; k + 1 < n; ++k) push_pair(k);
    while (!queue.empty()) {
      Merge top = queue.top();
      queue.pop();
      Sym& s = syms[static_cast<size_t>(top.pos)];
      if (!s.alive || s.next < 0) continue;
      Sym& r = syms[static_cast<size_t>(s.next)];
      auto it = merges_.find(pair_key(s.id, r.id));
      if (it == merges_.end() || it->second.second != top.new_id) continue;
      s.id = top.new_id;
      r.alive = false;
      s.next = r.next;
      if (s.next >= 0) syms[static_cast<size_t>(s.next)].prev = top.pos;
      push_pair(s.prev);
      push_pair(top.pos);
    }
    std::vector<int32_t> out;
    for (int32_t k = n > 0 ? 0 : -1; k >= 0; k = syms[static_cast<size_t>(k)].next) out.push_back(syms[static_cast<size_t>(k)].id);
    return out;
  }

  template <class V>
  void push_unk(V& syms) const {
    if (fuse_unk_ && !syms.empty() && syms.back().id == *unk_id_) return;
    syms.push_back({*unk_id_, 0, 0, true});
  }

  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

namespace {

[[noreturn]] void unsupported(const fs::path& file, const std::string& what) {
  throw UnsupportedComponent(file.string() + ": unsupported " + what);
}

std::string type_of(const json& j, const fs::path& file, const std::string& where) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    throw Error(file.string() + ": " + where + " has no \"type\"");
  return j["type"].get<std::string>();
}

std::string string_field(const json& j, const char* key, const fs::path& file, const std::string& where) {
  if (!j.contains(key) || !j[key].is_string())
    throw Error(file.string() + ": " + where + " has no string \"" + key + "\"");
  return j[key].get<std::string>();
}

// A Replace / Split pattern: {"String": literal} or {"Regex": PCRE}.
std::shared_ptr<Regex> pattern_of(const json& j, const fs::path& file, const std::string& where) {
  const json& pat = j.value("pattern", json());
  if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string())
    return std::make_shared<Regex>(pat["Regex"].get<std::string>(), false, file.string());
  if (pat.is_object() && pat.contains("String") && pat["String"].is_string()) {
    if (pat["String"].get_ref<const std::string&>().empty()) throw Error(file.string() + ": " + where + " with an empty pattern");
    return std::make_shared<Regex>(pat["String"].get<std::string>(), true, file.string());
  }
  throw Error(file.string() + ": " + where + " without a Regex or String pattern");
}

void parse_normalizer(const json& j, const fs::path& file, std::vector<NormStep>& out) {
  if (j.is_null()) return;
  std::string t = type_of(j, file, "normalizer");
  auto unicode_form = [&](unicode::NormalForm f) { out.push_back(NormStep{NormStep::Kind::Unicode, f, {}, nullptr}); };
  if (t == "Sequence") {
    for (const auto& n : j.value("normalizers", json::array())) parse_normalizer(n, file, out);
  } else if (t == "NFC") unicode_form(unicode::NormalForm::NFC);
  else if (t == "NFD") unicode_form(unicode::NormalForm::NFD);
  else if (t == "NFKC") unicode_form(unicode::NormalForm::NFKC);
  else if (t == "NFKD") unicode_form(unicode::NormalForm::NFKD);
  else if (t == "Prepend")
    out.push_back(NormStep{NormStep::Kind::Prepend, {}, string_field(j, "prepend", file, "Prepend normalizer"), nullptr});
  else if (t == "Replace")
    out.push_back(NormStep{NormStep::Kind::Replace, {}, string_field(j, "content", file, "Replace normalizer"),
                           pattern_of(j, file, "Replace normalizer")});
  else unsupported(file, "normalizer type '" + t + "'");
}

// Metaspace's replacement and prepend scheme, in the current form ("prepend_scheme") or the one before
// tokenizers 0.15 ("add_prefix_space": true = always, false = never).
void parse_metaspace(const json& j, const fs::path& file, const std::string& where, std::string& replacement,
                     PreStep::Prepend& prepend) {
  replacement = string_field(j, "replacement", file, where);
  if (replacement.empty() || unicode::char_len(static_cast<unsigned char>(replacement[0])) != replacement.size())
    throw Error(file.string() + ": " + where + " replacement '" + replacement + "' is not one character");
  prepend = PreStep::Prepend::Always;
  if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) {
    std::string scheme = j["prepend_scheme"].get<std::string>();
    if (scheme == "always") prepend = PreStep::Prepend::Always;
    else if (scheme == "first") prepend = PreStep::Prepend::First;
    else if (scheme == "never") prepend = PreStep::Prepend::Never;
    else throw Error(file.string() + ": " + where + " prepend_scheme '" + scheme + "' is not always, first or never");
  } else if (j.contains("add_prefix_space") && j["add_prefix_space"].is_boolean()) {
    prepend = j["add_prefix_space"].get<bool>() ? PreStep::Prepend::Always : PreStep::Prepend::Never;
  }
}

void parse_pre_tokenizer(const json& j, const fs::path& file, std::vector<PreStep>& out) {
  if (j.is_null()) return;
  std::string t = type_of(j, file, "pre_tokenizer");
  if (t == "Sequence") {
    for (const auto& p : j.value("pretokenizers", json::array())) parse_pre_tokenizer(p, file, out);
  } else if (t == "Split") {
    PreStep step{PreStep::Kind::Split, pattern_of(j, file, "Split pre-tokenizer")};
    std::string behavior = j.value("behavior", std::string("Isolated"));
    if (behavior == "Isolated") step.behavior = PreStep::Behavior::Isolated;
    else if (behavior == "Removed") step.behavior = PreStep::Behavior::Removed;
    else if (behavior == "MergedWithPrevious") step.behavior = PreStep::Behavior::MergedWithPrevious;
    else if (behavior == "MergedWithNext") step.behavior = PreStep::Behavior::MergedWithNext;
    else if (behavior == "Contiguous") step.behavior = PreStep::Behavior::Contiguous;
    else unsupported(file, "Split pre-tokenizer behavior '" + behavior + "'");
    step.invert = j.value("invert", false);
    out.push_back(std::move(step));
  } else if (t == "Digits") {
    PreStep step{PreStep::Kind::Digits, nullptr};
    step.individual_digits = j.value("individual_digits", false);
    out.push_back(std::move(step));
  } else if (t == "ByteLevel") {
    PreStep step{PreStep::Kind::ByteLevel, nullptr};
    step.add_prefix_space = j.value("add_prefix_space", true);
    if (j.value("use_regex", true)) step.regex = std::make_shared<Regex>(kGpt2Regex, false, file.string());
    out.push_back(std::move(step));
  } else if (t == "Metaspace") {
    PreStep step{PreStep::Kind::Metaspace, nullptr};
    parse_metaspace(j, file, "Metaspace pre-tokenizer", step.replacement, step.prepend);
    step.split = j.value("split", true);
    out.push_back(std::move(step));
  } else {
    unsupported(file, "pre_tokenizer type '" + t + "'");
  }
}

// Collects TemplateProcessing's single template; ByteLevel post-processing only trims offsets.
void parse_post_processor(const json& j, const fs::path& file, std::vector<TemplateItem>& out) {
  if (j.is_null()) return;
  std::string t = type_of(j, file, "post_processor");
  if (t == "Sequence") {
    for (const auto& p : j.value("processors", json::array())) parse_post_processor(p, file, out);
  } else if (t == "ByteLevel") {
    return;
  } else if (t == "TemplateProcessing") {
    if (!out.empty()) unsupported(file, "post_processor with two TemplateProcessing steps");
    const json& specials = j.value("special_tokens", json::object());
    for (const auto& item : j.value("single", json::array())) {
      if (item.contains("Sequence")) {
        if (item["Sequence"].value("id", std::string("A")) != "A")
          throw Error(file.string() + ": TemplateProcessing single template refers to sequence B");
        out.push_back({true, {}});
      } else if (item.contains("SpecialToken")) {
        std::string name = item["SpecialToken"].value("id", std::string());
        if (!specials.contains(name))
          throw Error(file.string() + ": TemplateProcessing uses special token '" + name +
                      "' missing from its special_tokens");
        TemplateItem ti;
        for (const auto& id : specials[name].value("ids", json::array())) ti.ids.push_back(id.get<int32_t>());
        out.push_back(std::move(ti));
      } else {
        throw Error(file.string() + ": TemplateProcessing item is neither Sequence nor SpecialToken");
      }
    }
    bool has_seq = std::any_of(out.begin(), out.end(), [](const TemplateItem& i) { return i.is_sequence; });
    if (!has_seq) throw Error(file.string() + ": TemplateProcessing single template has no $A sequence");
  } else {
    unsupported(file, "post_processor type '" + t + "'");
  }
}

void parse_decoder(const json& j, const fs::path& file, std::vector<DecodeStep>& out) {
  std::string t = type_of(j, file, "decoder");
  if (t == "Sequence") {
    for (const auto& d : j.value("decoders", json::array())) parse_decoder(d, file, out);
  } else if (t == "ByteLevel") {
    out.push_back(DecodeStep{DecodeStep::Kind::ByteLevel});
  } else if (t == "Replace") {
    DecodeStep step{DecodeStep::Kind::Replace, pattern_of(j, file, "Replace decoder")};
    step.content = string_field(j, "content", file, "Replace decoder");
    out.push_back(std::move(step));
  } else if (t == "ByteFallback") {
    out.push_back(DecodeStep{DecodeStep::Kind::ByteFallback});
  } else if (t == "Fuse") {
    out.push_back(DecodeStep{DecodeStep::Kind::Fuse});
  } else if (t == "Strip") {
    DecodeStep step{DecodeStep::Kind::Strip};
    step.content = string_field(j, "content", file, "Strip decoder");
    if (step.content.empty() || unicode::char_len(static_cast<unsigned char>(step.content[0])) != step.content.size())
      throw Error(file.string() + ": Strip decoder content '" + step.content + "' is not one character");
    auto count = [&](const char* key) {
      if (!j.contains(key) || !j[key].is_number_unsigned())
        throw Error(file.string() + ": Strip decoder has no non-negative integer \"" + key + "\"");
      return j[key].get<size_t>();
    };
    step.strip_start = count("start");
    step.strip_stop = count("stop");
    out.push_back(std::move(step));
  } else if (t == "Metaspace") {
    DecodeStep step{DecodeStep::Kind::Metaspace};
    PreStep::Prepend prepend{};
    parse_metaspace(j, file, "Metaspace decoder", step.content, prepend);
    step.metaspace_prepend = prepend != PreStep::Prepend::Never;
    out.push_back(std::move(step));
  } else {
    unsupported(file, "decoder type '" + t + "'");
  }
}

void apply_config(BpeTokenizer& tok, const TokenizerConfig& config, std::optional<std::string> default_bos,
                  std::optional<std::string> default_eos) {
  auto id_of = [&](const std::optional<std::string>& s, const char* what) -> std::optional<int64_t> {
    if (!s) return std::nullopt;
    auto id = TokenizerLoader::lookup(tok, *s);
    if (!id)
      throw Error((config.file.empty() ? tok.source_ : config.file.string()) + ": " + what + " '" + *s +
                  "' is not in the tokenizer's vocabulary");
    return id;
  };
  std::optional<std::string> bos = config.bos_token ? config.bos_token : default_bos;
  std::optional<std::string> eos = config.eos_token ? config.eos_token : default_eos;
  auto bos_id = id_of(bos, "bos_token"), eos_id = id_of(eos, "eos_token"), pad_id = id_of(config.pad_token, "pad_token");
  TokenizerLoader::set_ids(tok, bos_id, eos_id, pad_id);
  if (config.add_bos_token.value_or(false)) {
    if (!bos_id) throw Error(config.file.string() + ": add_bos_token is true but there is no bos_token");
    bool templ_adds = !tok.template_.empty() && !tok.template_.front().is_sequence &&
                      !tok.template_.front().ids.empty() && tok.template_.front().ids.front() == *bos_id;
    if (!templ_adds) tok.extra_bos_ = static_cast<int32_t>(*bos_id);
  }
  if (config.add_eos_token.value_or(false)) {
    if (!eos_id) throw Error(config.file.string() + ": add_eos_token is true but there is no eos_token");
    tok.extra_eos_ = static_cast<int32_t>(*eos_id);
  }
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer_json(const fs::path& file, const TokenizerConfig& config) {
  json j = read_json_file(file, "tokenizer file");
  if (!j.is_object()) throw Error(file.string() + ": not a tokenizer.json (top level is not an object)");
  if (!j.contains("model") || !j["model"].is_object()) throw Error(file.string() + ": missing \"model\"");
  const json& m = j["model"];
  std::string mtype = m.value("type", std::string("BPE"));
  if (mtype != "BPE") unsupported(file, "model type '" + mtype + "'");
  if (!m.contains("vocab") || !m["vocab"].is_object()) throw Error(file.string() + ": missing model.vocab");
  if (!m.contains("merges") || !m["merges"].is_array()) throw Error(file.string() + ": missing model.merges");
  if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() != 0.0)
    unsupported(file, "BPE dropout");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(key) && m[key].is_string() && !m[key].get<std::string>().empty())
      unsupported(file, std::string("BPE ") + key + " '" + m[key].get<std::string>() + "'");

  auto tok = std::make_unique<BpeTokenizer>(file.string(), "tokenizer.json (BPE)");
  Vocab vocab;
  vocab.reserve(m["vocab"].size());
  for (const auto& [k, v] : m["vocab"].items()) {
    if (!v.is_number_integer()) throw Error(file.string() + ": model.vocab entry '" + k + "' is not an integer id");
    vocab.emplace(k, v.get<int32_t>());
  }
  tok->set_vocab(std::move(vocab));
  int32_t rank = 0;
  for (const auto& mg : m["merges"]) {
    if (mg.is_string()) {
      const std::string& s = mg.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        throw Error(file.string() + ": merge " + std::to_string(rank) + " '" + s + "' is not two tokens");
      tok->add_merge(std::string_view(s).substr(0, sp), std::string_view(s).substr(sp + 1), rank);
    } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
      tok->add_merge(mg[0].get_ref<const std::string&>(), mg[1].get_ref<const std::string&>(), rank);
    } else {
      throw Error(file.string() + ": merge " + std::to_string(rank) + " is neither \"a b\" nor [\"a\", \"b\"]");
    }
    ++rank;
  }
  tok->ignore_merges_ = m.value("ignore_merges", false);
  tok->fuse_unk_ = m.value("fuse_unk", false);
  tok->byte_fallback_ = m.value("byte_fallback", false);
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = tok->vocab_.find(m["unk_token"].get<std::string>());
    if (it == tok->vocab_.end())
      throw Error(file.string() + ": model.unk_token '" + m["unk_token"].get<std::string>() + "' is not in model.vocab");
    tok->unk_id_ = it->second;
  }

  for (const auto& a : j.value("added_tokens", json::array())) {
    AddedToken t;
    t.content = a.value("content", std::string());
    t.id = a.value("id", -1);
    if (t.id < 0) throw Error(file.string() + ": added token '" + t.content + "' has no id");
    t.special = a.value("special", false);
    t.lstrip = a.value("lstrip", false);
    t.rstrip = a.value("rstrip", false);
    t.single_word = a.value("single_word", false);
    t.normalized = a.value("normalized", !t.special);
    tok->add_token(std::move(t));
  }
  parse_normalizer(j.value("normalizer", json()), file, tok->normalizers_);
  tok->finish_added_tokens();
  parse_pre_tokenizer(j.value("pre_tokenizer", json()), file, tok->pre_steps_);
  parse_post_processor(j.value("post_processor", json()), file, tok->template_);
  if (json d = j.value("decoder", json()); !d.is_null()) {
    tok->decoder_.emplace();
    parse_decoder(d, file, *tok->decoder_);
  }

  // Without a tokenizer_config.json, a template that starts with a special token names the BOS.
  std::optional<std::string> default_bos;
  if (!tok->template_.empty() && !tok->template_.front().is_sequence && tok->template_.front().ids.size() == 1)
    default_bos = tok->id_to_token(tok->template_.front().ids[0]);
  apply_config(*tok, config, default_bos, std::nullopt);
  return tok;
}

std::unique_ptr<Tokenizer> load_gpt2_files(const fs::path& vocab_json, const fs::path& merges_txt,
                                           const TokenizerConfig& config) {
  json v = read_json_file(vocab_json, "tokenizer file");
  if (!v.is_object()) throw Error(vocab_json.string() + ": not a token -> id object");
  auto tok = std::make_unique<BpeTokenizer>(vocab_json.parent_path().string(), "vocab.json + merges.txt (GPT-2 BPE)");
  Vocab vocab;
  for (const auto& [k, id] : v.items()) {
    if (!id.is_number_integer()) throw Error(vocab_json.string() + ": entry '" + k + "' is not an integer id");
    vocab.emplace(k, id.get<int32_t>());
  }
  tok->set_vocab(std::move(vocab));
  std::ifstream in(merges_txt, std::ios::binary);
  if (!in) throw Error("cannot open " + merges_txt.string());
  std::string line;
  int32_t rank = 0;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (lineno == 1 && line.rfind("#version", 0) == 0)) continue;
    size_t sp = line.find(' ');
    if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos)
      throw Error(merges_txt.string() + ":" + std::to_string(lineno) + ": '" + line + "' is not two tokens");
    tok->add_merge(std::string_view(line).substr(0, sp), std::string_view(line).substr(sp + 1), rank++);
  }
  // GPT2Tokenizer(Fast) registers <|endoftext|> (bos = eos = unk) as a special added token.
  std::optional<std::string> eot;
  if (auto it = tok->vocab_.find(std::string_view("<|endoftext|>")); it != tok->vocab_.end()) {
    eot = "<|endoftext|>";
    AddedToken t;
    t.content = "<|endoftext|>";
    t.id = it->second;
    t.special = true;
    tok->add_token(std::move(t));
  }
  tok->finish_added_tokens();
  PreStep step{PreStep::Kind::ByteLevel, std::make_shared<Regex>(kGpt2Regex, false, merges_txt.string())};
  step.add_prefix_space = false;
  tok->pre_steps_.push_back(std::move(step));
  tok->decoder_ = std::vector<DecodeStep>{DecodeStep{DecodeStep::Kind::ByteLevel}};
  apply_config(*tok, config, eot, eot);
  return tok;
}

}  // namespace sparsecl::text
