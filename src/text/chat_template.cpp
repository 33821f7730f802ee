// Chat prompt rendering for Llama-3 and ChatML templates (see chat_template.h). Each rule below is the
// C++ transcription of one branch of the published Jinja templates (Meta-Llama-3, SmolLM2, Qwen2.5,
// Qwen3); tests/python/test_chat_template.py checks the output against HF apply_chat_template.
#include "sparsecl/text/chat_template.h"

#include <cstdio>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/text/unicode.h"

namespace sparsecl::text {

namespace {

bool contains(std::string_view s, std::string_view what) { return s.find(what) != std::string_view::npos; }

// Unescapes a Jinja/Python string literal body (\n, \t, \\, \', \").
std::string unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      char c = s[++i];
      switch (c) {
        case 'n': out.push_back('\n'); break;
        case 't': out.push_back('\t'); break;
        case 'r': out.push_back('\r'); break;
        default: out.push_back(c); break;
      }
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

// The default system prompt of a ChatML template: a string literal "<|im_start|>system\n<text><|im_end|>"
// emitted when the conversation has no system message (SmolLM2, Qwen2.5).
std::optional<std::string> find_default_system(std::string_view t) {
  const std::string_view head = "<|im_start|>system";
  size_t pos = 0;
  while ((pos = t.find(head, pos)) != std::string_view::npos) {
    size_t p = pos + head.size();
    pos = p;
    if (t.compare(p, 2, "\\n") == 0) p += 2;
    else if (p < t.size() && t[p] == '\n') p += 1;
    else continue;
    size_t end = t.find("<|im_end|>", p);
    if (end == std::string_view::npos) continue;
    std::string_view body = t.substr(p, end - p);
    bool closes_literal = false;  // an unescaped quote: the literal ends before <|im_end|>
    for (size_t i = 0; i < body.size(); ++i) {
      if (body[i] == '\\') { ++i; continue; }
      if (body[i] == '\'' || body[i] == '"') { closes_literal = true; break; }
    }
    if (closes_literal || body.empty()) continue;
    return unescape(body);
  }
  return std::nullopt;
}

// The rest of the string literal that contains `prefix` (up to its closing quote), unescaped. For
// `set date_string = "` the prefix itself ends with the opening quote.
std::optional<std::string> literal_after(std::string_view t, std::string_view prefix) {
  size_t p = t.find(prefix);
  if (p == std::string_view::npos) return std::nullopt;
  p += prefix.size();
  // The quote character that opened the literal: the last quote before `p`.
  size_t q = t.find_last_of("'\"", p - 1);
  if (q == std::string_view::npos) return std::nullopt;
  const char quote = t[q];
  size_t i = p;
  for (; i < t.size(); ++i) {
    if (t[i] == '\\') { ++i; continue; }
    if (t[i] == quote) break;
  }
  if (i >= t.size()) return std::nullopt;
  return unescape(t.substr(p, i - p));
}

std::string today_string() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[32];
  static const char* kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  std::snprintf(buf, sizeof(buf), "%02d %s %04d", tm.tm_mday, kMonths[tm.tm_mon], tm.tm_year + 1900);
  return buf;
}

// Python str.lstrip/rstrip/strip with a character set of one character.
std::string_view lstrip_char(std::string_view s, char c) {
  size_t i = 0;
  while (i < s.size() && s[i] == c) ++i;
  return s.substr(i);
}
std::string_view rstrip_char(std::string_view s, char c) {
  size_t n = s.size();
  while (n > 0 && s[n - 1] == c) --n;
  return s.substr(0, n);
}
bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

}  // namespace

ChatTemplate::ChatTemplate(Options options) : opt_(std::move(options)) {}

std::unique_ptr<ChatTemplate> ChatTemplate::from_jinja(std::string_view t, std::string_view bos_token,
                                                       std::string* why) {
  auto fail = [&](const std::string& reason) -> std::unique_ptr<ChatTemplate> {
    if (why) *why = reason;
    return nullptr;
  };
  Options o;
  o.generation_prompt_always = !contains(t, "add_generation_prompt");
  if (contains(t, "<|start_header_id|>") && contains(t, "<|end_header_id|>")) {
    if (contains(t, "Cutting Knowledge Date")) {
      // Llama-3.1/3.2: "Cutting Knowledge Date: December 2023\n" literal, then the date variable.
      auto line = literal_after(t, "Cutting Knowledge Date: ");
      if (!line) return fail("Llama-3.1-style template whose knowledge-date line is not one string literal");
      o.knowledge_line = "Cutting Knowledge Date: " + *line;
      if (contains(t, "strftime_now")) {
        o.date_from_clock = true;
      } else if (auto d = literal_after(t, "set date_string = \"")) {
        o.date_string = *d;
      } else {
        return fail("Llama-3.1-style template without a date_string default");
      }
    } else if (contains(t, "date_string") || contains(t, "ipython")) {
      return fail("Llama-3 template with date or ipython handling we do not recognise");
    }
    o.format = ChatFormat::Llama3;
    o.trim_content = contains(t, "| trim") || contains(t, "|trim");
    if (contains(t, "bos_token")) o.bos_text = std::string(bos_token);
    else if (contains(t, "<|begin_of_text|>")) o.bos_text = "<|begin_of_text|>";
    return std::make_unique<ChatTemplate>(o);
  }
  if (contains(t, "<|im_start|>")) {
    o.format = ChatFormat::ChatML;
    o.default_system = find_default_system(t);
    o.qwen_tools = contains(t, "<tool_response>");
    o.qwen3_thinking = contains(t, "</think>") && contains(t, "reasoning_content");
    return std::make_unique<ChatTemplate>(o);
  }
  return fail("neither a ChatML (<|im_start|>) nor a Llama-3 (<|start_header_id|>) template");
}

