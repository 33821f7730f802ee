// JSONL domain files -> token examples -> right-padded or packed batches (see include/sparsecl/data/dataset.h).
// Every line is parsed and validated up front (so a bad record anywhere in the file is reported with
// its line number, not only when it happens to be selected); only the selected records are tokenized.
#include "sparsecl/data/dataset.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "sparsecl/common/error.h"
#include "sparsecl/text/chat_template.h"
#include "sparsecl/text/tokenizer.h"
#include "sparsecl/text/unicode.h"

namespace sparsecl::data {

namespace {

using json = nlohmann::json;

struct Record {
  RecordKind kind = RecordKind::Ids;
  std::string text;
  std::vector<text::ChatMessage> messages;  // Chat: {"prompt","response"} as a user + an assistant turn
  std::vector<int64_t> ids;
};

std::string type_name(const json& j) { return j.type_name(); }

Record parse_record(const std::string& line, const std::string& where) {
  json j;
  try {
    j = json::parse(line);
  } catch (const json::parse_error& e) {
    throw Error(where + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw Error(where + ": a record must be a JSON object, got " + type_name(j));
  const bool has_ids = j.contains("ids"), has_text = j.contains("text"), has_messages = j.contains("messages");
  const bool has_prompt = j.contains("prompt"), has_response = j.contains("response");
  const int forms = int(has_ids) + int(has_text) + int(has_prompt || has_response) + int(has_messages);
  if (forms == 0) throw Error(where + ": record has none of \"text\", \"prompt\"+\"response\", \"messages\", \"ids\"");
  if (forms > 1)
    throw Error(where + ": record mixes the forms \"text\", \"prompt\"/\"response\", \"messages\" and \"ids\"; use one");
  Record r;
  if (has_ids) {
    const json& a = j["ids"];
    if (!a.is_array()) throw Error(where + ": \"ids\" must be a list of integers, got " + type_name(a));
    if (a.empty()) throw Error(where + ": \"ids\" is empty");
    r.ids.reserve(a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      if (!a[i].is_number_integer() || a[i].get<int64_t>() < 0)
        throw Error(where + ": \"ids\"[" + std::to_string(i) + "] must be a non-negative integer, got " + a[i].dump());
      r.ids.push_back(a[i].get<int64_t>());
    }
    r.kind = RecordKind::Ids;
  } else if (has_text) {
    if (!j["text"].is_string()) throw Error(where + ": \"text\" must be a string, got " + type_name(j["text"]));
    r.text = j["text"].get<std::string>();
    r.kind = RecordKind::Text;
  } else if (has_prompt || has_response) {
    if (!has_prompt) throw Error(where + ": record has \"response\" but no \"prompt\"");
    if (!has_response) throw Error(where + ": record has \"prompt\" but no \"response\"");
    if (!j["prompt"].is_string()) throw Error(where + ": \"prompt\" must be a string, got " + type_name(j["prompt"]));
    if (!j["response"].is_string())
      throw Error(where + ": \"response\" must be a string, got " + type_name(j["response"]));
    r.messages = {{"user", j["prompt"].get<std::string>()}, {"assistant", j["response"].get<std::string>()}};
    r.kind = RecordKind::Chat;
  } else {  // has_messages
    const json& m = j["messages"];
    if (!m.is_array() || m.empty()) throw Error(where + ": \"messages\" must be a non-empty list, got " + m.dump().substr(0, 80));
    bool any_assistant = false;
    for (size_t i = 0; i < m.size(); ++i) {
      const std::string at = where + ": \"messages\"[" + std::to_string(i) + "]";
      if (!m[i].is_object() || !m[i].contains("role") || !m[i]["role"].is_string() || !m[i].contains("content") ||
          !m[i]["content"].is_string())
        throw Error(at + " must be an object with string \"role\" and \"content\"");
      r.messages.push_back({m[i]["role"].get<std::string>(), m[i]["content"].get<std::string>()});
      any_assistant = any_assistant || r.messages.back().role == "assistant";
    }
    if (!any_assistant) throw Error(where + ": \"messages\" has no assistant message (the loss is on assistant turns)");
    r.kind = RecordKind::Chat;
  }
  return r;
}

void append(std::vector<int64_t>& dst, const std::vector<int64_t>& src) { dst.insert(dst.end(), src.begin(), src.end()); }

// The loss spans of a rendered conversation `full`: one [begin, end) byte range per assistant message.
// An assistant turn starts where the conversation up to it, rendered with the generation prompt, ends,
// and runs to where the conversation up to and including it ends (its end-of-turn token and whatever
// the template appends); for a {"prompt","response"} record that is everything after the generation
// prompt. Templates that render earlier turns differently once later ones follow (Qwen3 drops the
// <think> block of earlier answers) break that prefix property; their assistant turns are found by
// their content instead (searched after the previous turn) plus the end-of-turn token when it follows.
std::vector<std::pair<size_t, size_t>> assistant_spans(const text::ChatTemplate& tmpl, const text::Tokenizer& tok,
                                                       const std::vector<text::ChatMessage>& messages,
                                                       const std::string& full, const std::string& where) {
  std::vector<std::pair<size_t, size_t>> spans;
  const std::optional<std::string> eot = tok.end_of_turn_id() ? tok.id_to_token(*tok.end_of_turn_id()) : std::nullopt;
  size_t searched_to = 0;
  for (size_t k = 0; k < messages.size(); ++k) {
    if (messages[k].role != "assistant") continue;
    const std::vector<text::ChatMessage> before(messages.begin(), messages.begin() + static_cast<std::ptrdiff_t>(k));
    const std::vector<text::ChatMessage> upto(messages.begin(), messages.begin() + static_cast<std::ptrdiff_t>(k) + 1);
    const std::string head = k == 0 ? std::string() : tmpl.render(before, /*add_generation_prompt=*/true);
    const std::string turn = k + 1 == messages.size() ? full : tmpl.render(upto, /*add_generation_prompt=*/false);
    if (head.size() <= turn.size() && full.compare(0, head.size(), head) == 0 && full.compare(0, turn.size(), turn) == 0 &&
        head.size() >= searched_to) {
      spans.emplace_back(head.size(), turn.size());
      searched_to = turn.size();
      continue;
    }
    size_t pos = std::string::npos, len = 0;
    // Candidates: the content, stripped (Llama's `trim`), and the answer after a reasoning block (Qwen3 and
    // DeepSeek-R1 templates keep only what follows the last </think> of an earlier turn).
    const std::string& c = messages[k].content;
    const size_t think = c.rfind("</think>");
    const std::string answer = think == std::string::npos ? std::string() : text::unicode::python_strip(c.substr(think + 8));
    for (const std::string& content : {c, text::unicode::python_strip(c), answer}) {
      if (content.empty()) continue;
      pos = full.find(content, searched_to);
      len = content.size();
      if (pos != std::string::npos) break;
    }
    if (pos == std::string::npos)
      throw Error(where + ": cannot locate assistant message " + std::to_string(k) +
                  " in the rendered conversation (the chat template rewrites it)");
    size_t end = pos + len;
    if (eot) {  // the end-of-turn token, after optional spaces / newlines
      size_t p = end;
      while (p < full.size() && (full[p] == ' ' || full[p] == '\n')) ++p;
      if (full.compare(p, eot->size(), *eot) == 0) end = p + eot->size();
    }
    spans.emplace_back(pos, end);
    searched_to = end;
  }
  return spans;
}

// Renders `messages` through the chat template and tokenizes the result (no added specials: the template
// writes them) with the loss on the assistant spans. The span boundaries stay token boundaries: the
// whole text is encoded at once when every boundary falls between its tokens, else piece by piece.
void tokenize_conversation(const text::ChatTemplate& tmpl, const text::Tokenizer& tok,
                           const std::vector<text::ChatMessage>& messages, const std::string& where, Example& ex) {
  const std::string full = tmpl.render(messages, /*add_generation_prompt=*/false);
  const auto spans = assistant_spans(tmpl, tok, messages, full, where);
  std::vector<std::pair<size_t, bool>> cuts;  // (byte offset, loss on the piece that starts there)
  size_t at = 0;
  for (const auto& [b, e] : spans) {
    if (b > at) cuts.emplace_back(at, false);
    if (e > b) cuts.emplace_back(b, true);
    at = e;
  }
  if (at < full.size()) cuts.emplace_back(at, false);
  auto piece_end = [&](size_t i) { return i + 1 < cuts.size() ? cuts[i + 1].first : full.size(); };

  ex.ids = tok.encode(full, false);
  ex.loss_mask.assign(ex.ids.size(), 0);
  bool boundaries_are_token_boundaries = true;
  std::vector<size_t> token_starts;  // token index where each piece starts
  for (const auto& cut : cuts) {
    const std::vector<int64_t> prefix = tok.encode(std::string_view(full).substr(0, cut.first), false);
    if (prefix.size() > ex.ids.size() || !std::equal(prefix.begin(), prefix.end(), ex.ids.begin())) {
      boundaries_are_token_boundaries = false;
      break;
    }
    token_starts.push_back(prefix.size());
  }
  if (boundaries_are_token_boundaries) {
    for (size_t i = 0; i < cuts.size(); ++i) {
      const size_t end = i + 1 < cuts.size() ? token_starts[i + 1] : ex.ids.size();
      if (cuts[i].second) std::fill(ex.loss_mask.begin() + static_cast<std::ptrdiff_t>(token_starts[i]),
                                    ex.loss_mask.begin() + static_cast<std::ptrdiff_t>(end), 1);
    }
    return;
  }
  // The tokenizer merged across a boundary: tokenize the pieces separately.
  ex.ids.clear();
  ex.loss_mask.clear();
  for (size_t i = 0; i < cuts.size(); ++i) {
    const auto piece = tok.encode(std::string_view(full).substr(cuts[i].first, piece_end(i) - cuts[i].first), false);
    append(ex.ids, piece);
    ex.loss_mask.insert(ex.loss_mask.end(), piece.size(), cuts[i].second ? 1 : 0);
  }
}

Example tokenize(const Record& r, const text::Tokenizer* tok, int64_t max_length, bool plain_chat_fallback,
                 const std::string& where) {
  Example ex;
  ex.kind = r.kind;
  if (r.kind == RecordKind::Ids) {
    ex.ids = r.ids;
    ex.loss_mask.assign(ex.ids.size(), 1);
  } else {
    if (!tok) throw Error(where + ": a \"text\" or \"prompt\"/\"response\" record needs a tokenizer (none given)");
    if (r.kind == RecordKind::Text) {
      ex.ids = tok->encode(r.text, /*add_special_tokens=*/true);
      ex.loss_mask.assign(ex.ids.size(), 1);
    } else if (const text::ChatTemplate* tmpl = tok->chat_template()) {
      tokenize_conversation(*tmpl, *tok, r.messages, where, ex);
    } else if (plain_chat_fallback && r.messages.size() == 2 && r.messages[0].role == "user" &&
               r.messages[1].role == "assistant") {  // a {"prompt","response"} record
      ex.ids = tok->encode(r.messages[0].content + "\n\n", true);
      const size_t n_prompt = ex.ids.size();
      append(ex.ids, tok->encode(r.messages[1].content, false));
      ex.loss_mask.assign(ex.ids.size(), 0);
      std::fill(ex.loss_mask.begin() + static_cast<std::ptrdiff_t>(n_prompt), ex.loss_mask.end(), 1);
    } else {
      throw Error(where + ": a \"prompt\"/\"response\" or \"messages\" record needs a tokenizer with a chat template "
                          "(this one has none)");
    }
  }
  if (ex.ids.empty()) throw Error(where + ": record tokenizes to no tokens");
  if (max_length > 0 && static_cast<int64_t>(ex.ids.size()) > max_length) {
    ex.ids.resize(max_length);
    ex.loss_mask.resize(max_length);
    ex.truncated = true;
  }
  return ex;
}

}  // namespace

uint64_t uniform_below(std::mt19937_64& rng, uint64_t bound) {
  if (bound <= 1) return 0;
  // Reject the top partial bucket so that every residue is equally likely.
  const uint64_t limit = UINT64_MAX - (UINT64_MAX % bound + 1) % bound;
  uint64_t x;
  do x = rng();
  while (x > limit);
  return x % bound;
}

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  std::mt19937_64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[i], p[uniform_below(rng, static_cast<uint64_t>(i) + 1)]);
  return p;
}

Example tokenize_record(const std::string& json_line, const text::Tokenizer* tokenizer, int64_t max_length,
                        bool plain_chat_fallback, const std::string& where) {
  Example ex = tokenize(parse_record(json_line, where), tokenizer, max_length, plain_chat_fallback, where);
  return ex;
}

std::vector<Example> load_jsonl(const std::filesystem::path& path, const text::Tokenizer* tokenizer,
                                const LoadOptions& options) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot open");
  std::vector<Record> records;
  std::vector<int64_t> lines;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;  // blank lines are allowed
    records.push_back(parse_record(line, path.string() + ":" + std::to_string(lineno)));
    lines.push_back(lineno);
  }
  if (in.bad()) throw Error(path.string() + ": read error");
  if (records.empty()) throw Error(path.string() + ": no records");

  const int64_t n = static_cast<int64_t>(records.size());
  std::vector<int64_t> order;
  if (options.shuffle) {
    order = seeded_permutation(n, options.seed);
  } else {
    order.resize(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
  }
  if (options.max_samples > 0 && options.max_samples < n) order.resize(options.max_samples);

  std::vector<Example> out;
  out.reserve(order.size());
  for (int64_t i : order) {
    const std::string where = path.string() + ":" + std::to_string(lines[i]);
    Example ex = tokenize(records[i], tokenizer, options.max_length, options.plain_chat_fallback, where);
    ex.line = lines[i];
    out.push_back(std::move(ex));
  }
  return out;
}

