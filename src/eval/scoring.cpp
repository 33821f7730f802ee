// Task scorers (include/sparsecl/eval/scoring.h): held-out loss, multiple choice by log-likelihood,
// GSM8K exact match after greedy generation, code pass@1 in the sandbox (or the held-out loss fallback).
#include "sparsecl/eval/scoring.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/common/progress.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/data/dataset.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/generate.h"
#include "sparsecl/text/tokenizer.h"
#include "sparsecl/train/trainer.h"

namespace sparsecl::eval {
namespace {

// Every JSON object of a JSONL file (blank lines skipped), at most `max_samples` (0 = all).
std::vector<nlohmann::json> read_jsonl(const std::filesystem::path& file, int64_t max_samples) {
  std::ifstream in(file);
  if (!in) throw Error("cannot open eval file " + file.string());
  std::vector<nlohmann::json> out;
  std::string line;
  int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      out.push_back(nlohmann::json::parse(line));
    } catch (const std::exception& e) {
      throw Error(file.string() + ":" + std::to_string(number) + ": invalid JSON: " + e.what());
    }
    if (!out.back().is_object()) throw Error(file.string() + ":" + std::to_string(number) + ": not a JSON object");
    if (max_samples > 0 && static_cast<int64_t>(out.size()) >= max_samples) break;
  }
  return out;
}

std::string get_string(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key) || !j[key].is_string()) throw Error(where + ": missing string field \"" + key + "\"");
  return j[key].get<std::string>();
}

// Token-level log-probabilities of `targets` under `logits`: logits [N, V] (any float dtype),
// targets [N] int64 -> [N] fp32.
at::Tensor target_logprobs(const at::Tensor& logits, const at::Tensor& targets) {
  const auto logp = at::log_softmax(logits.to(at::kFloat), -1);  // [N, V]
  return logp.gather(1, targets.unsqueeze(1)).squeeze(1);         // [N]
}

}  // namespace

// ---- held-out loss ----------------------------------------------------------------------------------------

LossResult heldout_loss(const model::Decoder& decoder, const text::Tokenizer* tokenizer,
                        const std::filesystem::path& file, const EvalOptions& options) {
  data::LoadOptions load;
  load.max_length = options.max_length;
  load.max_samples = options.max_samples;
  load.shuffle = false;
  load.plain_chat_fallback = true;
  const auto examples = data::load_jsonl(file, tokenizer, load);
  Progress bar("loss " + file.filename().string(), static_cast<int64_t>(examples.size()), options.progress && dist::is_main());
  const train::HeldoutLoss held =
      train::heldout_loss(decoder, examples, std::max<int64_t>(options.batch_size, 1), data::pad_id_for(tokenizer), &bar);
  bar.finish();
  LossResult r;
  r.examples = static_cast<int64_t>(examples.size());
  r.loss_tokens = held.label_tokens;
  r.loss = held.loss;
  r.perplexity = std::exp(r.loss);
  return r;
}

// ---- multiple choice ----------------------------------------------------------------------------------------

// "answer": an index into the choices, or a string naming one: the text of exactly one choice, else a
// letter A, B, ... (ARC / MMLU style answer keys). Anything else is an error, never a guess.
static int64_t mc_answer_index(const nlohmann::json& j, const std::vector<std::string>& choices, const std::string& where) {
  if (!j.contains("answer")) throw Error(where + ": no \"answer\"");
  const nlohmann::json& a = j["answer"];
  if (a.is_number_integer()) return a.get<int64_t>();
  if (!a.is_string())
    throw Error(where + ": \"answer\" must be an index, a choice's text or a letter, got " + a.dump());
  const std::string s = a.get<std::string>();
  const auto n_equal = std::count(choices.begin(), choices.end(), s);
  if (n_equal == 1) return std::find(choices.begin(), choices.end(), s) - choices.begin();
  if (n_equal == 0 && s.size() == 1 && s[0] >= 'A' && s[0] <= 'Z') return s[0] - 'A';
  throw Error(where + ": \"answer\" '" + s + "' is neither one choice's text nor a letter");
}