std::unique_ptr<ChatTemplate> ChatTemplate::from_file(const std::filesystem::path& path) {
  std::string text = read_file(path, "chat template file"), tmpl, bos;
  if (path.extension() == ".jinja") {
    tmpl = text;
  } else {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw Error(path.string() + ": malformed JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("chat_template")) throw Error(path.string() + ": no \"chat_template\"");
    const auto& c = j["chat_template"];
    if (c.is_string()) {
      tmpl = c.get<std::string>();
    } else if (c.is_array()) {
      for (const auto& e : c)
        if (e.is_object() && e.value("name", std::string()) == "default" && e.contains("template"))
          tmpl = e["template"].get<std::string>();
    }
    if (tmpl.empty()) throw Error(path.string() + ": \"chat_template\" has no default template");
    if (j.contains("bos_token")) {
      const auto& b = j["bos_token"];
      if (b.is_string()) bos = b.get<std::string>();
      else if (b.is_object() && b.contains("content")) bos = b["content"].get<std::string>();
    }
  }
  std::string why;
  auto t = from_jinja(tmpl, bos, &why);
  if (!t) throw Error(path.string() + ": unsupported chat template: " + why);
  return t;
}

std::string ChatTemplate::end_of_turn() const {
  return opt_.format == ChatFormat::Llama3 ? "<|eot_id|>" : "<|im_end|>";
}

std::string ChatTemplate::generation_prompt() const {
  return opt_.format == ChatFormat::Llama3 ? "<|start_header_id|>assistant<|end_header_id|>\n\n"
                                           : "<|im_start|>assistant\n";
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  if (messages.empty()) throw Error("chat template: cannot render an empty conversation");
  std::string out;
  const bool gen = add_generation_prompt || opt_.generation_prompt_always;

  if (opt_.format == ChatFormat::Llama3 && !opt_.knowledge_line.empty()) {
    // Llama-3.1/3.2 (no tools): BOS, a system turn with the dates and the trimmed system message, the rest.
    size_t first = 0;
    std::string system;
    if (messages[0].role == "system") {
      system = unicode::python_strip(messages[0].content);
      first = 1;
    }
    out += opt_.bos_text;
    out += "<|start_header_id|>system<|end_header_id|>\n\n" + opt_.knowledge_line + "Today Date: " +
           (opt_.date_from_clock ? today_string() : opt_.date_string) + "\n\n" + system + "<|eot_id|>";
    for (size_t i = first; i < messages.size(); ++i) {
      const auto& m = messages[i];
      if (m.role == "tool" || m.role == "ipython")
        throw Error("chat template: role '" + m.role + "' (tool output) is not supported for Llama-3.1 prompts");
      out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + unicode::python_strip(m.content) + "<|eot_id|>";
    }
    if (gen) out += generation_prompt();
    return out;
  }

  if (opt_.format == ChatFormat::Llama3) {
    for (size_t i = 0; i < messages.size(); ++i) {
      const auto& m = messages[i];
      if (i == 0) out += opt_.bos_text;
      out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n";
      out += opt_.trim_content ? unicode::python_strip(m.content) : m.content;
      out += "<|eot_id|>";
    }
    if (gen) out += generation_prompt();
    return out;
  }

  // ChatML
  const size_t n = messages.size();
  if (opt_.default_system && messages[0].role != "system")
    out += "<|im_start|>system\n" + *opt_.default_system + "<|im_end|>\n";
  // Qwen3: index of the last real user query (not a tool response wrapped as a user turn).
  size_t last_query = n - 1;
  if (opt_.qwen3_thinking) {
    for (size_t k = n; k-- > 0;) {
      const auto& m = messages[k];
      if (m.role == "user" &&
          !(starts_with(m.content, "<tool_response>") && ends_with(m.content, "</tool_response>"))) {
        last_query = k;
        break;
      }
    }
  }
  const bool strict_roles = opt_.qwen_tools;  // Qwen templates render only these roles (others vanish)
  for (size_t i = 0; i < n; ++i) {
    const auto& m = messages[i];
    if (strict_roles && m.role != "system" && m.role != "user" && m.role != "assistant" && m.role != "tool")
      throw Error("chat template: role '" + m.role + "' is not rendered by this (Qwen) template");
    if (m.role == "tool" && opt_.qwen_tools) {
      if (i == 0 || messages[i - 1].role != "tool") out += "<|im_start|>user";
      out += "\n<tool_response>\n" + m.content + "\n</tool_response>";
      if (i + 1 == n || messages[i + 1].role != "tool") out += "<|im_end|>\n";
      continue;
    }
    if (m.role == "assistant" && opt_.qwen3_thinking) {
      std::string_view content = m.content;
      std::string reasoning;
      size_t first_close = m.content.find("</think>");
      if (first_close != std::string::npos) {
        size_t last_close = m.content.rfind("</think>");
        content = lstrip_char(std::string_view(m.content).substr(last_close + 8), '\n');
        std::string_view before = rstrip_char(std::string_view(m.content).substr(0, first_close), '\n');
        size_t open = before.rfind("<think>");
        if (open != std::string_view::npos) before = before.substr(open + 7);
        reasoning = std::string(lstrip_char(before, '\n'));
      }
      if (i > last_query && (i + 1 == n || !reasoning.empty())) {
        out += "<|im_start|>assistant\n<think>\n" + std::string(rstrip_char(lstrip_char(reasoning, '\n'), '\n')) +
               "\n</think>\n\n" + std::string(lstrip_char(content, '\n'));
      } else {
        out += "<|im_start|>assistant\n" + std::string(content);
      }
      out += "<|im_end|>\n";
      continue;
    }
    out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  }
  if (gen) out += generation_prompt();
  return out;
}

}  // namespace sparsecl::text
