// UTF-8 and byte-level helpers shared by the tokenizers: validation, code point iteration, the GPT-2
// byte <-> printable-character table, lossy UTF-8 repair that matches Rust's String::from_utf8_lossy
// (what HF `tokenizers` returns), Python-style whitespace stripping, and utf8proc normalisation.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace sparsecl::text::unicode {

// True when `s` is well-formed UTF-8 (no surrogates, no overlongs, <= U+10FFFF).
bool valid_utf8(std::string_view s);
// Byte length of the UTF-8 sequence starting with lead byte `c` (1 for invalid lead bytes).
inline size_t char_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;
}
// Decodes the code point at s[i] (s must be valid UTF-8) and advances i.
char32_t next_code_point(std::string_view s, size_t& i);
void append_utf8(std::string& out, char32_t cp);

// Replaces ill-formed sequences by U+FFFD, one per maximal ill-formed subpart (Rust / WHATWG practice).
std::string repair_utf8(std::string_view bytes);

// GPT-2 byte-level alphabet: byte -> UTF-8 text of its printable stand-in character.
const std::array<std::string, 256>& bytes_to_unicode();
// Inverse: code point -> byte, or -1 when the code point is not a stand-in character.
int unicode_to_byte(char32_t cp);

// Python str.strip()/isspace() whitespace (what Jinja's `trim` removes).
bool is_python_space(char32_t cp);
std::string python_strip(std::string_view s);
// Rust char::is_whitespace.
bool is_rust_whitespace(char32_t cp);

enum class NormalForm { NFC, NFD, NFKC, NFKD };
// Throws sparsecl::Error on invalid UTF-8.
std::string normalize(std::string_view s, NormalForm form);

}  // namespace sparsecl::text::unicode
