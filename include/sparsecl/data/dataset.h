// The one data path from domain JSONL files (data/README.md) to token batches, shared by probe,
// trainer and eval. A record is one JSON object per line, in one of four forms:
//   {"text": "..."}                      tokenized as is (the tokenizer's own specials, e.g. BOS, added);
//                                        loss on every token
//   {"prompt": "...", "response": "..."} a user turn + an assistant turn rendered through the tokenizer's
//                                        chat template; loss on the tokens after the generation prompt
//                                        (the response, its end-of-turn token and what the template
//                                        appends after it)
//   {"messages": [{"role", "content"}, ...]}  a whole conversation (system / user / assistant / tool
//                                        turns) through the chat template; loss on every assistant turn,
//                                        each delimited as the single turn of {"prompt","response"} is
//                                        (or, for templates that rewrite earlier turns, by its content
//                                        and end-of-turn token)
//   {"ids": [int, ...]}                  pre-tokenized, used exactly as given (no tokenizer needed);
//                                        loss on every token
// Other fields ("id", "source", ...) are ignored. A record that has none of these forms, or fields of
// the wrong type, is a sparsecl::Error naming the file and the line number.
//
// Selection is deterministic: with `shuffle`, the record order is a Fisher-Yates permutation driven by
// std::mt19937_64(seed) with rejection sampling for the index draws (so the order is the same on every
// platform and standard library, unlike std::shuffle); `max_samples` then keeps the first N records of
// that order (without shuffle: of the file order). Only the kept records are tokenized.
//
// Batches are right-padded: input_ids [B,T] int64 (pad id), attention_mask [B,T] int64 (1 = real token),
// labels [B,T] int64 (the token id where the loss mask is set, -100 elsewhere and on padding; the
// causal_lm_loss convention: logits[:, t] predicts labels[:, t+1]). T = the longest example of the batch.
//
// Packing (train.packing): pack_first_fit puts several examples into each row of up to max_length tokens
// and make_packed_batch builds the batch with segment_ids, from which the decoder keeps the examples
// apart (block-diagonal causal attention, positions restarting at 0 per example); the first token of
// each example is no loss target, so nothing is predicted across an example boundary. A packed batch
// gives the loss and gradients of the same examples right-padded, with fewer padding tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace sparsecl::text {
class Tokenizer;
}

namespace sparsecl::data {

enum class RecordKind { Text, Chat, Ids };

struct Example {
  std::vector<int64_t> ids;        // token ids after truncation
  std::vector<uint8_t> loss_mask;  // same length; 1 = the token is a loss target
  RecordKind kind = RecordKind::Ids;
  int64_t line = 0;                // 1-based line in the source file (for messages)
  bool truncated = false;
};

struct LoadOptions {
  int64_t max_length = 0;   // tokens per example after truncation (keeps the beginning); 0 = no limit
  int64_t max_samples = 0;  // records kept after shuffling; 0 = all
  bool shuffle = true;      // seeded record order (see the header comment)
  uint64_t seed = 0;
  // Without a chat template, {"prompt","response"} records are an error unless this is set, in which
  // case they are rendered as plain text "prompt\n\nresponse" (loss on the response part).
  bool plain_chat_fallback = false;
};

// Reads `path` and returns the selected examples in the selection order. `tokenizer` may be null when
// every selected record is {"ids"}; otherwise it is required (Error naming the file and line).
std::vector<Example> load_jsonl(const std::filesystem::path& path, const text::Tokenizer* tokenizer,
                                const LoadOptions& options);

// Turns one already-parsed record into an example (used by load_jsonl; exposed for tests and for
// callers holding records in memory). `where` names the record in errors ("file:line").
Example tokenize_record(const std::string& json_line, const text::Tokenizer* tokenizer, int64_t max_length,
                        bool plain_chat_fallback, const std::string& where);

// The seeded permutation of [0, n) that load_jsonl uses (Fisher-Yates over std::mt19937_64(seed)).
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed);
// Uniform integer in [0, bound) from `rng` by rejection (bound >= 1); platform independent (the
// probe's seeded sampling uses it too).
uint64_t uniform_below(std::mt19937_64& rng, uint64_t bound);

struct Batch {
  at::Tensor input_ids;       // [B, T] int64
  at::Tensor attention_mask;  // [B, T] int64
  at::Tensor labels;          // [B, T] int64, -100 outside the loss mask and on padding
  int64_t num_tokens = 0;     // real tokens (sum of attention_mask)
  int64_t num_label_tokens = 0;  // loss targets that causal_lm_loss counts (labels != -100 at t >= 1)
  std::vector<int64_t> lengths;  // real length of each row
  // Packed batches only: [B, T] int64, 0 = padding, k = the k-th example of the row (from 1);
  // undefined for make_batch's one-example rows. The decoder's ForwardInput::segment_ids.
  at::Tensor segment_ids;
};

// Right-pads examples[begin, end) into CPU tensors. `pad_id` fills the padding of input_ids.
Batch make_batch(const std::vector<Example>& examples, size_t begin, size_t end, int64_t pad_id);

// Greedy first-fit packing: the examples of `lengths` (token counts), in order, go each into the first of
// at most `max_rows` rows that still has room for it (a row holds at most `max_length` tokens). Packing
// stops at the first example that fits in no row, so the packed examples are always a prefix of the
// order (the trainer's data cursor stays one counter); their count is the sum of the row sizes.
// Returns the rows, each the indices into `lengths` of its examples in packing order. An example
// longer than max_length is an Error (load_jsonl has truncated to train.max_length).
std::vector<std::vector<size_t>> pack_first_fit(const std::vector<int64_t>& lengths, int64_t max_rows,
                                                int64_t max_length);

// A packed batch: row r holds the examples rows[r][0], rows[r][1], ... back to back, right-padded to the
// longest row. input_ids / attention_mask as make_batch; segment_ids numbers the examples of each row
// from 1; labels are the loss-masked ids except on every example's first token (-100: no example is a
// target of the one before it), so num_label_tokens equals make_batch's over the same examples.
Batch make_packed_batch(const std::vector<std::vector<const Example*>>& rows, int64_t pad_id);

// The pad id to use with a tokenizer: its pad token, else its EOS, else 0 (padding is masked anyway).
int64_t pad_id_for(const text::Tokenizer* tokenizer);

// Summary counts for logs: examples, tokens, truncated examples, loss tokens.
struct Summary {
  int64_t examples = 0, tokens = 0, loss_tokens = 0, truncated = 0, max_length = 0;
};
Summary summarize(const std::vector<Example>& examples);

}  // namespace sparsecl::data
