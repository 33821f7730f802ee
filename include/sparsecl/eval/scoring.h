// Task scorers on a model::Decoder + text::Tokenizer (docs/DESIGN.md "Evaluation and continual-learning
// metrics", data/README.md for the record schemas; docs/eval.md for prompt formats and conventions):
//   held-out loss / perplexity   {"prompt","response"} (or {"text"}/{"ids"}) records through data::load_jsonl;
//                                token-weighted mean of the next-token loss over the loss-mask tokens
//   multiple choice              lm-evaluation-harness log-likelihood scoring: acc = argmax of the summed
//                                log-likelihood of " " + choice after "Question: ...\nAnswer:", acc_norm =
//                                argmax of that divided by the length of the choice text in characters
//                                (Unicode code points, no leading space: lm-eval's len(choice))
//   GSM8K                        batched greedy generation, cut at stop sequences, final number extracted
//                                ("#### N" preferred, else the last number; commas removed), exact match
//   code                         pass@1 through the sandbox (eval/sandbox.h) only when execution is enabled;
//                                otherwise held-out loss on the code held-out file, said so in `method`
// Everything runs without autograd on the decoder's device and dtype; log-probabilities are in fp32.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "sparsecl/eval/sandbox.h"

namespace sparsecl::model {
class Decoder;
}
namespace sparsecl::text {
class Tokenizer;
}

