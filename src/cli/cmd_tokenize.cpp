// `sparsecl tokenize --tokenizer DIR [--no-special] [--input FILE] [--chat-template FILE]`: tokenises
// JSON Lines, one object per line, and writes one JSON line per input line:
//   {"text": "..."}                                  -> {"ids": [...], "decoded": "..."}
//   {"messages": [{"role", "content"}, ...],
//    "add_generation_prompt": true}                  -> {"text": "<rendered prompt>", "ids": [...], "decoded": "..."}
//   {"ids": [...]}                                   -> {"ids": [...], "decoded": "..."}   (decode only)
// `decoded` is decode(ids) with special tokens kept. Chat prompts are encoded without added specials (the
// template already carries them), as the model code does. This is the hook the tokenizer parity tests
// (tests/python/test_tokenizer_parity.py, test_chat_template.py) drive against HF.
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "sparsecl/cli/commands.h"
#include "sparsecl/common/error.h"
#include "sparsecl/text/tokenizer.h"

namespace sparsecl::cli {

namespace {

struct TokenizeOptions {
  std::string tokenizer;
  std::string input;
  std::string chat_template;
  bool no_special = false;
};

void run_tokenize(const TokenizeOptions& opt) {
  auto tok = text::Tokenizer::load(opt.tokenizer);
  std::unique_ptr<text::ChatTemplate> override_template;
  if (!opt.chat_template.empty()) override_template = text::ChatTemplate::from_file(opt.chat_template);
  const text::ChatTemplate* tmpl = override_template ? override_template.get() : tok->chat_template();

  std::ifstream file;
  std::istream* in = &std::cin;
  std::string source = "<stdin>";
  if (!opt.input.empty() && opt.input != "-") {
    file.open(opt.input, std::ios::binary);
    if (!file) throw Error("cannot open input file " + opt.input);
    in = &file;
    source = opt.input;
  }
  std::string line;
  size_t lineno = 0;
  while (std::getline(*in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const std::string where = source + ":" + std::to_string(lineno);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + ": malformed JSON: " + e.what());
    }
    nlohmann::json out;
    std::vector<int64_t> ids;
    if (j.is_object() && j.contains("text") && j["text"].is_string()) {
      ids = tok->encode(j["text"].get_ref<const std::string&>(), !opt.no_special);
    } else if (j.is_object() && j.contains("messages") && j["messages"].is_array()) {
      if (!tmpl) throw Error(where + ": chat messages given but tokenizer " + opt.tokenizer + " has no chat template");
      std::vector<text::ChatMessage> messages;
      for (const auto& m : j["messages"]) {
        if (!m.is_object() || !m.contains("role") || !m.contains("content") || !m["role"].is_string() ||
            !m["content"].is_string())
          throw Error(where + ": each message needs string \"role\" and \"content\"");
        messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
      }
      std::string rendered = tmpl->render(messages, j.value("add_generation_prompt", false));
      ids = tok->encode(rendered, false);
      out["text"] = rendered;
    } else if (j.is_object() && j.contains("ids") && j["ids"].is_array()) {
      for (const auto& id : j["ids"]) {
        if (!id.is_number_integer()) throw Error(where + ": \"ids\" must be a list of integers");
        ids.push_back(id.get<int64_t>());
      }
    } else {
      throw Error(where + ": expected an object with a string \"text\", a \"messages\" list or an \"ids\" list");
    }
    out["ids"] = ids;
    out["decoded"] = tok->decode(ids, false);
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
  }
  std::cout.flush();
}

}  // namespace

void add_tokenize(CLI::App& root) {
  auto* cmd = root.add_subcommand("tokenize", "Tokenize JSON Lines ({\"text\": ...} or {\"messages\": [...]}) to ids");
  auto opt = std::make_shared<TokenizeOptions>();
  cmd->add_option("--tokenizer", opt->tokenizer,
                  "Directory with tokenizer.json, tokenizer.model or vocab.json + merges.txt (or the file)")
      ->required();
  cmd->add_flag("--no-special", opt->no_special, "Do not add the tokenizer's special tokens (e.g. BOS)");
  cmd->add_option("--input", opt->input, "JSON Lines input file (default: stdin)");
  cmd->add_option("--chat-template", opt->chat_template,
                  "tokenizer_config.json or .jinja whose chat template renders {\"messages\"} lines "
                  "(default: the tokenizer's own)");
  cmd->callback([opt] { run_tokenize(*opt); });
}

}  // namespace sparsecl::cli
