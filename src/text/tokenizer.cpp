// Tokenizer::load: finds which tokenizer format a checkpoint directory ships, reads its
// tokenizer_config.json (special tokens, add_bos_token, chat template) and builds the matching backend.
// The order mirrors what HF transformers uses: tokenizer.json (fast tokenizer) first, then the
// SentencePiece model (slow tokenizer), then GPT-2's vocab.json + merges.txt.
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/text/backends.h"
#include "sparsecl/text/tokenizer.h"

namespace sparsecl::text {

namespace fs = std::filesystem;
using json = nlohmann::json;

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

namespace {

std::optional<std::string> token_text(const json& j, const fs::path& file, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  const json& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  throw Error(file.string() + ": \"" + key + "\" is neither a string nor an object with \"content\"");
}


}  // namespace

TokenizerConfig read_tokenizer_config_file(const fs::path& file) {
  TokenizerConfig c;
  c.file = file;
  const json j = read_json_file(file, "tokenizer config");
  if (!j.is_object()) throw Error(file.string() + ": top level is not an object");
  c.bos_token = token_text(j, file, "bos_token");
  c.eos_token = token_text(j, file, "eos_token");
  c.pad_token = token_text(j, file, "pad_token");
  c.unk_token = token_text(j, file, "unk_token");
  for (auto [key, dst] : {std::pair{"add_bos_token", &c.add_bos_token}, std::pair{"add_eos_token", &c.add_eos_token}}) {
    if (!j.contains(key) || j[key].is_null()) continue;
    if (!j[key].is_boolean()) throw Error(file.string() + ": \"" + key + "\" is not a boolean");
    *dst = j[key].get<bool>();
  }
  if (j.contains("chat_template") && !j["chat_template"].is_null()) {
    const json& t = j["chat_template"];
    if (t.is_string()) {
      c.chat_template = t.get<std::string>();
    } else if (t.is_array()) {
      for (const auto& e : t)
        if (e.is_object() && e.value("name", std::string()) == "default" && e.contains("template") &&
            e["template"].is_string())
          c.chat_template = e["template"].get<std::string>();
    } else {
      throw Error(file.string() + ": \"chat_template\" is neither a string nor a list of named templates");
    }
    if (c.chat_template) c.chat_template_source = file;
  }
  return c;
}

TokenizerConfig read_tokenizer_config(const fs::path& dir) {
  TokenizerConfig c;
  if (fs::path file = dir / "tokenizer_config.json"; fs::exists(file)) c = read_tokenizer_config_file(file);
  // Older checkpoints keep their special tokens in special_tokens_map.json only.
  if (fs::path file = dir / "special_tokens_map.json"; fs::exists(file)) {
    const json j = read_json_file(file, "special tokens map");
    if (!j.is_object()) throw Error(file.string() + ": top level is not an object");
    for (auto [key, dst] : {std::pair{"bos_token", &c.bos_token}, std::pair{"eos_token", &c.eos_token},
                            std::pair{"pad_token", &c.pad_token}, std::pair{"unk_token", &c.unk_token}})
      if (!*dst) *dst = token_text(j, file, key);
  }
  fs::path jinja = dir / "chat_template.jinja";
  if (fs::exists(jinja)) {
    c.chat_template = read_file(jinja, "chat template");
    c.chat_template_source = jinja;
  }
  return c;
}

namespace {

std::unique_ptr<Tokenizer> load_any(const fs::path& path, fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error("tokenizer path " + path.string() + " does not exist");
  if (fs::is_directory(path)) {
    dir = path;
    TokenizerConfig config = read_tokenizer_config(dir);
    fs::path json_file = dir / "tokenizer.json", sp_file = dir / "tokenizer.model";
    fs::path vocab = dir / "vocab.json", merges = dir / "merges.txt";
    if (fs::exists(json_file)) {
      try {
        return load_hf_tokenizer_json(json_file, config);
      } catch (const UnsupportedComponent& e) {
        if (!fs::exists(sp_file)) throw;
        sparsecl::log::debug(e.what(), "; using ", sp_file.string(), " instead");
        return load_sentencepiece_model(sp_file, config);
      }
    }
    if (fs::exists(sp_file)) return load_sentencepiece_model(sp_file, config);
    if (fs::exists(vocab) && fs::exists(merges)) return load_gpt2_files(vocab, merges, config);
    throw Error("tokenizer directory " + path.string() +
                " has no tokenizer.json, tokenizer.model or vocab.json + merges.txt");
  }
  dir = path.parent_path();
  std::string name = path.filename().string();
  TokenizerConfig config = read_tokenizer_config(dir);
  if (name == "tokenizer_config.json") return load_any(dir, dir);
  if (name == "vocab.json") return load_gpt2_files(path, dir / "merges.txt", config);
  if (name == "merges.txt") return load_gpt2_files(dir / "vocab.json", path, config);
  if (path.extension() == ".model") return load_sentencepiece_model(path, config);
  if (path.extension() == ".json") return load_hf_tokenizer_json(path, config);
  throw Error("tokenizer file " + path.string() +
              " is not a tokenizer.json, a SentencePiece .model or GPT-2 vocab.json/merges.txt");
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load_if_present(const fs::path& dir) {
  for (const char* f : {"tokenizer.json", "tokenizer.model", "vocab.json"})
    if (fs::exists(dir / f)) return load(dir);
  return nullptr;
}

std::unique_ptr<Tokenizer> Tokenizer::load(const fs::path& path) {
  fs::path dir;
  std::unique_ptr<Tokenizer> tok = load_any(path, dir);
  TokenizerConfig config = read_tokenizer_config(dir);

  // The template sees the special tokens as HF passes them: the configured ones, else the tokenizer's own.
  auto text_of = [&](const std::optional<std::string>& configured, std::optional<int64_t> id) {
    if (configured) return configured;
    return id ? tok->id_to_token(*id) : std::nullopt;
  };
  ChatSpecialTokens specials{text_of(config.bos_token, tok->bos_id()), text_of(config.eos_token, tok->eos_id()),
                             config.unk_token, text_of(config.pad_token, tok->pad_id())};
  std::unique_ptr<ChatTemplate> tmpl;
  if (config.chat_template) {
    try {
      tmpl = std::make_unique<ChatTemplate>(*config.chat_template, specials, config.chat_template_source.string());
    } catch (const Error& e) {
      sparsecl::log::warn(e.what(), "; chat prompts are unavailable with this tokenizer");
    }
  } else if (TokenizerLoader::lookup(*tok, "<|im_start|>") && TokenizerLoader::lookup(*tok, "<|im_end|>")) {
    tmpl = ChatTemplate::chatml();
  } else if (TokenizerLoader::lookup(*tok, "<|start_header_id|>") && TokenizerLoader::lookup(*tok, "<|eot_id|>")) {
    tmpl = ChatTemplate::llama3(specials.bos.value_or(""));
  }
  TokenizerLoader::set_chat_template(*tok, std::move(tmpl));
  return tok;
}

}  // namespace sparsecl::text
