// UTF-8 helpers for the tokenizers (see include/sparsecl/text/unicode.h). The lossy repair follows
// Rust's String::from_utf8_lossy because HF `tokenizers` decodes byte-level tokens with it, and a decode
// that cuts a multi-byte character must produce the same U+FFFD characters.
#include "sparsecl/text/unicode.h"

#include <utf8proc.h>

#include <cstdlib>
#include <memory>

#include "sparsecl/common/error.h"

namespace sparsecl::text::unicode {

namespace {

// Length of the valid prefix (0..4) of a UTF-8 sequence starting at s[i], and whether it is complete.
// Implements the well-formed byte sequence table of the Unicode standard (Table 3-7).
size_t valid_prefix(std::string_view s, size_t i, bool& complete) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = b(i);
  complete = false;
  if (c < 0x80) { complete = true; return 1; }
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) need = 2;
  else if (c == 0xE0) { need = 3; lo = 0xA0; }
  else if (c >= 0xE1 && c <= 0xEC) need = 3;
  else if (c == 0xED) { need = 3; hi = 0x9F; }
  else if (c >= 0xEE && c <= 0xEF) need = 3;
  else if (c == 0xF0) { need = 4; lo = 0x90; }
  else if (c >= 0xF1 && c <= 0xF3) need = 4;
  else if (c == 0xF4) { need = 4; hi = 0x8F; }
  else return 0;  // invalid lead byte
  size_t k = 1;
  if (i + k >= s.size()) return k;
  if (b(i + k) < lo || b(i + k) > hi) return k;
  ++k;
  while (k < need) {
    if (i + k >= s.size()) return k;
    if (b(i + k) < 0x80 || b(i + k) > 0xBF) return k;
    ++k;
  }
  complete = true;
  return need;
}

}  // namespace

bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    bool complete;
    size_t n = valid_prefix(s, i, complete);
    if (!complete) return false;
    i += n;
  }
  return true;
}

char32_t next_code_point(std::string_view s, size_t& i) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  size_t n = char_len(c);
  if (i + n > s.size()) n = 1;
  char32_t cp;
  switch (n) {
    case 1: cp = c; break;
    case 2: cp = c & 0x1F; break;
    case 3: cp = c & 0x0F; break;
    default: cp = c & 0x07; break;
  }
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string repair_utf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    bool complete;
    size_t n = valid_prefix(bytes, i, complete);
    if (complete) {
      out.append(bytes.substr(i, n));
      i += n;
    } else {
      out.append("\xEF\xBF\xBD");  // U+FFFD for the maximal ill-formed subpart
      i += n == 0 ? 1 : n;
    }
  }
  return out;
}

namespace {
struct ByteTables {
  std::array<std::string, 256> to_unicode;
  std::array<int, 324> inverse{};  // code point (< 324) -> byte, or -1
  ByteTables() {
    inverse.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      inverse[cp] = b;
      append_utf8(to_unicode[b], cp);
    }
  }
};
const ByteTables& tables() {
  static const ByteTables t;
  return t;
}
}  // namespace

const std::array<std::string, 256>& bytes_to_unicode() { return tables().to_unicode; }

int unicode_to_byte(char32_t cp) {
  // Printable bytes map to themselves; the other 68 to U+0100..U+0143 in byte order.
  return cp < 324 ? tables().inverse[cp] : -1;
}

bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

bool is_rust_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

std::string python_strip(std::string_view s) {
  size_t begin = 0, end = s.size();
  {
    size_t i = 0;
    while (i < s.size()) {
      size_t at = i;
      if (!is_python_space(next_code_point(s, i))) { begin = at; break; }
      begin = i;
    }
  }
  if (begin >= s.size()) return {};
  // Scan forward remembering the end of the last non-space character.
  size_t i = begin, last = begin;
  while (i < s.size()) {
    char32_t cp = next_code_point(s, i);
    if (!is_python_space(cp)) last = i;
  }
  end = last;
  return std::string(s.substr(begin, end - begin));
}

std::string normalize(std::string_view s, NormalForm form) {
  if (s.empty()) return {};
  int options = UTF8PROC_STABLE;
  switch (form) {
    case NormalForm::NFC: options |= UTF8PROC_COMPOSE; break;
    case NormalForm::NFD: options |= UTF8PROC_DECOMPOSE; break;
    case NormalForm::NFKC: options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
    case NormalForm::NFKD: options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
  }
  utf8proc_uint8_t* out = nullptr;
  utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                    static_cast<utf8proc_ssize_t>(s.size()), &out,
                                    static_cast<utf8proc_option_t>(options));
  if (n < 0) {
    std::free(out);
    throw Error(std::string("unicode normalisation failed: ") + utf8proc_errmsg(n));
  }
  std::string result(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

}  // namespace sparsecl::text::unicode