Batch make_batch(const std::vector<Example>& examples, size_t begin, size_t end, int64_t pad_id) {
  if (begin >= end || end > examples.size()) throw Error("make_batch: empty or out-of-range example range");
  const int64_t B = static_cast<int64_t>(end - begin);
  int64_t T = 0;
  for (size_t i = begin; i < end; ++i) T = std::max<int64_t>(T, examples[i].ids.size());
  Batch b;
  b.input_ids = at::full({B, T}, pad_id, at::kLong);      // [B, T]
  b.attention_mask = at::zeros({B, T}, at::kLong);        // [B, T]
  b.labels = at::full({B, T}, int64_t{-100}, at::kLong);  // [B, T]
  auto ids = b.input_ids.accessor<int64_t, 2>();
  auto mask = b.attention_mask.accessor<int64_t, 2>();
  auto labels = b.labels.accessor<int64_t, 2>();
  for (int64_t r = 0; r < B; ++r) {
    const Example& ex = examples[begin + r];
    const int64_t n = static_cast<int64_t>(ex.ids.size());
    for (int64_t t = 0; t < n; ++t) {
      ids[r][t] = ex.ids[t];
      mask[r][t] = 1;
      if (ex.loss_mask[t]) {
        labels[r][t] = ex.ids[t];
        if (t >= 1) ++b.num_label_tokens;
      }
    }
    b.num_tokens += n;
    b.lengths.push_back(n);
  }
  return b;
}