std::vector<McRecord> load_mc(const std::filesystem::path& file, int64_t max_samples) {
  std::vector<McRecord> out;
  int64_t i = 0;
  for (const auto& j : read_jsonl(file, max_samples)) {
    const std::string where = file.string() + " record " + std::to_string(++i);
    McRecord r;
    r.question = get_string(j, "question", where);
    if (!j.contains("choices") || !j["choices"].is_array() || j["choices"].empty())
      throw Error(where + ": \"choices\" must be a non-empty list of strings");
    for (const auto& c : j["choices"]) {
      if (!c.is_string()) throw Error(where + ": \"choices\" must be a non-empty list of strings");
      r.choices.push_back(c.get<std::string>());
    }
    r.answer = mc_answer_index(j, r.choices, where);
    if (r.answer < 0 || r.answer >= static_cast<int64_t>(r.choices.size()))
      throw Error(where + ": \"answer\" " + std::to_string(r.answer) + " is outside the choices");
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<double> continuation_logliks(const model::Decoder& decoder, const std::vector<LoglikRequest>& requests,
                                         const EvalOptions& options) {
  at::NoGradGuard no_grad;
  std::vector<double> out(requests.size(), 0.0);
  const size_t bs = static_cast<size_t>(std::max<int64_t>(options.batch_size, 1));
  const int64_t max_len = options.max_length > 1 ? options.max_length : INT64_MAX;
  for (size_t b = 0; b < requests.size(); b += bs) {
    if (!dist::owns(static_cast<int64_t>(b / bs))) continue;  // data parallel: batches round-robin
    const size_t e = std::min(requests.size(), b + bs);
    // Per row: the sequence fed (context + continuation minus its last token) and the continuation span.
    std::vector<std::vector<int64_t>> rows;
    std::vector<int64_t> cont_start, cont_len;
    int64_t T = 1;
    for (size_t i = b; i < e; ++i) {
      const auto& r = requests[i];
      if (r.continuation.empty()) throw Error("continuation_logliks: empty continuation");
      std::vector<int64_t> seq = r.context;
      seq.insert(seq.end(), r.continuation.begin(), r.continuation.end());
      if (static_cast<int64_t>(seq.size()) > max_len + 1)  // keep the last tokens (left truncation)
        seq.erase(seq.begin(), seq.end() - (max_len + 1));
      if (seq.size() < 2) throw Error("continuation_logliks: a request needs at least two tokens (add a BOS)");
      const int64_t n_cont = std::min<int64_t>(static_cast<int64_t>(r.continuation.size()),
                                               static_cast<int64_t>(seq.size()) - 1);
      // Target token k of seq (k >= 1) is predicted at input position k - 1.
      cont_start.push_back(static_cast<int64_t>(seq.size()) - n_cont - 1);
      cont_len.push_back(n_cont);
      rows.push_back(std::move(seq));
      T = std::max<int64_t>(T, static_cast<int64_t>(rows.back().size()) - 1);
    }
    const int64_t B = static_cast<int64_t>(rows.size());
    auto ids = at::zeros({B, T}, at::kLong);      // [B, T] inputs (right-padded with 0)
    auto targets = at::zeros({B, T}, at::kLong);  // [B, T] next tokens
    auto sel = at::zeros({B, T}, at::kBool);      // [B, T] continuation positions
    auto ids_a = ids.accessor<int64_t, 2>();
    auto tgt_a = targets.accessor<int64_t, 2>();
    auto sel_a = sel.accessor<bool, 2>();
    for (int64_t i = 0; i < B; ++i) {
      const auto& seq = rows[static_cast<size_t>(i)];
      const int64_t L = static_cast<int64_t>(seq.size()) - 1;
      for (int64_t t = 0; t < L; ++t) {
        ids_a[i][t] = seq[static_cast<size_t>(t)];
        tgt_a[i][t] = seq[static_cast<size_t>(t + 1)];
        sel_a[i][t] = t >= cont_start[static_cast<size_t>(i)];
      }
    }
    model::ForwardInput in;
    in.input_ids = ids.to(decoder.device());  // [B, T] right-padded: causal attention alone suffices
    model::ForwardOptions fo;
    fo.logits = false;  // the LM head only for the continuation positions, not [B, T, V]
    const auto hidden = decoder.forward(in, fo).last_hidden;  // [B, T, H] on the output device
    const auto sel_d = sel.to(hidden.device());
    const auto logits = at::linear(hidden.index({sel_d}), decoder.head_weight());  // [N, V]
    const auto lp = target_logprobs(logits, targets.to(hidden.device()).index({sel_d}));  // [N]
    const auto lp_cpu = lp.to(at::kCPU, at::kDouble).contiguous();
    const double* p = lp_cpu.data_ptr<double>();
    // index({mask}) walks row-major, so row i's continuation tokens are contiguous, in order.
    int64_t off = 0;
    for (int64_t i = 0; i < B; ++i) {
      double s = 0;
      for (int64_t k = 0; k < cont_len[static_cast<size_t>(i)]; ++k) s += p[off + k];
      off += cont_len[static_cast<size_t>(i)];
      out[b + static_cast<size_t>(i)] = s;
    }
  }
  if (dist::active()) {  // every rank filled its batches' entries, the others are 0: the sum is exact
    at::Tensor all = at::tensor(out, at::TensorOptions().dtype(at::kDouble));  // [requests]
    dist::all_reduce_sum(all);
    std::copy(all.data_ptr<double>(), all.data_ptr<double>() + all.numel(), out.begin());
  }
  return out;
}

std::string mc_context(const McRecord& record) { return "Question: " + record.question + "\nAnswer:"; }
std::string mc_continuation(const std::string& choice) { return " " + choice; }

int64_t utf8_length(std::string_view text) {
  int64_t n = 0;
  for (unsigned char c : text) n += (c & 0xC0) != 0x80;
  return n;
}

LoglikRequest mc_request(const text::Tokenizer& tokenizer, const std::string& context, const std::string& continuation,
                         bool add_special_tokens) {
  LoglikRequest r;
  r.context = tokenizer.encode(context, add_special_tokens);
  const auto whole = tokenizer.encode(context + continuation, add_special_tokens);
  if (whole.size() > r.context.size() && std::equal(r.context.begin(), r.context.end(), whole.begin())) {
    r.continuation.assign(whole.begin() + static_cast<std::ptrdiff_t>(r.context.size()), whole.end());
  } else {
    r.continuation = tokenizer.encode(continuation, false);
  }
  if (r.context.empty() && tokenizer.bos_id()) r.context.push_back(*tokenizer.bos_id());
  return r;
}

McResult score_mc(const model::Decoder& decoder, const text::Tokenizer& tokenizer, const std::vector<McRecord>& records,
                  const EvalOptions& options) {
  McResult result;
  const size_t chunk = 64;  // records per round of requests (bounds memory; batching is inside)
  Progress bar("mc", static_cast<int64_t>(records.size()), options.progress);
  for (size_t b = 0; b < records.size(); b += chunk) {
    const size_t e = std::min(records.size(), b + chunk);
    std::vector<LoglikRequest> reqs;
    for (size_t i = b; i < e; ++i)
      for (const auto& c : records[i].choices) reqs.push_back(mc_request(tokenizer, mc_context(records[i]), mc_continuation(c), options.mc_add_special_tokens));
    const auto ll = continuation_logliks(decoder, reqs, options);
    size_t k = 0;
    for (size_t i = b; i < e; ++i) {
      McItem item;
      item.answer = records[i].answer;
      double best = -INFINITY, best_norm = -INFINITY;
      for (size_t c = 0; c < records[i].choices.size(); ++c, ++k) {
        // lm-evaluation-harness: completion_len = len(choice), the choice text without the delimiter.
        const int64_t chars = utf8_length(records[i].choices[c]);
        item.loglik.push_back(ll[k]);
        item.norm_length.push_back(chars);
        if (ll[k] > best) best = ll[k], item.pred = static_cast<int64_t>(c);
        const double norm = ll[k] / static_cast<double>(std::max<int64_t>(chars, 1));
        if (norm > best_norm) best_norm = norm, item.pred_norm = static_cast<int64_t>(c);
      }
      result.acc += item.pred == item.answer;
      result.acc_norm += item.pred_norm == item.answer;
      result.items.push_back(std::move(item));
    }
    bar.update(static_cast<int64_t>(e - b));
  }
  bar.finish();
  result.n = static_cast<int64_t>(records.size());
  if (result.n > 0) {
    result.acc /= static_cast<double>(result.n);
    result.acc_norm /= static_cast<double>(result.n);
  }
  return result;
}

// ---- GSM8K ------------------------------------------------------------------------------------------------------

std::vector<GenRecord> load_gen(const std::filesystem::path& file, int64_t max_samples) {
  std::vector<GenRecord> out;
  int64_t i = 0;
  for (const auto& j : read_jsonl(file, max_samples)) {
    const std::string where = file.string() + " record " + std::to_string(++i);
    out.push_back({get_string(j, "prompt", where), get_string(j, "answer", where)});
  }
  return out;
}

std::optional<std::string> extract_final_number(std::string_view text) {
  static const std::regex number(R"([-+]?\$?\s?\d[\d,]*(?:\.\d+)?)");
  std::string s(text);
  const auto hashes = s.rfind("####");
  const auto find_last = [&](const std::string& t, bool first_only) -> std::optional<std::string> {
    std::optional<std::string> last;
    for (auto it = std::sregex_iterator(t.begin(), t.end(), number); it != std::sregex_iterator(); ++it) {
      last = it->str();
      if (first_only) break;
    }
    return last;
  };
  std::optional<std::string> raw;
  if (hashes != std::string::npos) raw = find_last(s.substr(hashes + 4), true);
  if (!raw) raw = find_last(s, false);
  if (!raw) return std::nullopt;
  std::string n;
  for (char c : *raw)
    if (c != ',' && c != '$' && c != '+' && c != ' ' && c != '\t' && c != '\n') n += c;
  while (!n.empty() && n.back() == '.') n.pop_back();
  return n;
}

bool numbers_match(const std::string& predicted, const std::string& reference) {
  const auto norm = [](const std::string& x) {
    std::string n;
    for (char c : x)
      if (c != ',' && c != '$' && c != ' ') n += c;
    while (!n.empty() && n.back() == '.') n.pop_back();
    return n;
  };
  const std::string a = norm(predicted), b = norm(reference);
  if (a.empty() || b.empty()) return false;
  if (a == b) return true;
  try {
    size_t ia = 0, ib = 0;
    const long double x = std::stold(a, &ia), y = std::stold(b, &ib);
    return ia == a.size() && ib == b.size() && x == y;
  } catch (const std::exception&) {
    return false;
  }
}

std::string cut_at_stop(const std::string& text, const std::vector<std::string>& stop_sequences) {
  size_t cut = text.size();
  for (const auto& s : stop_sequences)
    if (!s.empty()) cut = std::min(cut, text.find(s));
  return text.substr(0, cut);
}

std::vector<int64_t> gen_prompt_ids(const text::Tokenizer& tokenizer, const std::string& prompt, const GenOptions& gen) {
  if (gen.use_chat_template && tokenizer.chat_template())
    return tokenizer.encode(tokenizer.chat_template()->render({{"user", prompt}}, true), false);
  return tokenizer.encode("Question: " + prompt + "\nAnswer:", true);
}

namespace {

// Stop ids for generation: EOS and the template's end-of-turn token.
std::vector<int64_t> stop_ids_for(const text::Tokenizer& tokenizer) {
  std::vector<int64_t> ids;
  if (tokenizer.eos_id()) ids.push_back(*tokenizer.eos_id());
  if (tokenizer.end_of_turn_id()) ids.push_back(*tokenizer.end_of_turn_id());
  return ids;
}

std::vector<std::string> generate_texts(const model::Decoder& decoder, const text::Tokenizer& tokenizer,
                                        const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens,
                                        const EvalOptions& options, const std::string& label) {
  model::GenerateOptions g;
  g.max_new_tokens = max_new_tokens;
  g.stop_ids = stop_ids_for(tokenizer);
  const size_t bs = static_cast<size_t>(std::max<int64_t>(options.batch_size, 1));
  // Generated ids per prompt: [P, 1 + max_new_tokens] int64, column 0 the count. Data parallel: each rank
  // fills the rows of its batches (round-robin), the all-reduce sums them with the others' zeros.
  at::Tensor generated = at::zeros({static_cast<int64_t>(prompts.size()), 1 + max_new_tokens}, at::kLong);
  auto gen_a = generated.accessor<int64_t, 2>();
  Progress bar(label, static_cast<int64_t>(prompts.size()), options.progress && dist::is_main());
  for (size_t b = 0; b < prompts.size(); b += bs) {
    if (!dist::owns(static_cast<int64_t>(b / bs))) continue;
    const std::vector<std::vector<int64_t>> chunk(prompts.begin() + static_cast<std::ptrdiff_t>(b),
                                                  prompts.begin() + static_cast<std::ptrdiff_t>(std::min(prompts.size(), b + bs)));
    int64_t produced = 0, row = static_cast<int64_t>(b);
    for (const auto& ids : model::greedy_generate(decoder, chunk, g)) {
      if (static_cast<int64_t>(ids.size()) > max_new_tokens)
        throw Error("generate: " + std::to_string(ids.size()) + " new tokens exceed max_new_tokens (internal)");
      gen_a[row][0] = static_cast<int64_t>(ids.size());
      for (size_t t = 0; t < ids.size(); ++t) gen_a[row][static_cast<int64_t>(t) + 1] = ids[t];
      produced += static_cast<int64_t>(ids.size());
      ++row;
    }
    bar.update(static_cast<int64_t>(chunk.size()), produced);
  }
  bar.finish();
  dist::all_reduce_sum(generated);
  std::vector<std::string> out;
  for (int64_t i = 0; i < generated.size(0); ++i) {
    const int64_t* row = generated[i].data_ptr<int64_t>();
    out.push_back(tokenizer.decode(std::vector<int64_t>(row + 1, row + 1 + row[0]), true));
  }
  return out;
}

}  // namespace

GenResult score_gsm8k(const model::Decoder& decoder, const text::Tokenizer& tokenizer,
                      const std::vector<GenRecord>& records, const EvalOptions& options, const GenOptions& gen) {
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& r : records) prompts.push_back(gen_prompt_ids(tokenizer, r.prompt, gen));
  const auto texts = generate_texts(decoder, tokenizer, prompts, gen.max_new_tokens, options, "gsm8k");
  GenResult result;
  for (size_t i = 0; i < records.size(); ++i) {
    GenItem item;
    item.completion = cut_at_stop(texts[i], gen.stop_sequences);
    item.predicted = extract_final_number(item.completion).value_or("");
    item.reference = records[i].answer;
    item.correct = numbers_match(item.predicted, item.reference);
    result.exact_match += item.correct;
    result.items.push_back(std::move(item));
  }
  result.n = static_cast<int64_t>(records.size());
  if (result.n > 0) result.exact_match /= static_cast<double>(result.n);
  return result;
}

// ---- code ---------------------------------------------------------------------------------------------------------

std::vector<CodeRecord> load_code(const std::filesystem::path& file, int64_t max_samples) {
  std::vector<CodeRecord> out;
  int64_t i = 0;
  for (const auto& j : read_jsonl(file, max_samples)) {
    const std::string where = file.string() + " record " + std::to_string(++i);
    CodeRecord r{get_string(j, "prompt", where), get_string(j, "tests", where), get_string(j, "entry_point", where),
                 get_string(j, "prompt_style", where)};
    if (r.prompt_style != "completion" && r.prompt_style != "instruction")
      throw Error(where + ": prompt_style must be \"completion\" or \"instruction\", got \"" + r.prompt_style + "\"");
    out.push_back(std::move(r));
  }
  return out;
}

namespace {

// The body of the first fenced code block (```python or ```), nullopt when there is none.
std::optional<std::string> fenced_block(const std::string& text) {
  const auto open = text.find("```");
  if (open == std::string::npos) return std::nullopt;
  auto start = text.find('\n', open);
  if (start == std::string::npos) return std::nullopt;
  ++start;
  const auto close = text.find("```", start);
  return text.substr(start, close == std::string::npos ? std::string::npos : close - start);
}

std::string code_prompt(const CodeRecord& r, bool chat) {
  if (!chat) return r.prompt;
  if (r.prompt_style == "completion")
    return "Complete the following Python function. Reply with the complete function in one ```python code block.\n\n```python\n" +
           r.prompt + "```";
  return r.prompt + "\n\nReply with the Python function `" + r.entry_point + "` in one ```python code block.";
}

}  // namespace

std::string build_program(const CodeRecord& record, const std::string& model_output) {
  const auto block = fenced_block(model_output);
  if (record.prompt_style == "instruction") return (block ? *block : model_output) + "\n\n" + record.tests + "\n";
  if (block) {
    const bool defines = block->find("def " + record.entry_point + "(") != std::string::npos;
    return record.prompt + (defines ? "\n\n" : "") + *block + "\n\n" + record.tests + "\n";
  }
  // A raw completion of the function body, cut where HumanEval's reference harness cuts it.
  const std::string body = cut_at_stop(model_output, {"\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\n```"});
  return record.prompt + body + "\n\n" + record.tests + "\n";
}

CodeResult score_code(const model::Decoder& decoder, const text::Tokenizer& tokenizer,
                      const std::vector<CodeRecord>& records, const EvalOptions& options, const CodeOptions& code) {
  CodeResult result;
  if (!code.execute) {
    if (code.heldout_file.empty())
      throw Error("code scoring: execution of generated code is not enabled and no held-out file was given");
    result.loss = heldout_loss(decoder, &tokenizer, code.heldout_file, options);
    result.score = result.loss->loss;
    result.n = result.loss->examples;
    result.method = "heldout_loss on " + code.heldout_file.filename().string() +
                    " (pass@1 not run: execution of generated code was not enabled)";
    return result;
  }
  const bool chat = code.use_chat_template && tokenizer.chat_template();
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& r : records) {
    const std::string p = code_prompt(r, chat);
    prompts.push_back(chat ? tokenizer.encode(tokenizer.chat_template()->render({{"user", p}}, true), false)
                           : tokenizer.encode(p, true));
  }
  const auto outputs = generate_texts(decoder, tokenizer, prompts, code.max_new_tokens, options, "code");
  result.network_isolated = result.fs_isolated = result.pids_isolated = !records.empty();
  // Data parallel: generation is split, execution is rank 0's (the sandbox is cheap next to generation),
  // which sends every item's outcome [passed, network, fs, pids] to the others.
  at::Tensor outcome = at::zeros({static_cast<int64_t>(records.size()), 4}, at::kLong);
  for (size_t i = 0; i < records.size(); ++i) {
    CodeItem item;
    item.output = outputs[i];
    item.program = build_program(records[i], outputs[i]);
    if (dist::is_main()) {
      const auto run = run_python_sandboxed(item.program, code.sandbox);
      item.sandbox = describe(run);
      outcome[static_cast<int64_t>(i)] = at::tensor(std::vector<int64_t>{run.passed, run.network_isolated, run.fs_isolated,
                                                                         run.pids_isolated});
    } else {
      item.sandbox = "run by rank 0";
    }
    result.items.push_back(std::move(item));
  }
  dist::broadcast(outcome);
  for (size_t i = 0; i < records.size(); ++i) {
    const auto o = outcome[static_cast<int64_t>(i)];
    result.items[i].passed = o[0].item<int64_t>() != 0;
    result.network_isolated = result.network_isolated && o[1].item<int64_t>() != 0;
    result.fs_isolated = result.fs_isolated && o[2].item<int64_t>() != 0;
    result.pids_isolated = result.pids_isolated && o[3].item<int64_t>() != 0;
    result.score += result.items[i].passed;
  }
  if (!records.empty() && !result.network_isolated)
    log::warn("code scoring: generated programs ran WITHOUT network isolation (", result.items.front().sandbox, ")");
  result.n = static_cast<int64_t>(records.size());
  if (result.n > 0) result.score /= static_cast<double>(result.n);
  result.method = "pass@1 (sandboxed, greedy)";
  return result;
}

}  // namespace sparsecl::eval