namespace sparsecl::eval {

struct EvalOptions {
  int64_t batch_size = 8;      // sequences per forward / prompts per generate call
  int64_t max_length = 2048;   // tokens per sequence (loss: truncate the end; MC: keep the last tokens)
  int64_t max_samples = 0;     // records scored (the first N of the file, no shuffle); 0 = all
  bool progress = false;       // a Progress bar on stderr
  // Multiple choice: encode contexts with the tokenizer's own specials (BOS for Llama). lm-eval's HF
  // backend defaults to add_bos_token=False; identical for tokenizers without a BOS (SmolLM2, Qwen).
  bool mc_add_special_tokens = true;
};

// ---- held-out loss ----------------------------------------------------------------------------------
struct LossResult {
  double loss = 0;          // mean next-token cross-entropy (nats) over every loss token of every record
  double perplexity = 0;    // exp(loss)
  int64_t examples = 0, loss_tokens = 0;
  std::string method = "heldout_loss";
};
// `tokenizer` may be null when every record is {"ids"}. Records with chat fields need a chat template
// (else they are rendered as plain "prompt\n\nresponse", see data::LoadOptions::plain_chat_fallback).
LossResult heldout_loss(const model::Decoder& decoder, const text::Tokenizer* tokenizer,
                        const std::filesystem::path& file, const EvalOptions& options);

// ---- multiple choice ----------------------------------------------------------------------------------
struct McRecord {
  std::string question;
  std::vector<std::string> choices;
  int64_t answer = 0;
};
std::vector<McRecord> load_mc(const std::filesystem::path& file, int64_t max_samples = 0);

// One (context, continuation) pair of token ids; the score is sum_t log p(continuation_t | prefix).
struct LoglikRequest {
  std::vector<int64_t> context, continuation;
};
// Summed log-likelihood of each continuation (fp32 log-softmax), batched by options.batch_size with
// right padding. Contexts longer than max_length - |continuation| keep their last tokens.
std::vector<double> continuation_logliks(const model::Decoder& decoder, const std::vector<LoglikRequest>& requests,
                                         const EvalOptions& options);

// The prompt and continuation strings for one choice (the lm-evaluation-harness ARC format).
std::string mc_context(const McRecord& record);          // "Question: <q>\nAnswer:"
std::string mc_continuation(const std::string& choice);  // " <choice>"
// Unicode code points of UTF-8 `text` (Python's len(str)), the acc_norm divisor of a choice.
int64_t utf8_length(std::string_view text);
// Token ids as lm-evaluation-harness splits them: context = encode(ctx) (with the tokenizer's own
// specials, e.g. BOS, when add_special_tokens), continuation = encode(ctx + cont)[|context|:] when that
// prefix matches, else encode(cont) without specials.
LoglikRequest mc_request(const text::Tokenizer& tokenizer, const std::string& context, const std::string& continuation,
                         bool add_special_tokens = true);

struct McItem {
  std::vector<double> loglik;       // per choice
  std::vector<int64_t> norm_length; // per choice: code points of the choice text (acc_norm divisor)
  int64_t answer = 0, pred = 0, pred_norm = 0;
};
struct McResult {
  double acc = 0, acc_norm = 0;
  int64_t n = 0;
  std::vector<McItem> items;
  std::string method = "mc_loglikelihood";
};
McResult score_mc(const model::Decoder& decoder, const text::Tokenizer& tokenizer, const std::vector<McRecord>& records,
                  const EvalOptions& options);

// ---- GSM8K-style generation -----------------------------------------------------------------------------
struct GenRecord {
  std::string prompt, answer;
};
std::vector<GenRecord> load_gen(const std::filesystem::path& file, int64_t max_samples = 0);

// The final number of a solution text: the number after the last "####" when present, else the last
// number in the text; commas removed, a leading '+'/'$' and a trailing '.' dropped. nullopt when none.
std::optional<std::string> extract_final_number(std::string_view text);
// Exact match of two final numbers after normalisation (commas, "$"); "18" == "18.0" == "18.00".
bool numbers_match(const std::string& predicted, const std::string& reference);
// `text` cut before the first occurrence of any stop sequence.
std::string cut_at_stop(const std::string& text, const std::vector<std::string>& stop_sequences);

struct GenOptions {
  int64_t max_new_tokens = 256;
  bool use_chat_template = true;  // a user turn through the tokenizer's template when it has one
  // Without a template the prompt is "Question: <q>\nAnswer:"; generation is cut at these strings.
  std::vector<std::string> stop_sequences = {"\n\nQuestion:", "Question:", "</s>", "<|im_end|>", "<|eot_id|>"};
};
struct GenItem {
  std::string completion;  // after cutting at stop sequences
  std::string predicted;   // extracted number ("" when none)
  std::string reference;
  bool correct = false;
};
struct GenResult {
  double exact_match = 0;
  int64_t n = 0;
  std::vector<GenItem> items;
  std::string method = "greedy_exact_match";
};
// The prompt ids for one record (template or plain form, see GenOptions).
std::vector<int64_t> gen_prompt_ids(const text::Tokenizer& tokenizer, const std::string& prompt, const GenOptions& gen);
GenResult score_gsm8k(const model::Decoder& decoder, const text::Tokenizer& tokenizer,
                      const std::vector<GenRecord>& records, const EvalOptions& options, const GenOptions& gen = {});

// ---- code ------------------------------------------------------------------------------------------------
struct CodeRecord {
  std::string prompt, tests, entry_point, prompt_style;  // prompt_style "completion" | "instruction"
};
std::vector<CodeRecord> load_code(const std::filesystem::path& file, int64_t max_samples = 0);

// The program run in the sandbox for one record and one model output: "completion" = prompt +
// completion (cut at HumanEval's stop sequences) + tests; a fenced ```python block in the output is
// used instead of the raw text when present (chat models), and when it defines entry_point it follows
// the prompt as a whole redefinition. "instruction" = the code (fenced block or raw) + tests.
std::string build_program(const CodeRecord& record, const std::string& model_output);

struct CodeOptions {
  bool execute = false;  // run generated code (pass@1); false = held-out loss on `heldout_file`
  std::filesystem::path heldout_file;  // data/code/heldout.jsonl
  int64_t max_new_tokens = 384;
  bool use_chat_template = true;
  SandboxOptions sandbox;
};
struct CodeItem {
  std::string output, program;
  bool passed = false;
  std::string sandbox;  // describe(SandboxResult)
};
struct CodeResult {
  double score = 0;      // pass@1 in [0,1], or the held-out loss (see method)
  int64_t n = 0;
  std::vector<CodeItem> items;
  std::optional<LossResult> loss;  // the fallback's loss result
  bool network_isolated = false, fs_isolated = false, pids_isolated = false;  // all sandbox runs
  std::string method;    // "pass@1 (sandboxed)" or "heldout_loss (code execution not enabled ...)"
};
CodeResult score_code(const model::Decoder& decoder, const text::Tokenizer& tokenizer,
                      const std::vector<CodeRecord>& records, const EvalOptions& options, const CodeOptions& code);

}  // namespace sparsecl::eval