std::vector<std::vector<size_t>> pack_first_fit(const std::vector<int64_t>& lengths, int64_t max_rows,
                                                int64_t max_length) {
  if (max_rows < 1 || max_length < 1) throw Error("pack_first_fit: max_rows and max_length must be >= 1");
  std::vector<std::vector<size_t>> rows;
  std::vector<int64_t> used;  // tokens per row
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t n = lengths[i];
    if (n < 1 || n > max_length)
      throw Error("packing: example of " + std::to_string(n) + " tokens does not fit max_length " +
                  std::to_string(max_length) + " (train.max_length; examples are truncated to it when loaded)");
    size_t r = 0;
    while (r < rows.size() && used[r] + n > max_length) ++r;
    if (r == rows.size()) {
      if (static_cast<int64_t>(rows.size()) == max_rows) break;  // fits nowhere: the batch is full
      rows.emplace_back();
      used.push_back(0);
    }
    rows[r].push_back(i);
    used[r] += n;
  }
  return rows;
}

Batch make_packed_batch(const std::vector<std::vector<const Example*>>& rows, int64_t pad_id) {
  if (rows.empty()) throw Error("make_packed_batch: no rows");
  const int64_t B = static_cast<int64_t>(rows.size());
  int64_t T = 0;
  for (const auto& row : rows) {
    if (row.empty()) throw Error("make_packed_batch: empty row");
    int64_t n = 0;
    for (const Example* ex : row) n += static_cast<int64_t>(ex->ids.size());
    T = std::max(T, n);
  }
  Batch b;
  b.input_ids = at::full({B, T}, pad_id, at::kLong);      // [B, T]
  b.attention_mask = at::zeros({B, T}, at::kLong);        // [B, T]
  b.labels = at::full({B, T}, int64_t{-100}, at::kLong);  // [B, T]
  b.segment_ids = at::zeros({B, T}, at::kLong);           // [B, T]
  auto ids = b.input_ids.accessor<int64_t, 2>();
  auto mask = b.attention_mask.accessor<int64_t, 2>();
  auto labels = b.labels.accessor<int64_t, 2>();
  auto segments = b.segment_ids.accessor<int64_t, 2>();
  for (int64_t r = 0; r < B; ++r) {
    int64_t pos = 0;
    for (size_t s = 0; s < rows[r].size(); ++s) {
      const Example& ex = *rows[r][s];
      const int64_t n = static_cast<int64_t>(ex.ids.size());
      for (int64_t t = 0; t < n; ++t, ++pos) {
        ids[r][pos] = ex.ids[t];
        mask[r][pos] = 1;
        segments[r][pos] = static_cast<int64_t>(s) + 1;
        // t = 0 is never a target: within the example nothing precedes it, and across the boundary the
        // previous example's last token must not predict it.
        if (t >= 1 && ex.loss_mask[t]) {
          labels[r][pos] = ex.ids[t];
          ++b.num_label_tokens;
        }
      }
    }
    b.num_tokens += pos;
    b.lengths.push_back(pos);
  }
  return b;
}

int64_t pad_id_for(const text::Tokenizer* tokenizer) {
  if (!tokenizer) return 0;
  if (auto p = tokenizer->pad_id()) return *p;
  if (auto e = tokenizer->eos_id()) return *e;
  return 0;
}

Summary summarize(const std::vector<Example>& examples) {
  Summary s;
  for (const auto& ex : examples) {
    ++s.examples;
    s.tokens += static_cast<int64_t>(ex.ids.size());
    s.max_length = std::max<int64_t>(s.max_length, ex.ids.size());
    for (uint8_t m : ex.loss_mask) s.loss_tokens += m;
    s.truncated += ex.truncated ? 1 : 0;
  }
  return s;
}

}  // namespace sparsecl::data
