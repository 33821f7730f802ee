// `sparsecl generate`: greedy decoding from token ids or a text prompt (optionally through the model's
// chat template). Prints the generated ids as one JSON array line, then the decoded text when the model
// directory has a tokenizer.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "sparsecl/cli/commands.h"
#include "sparsecl/common/error.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/generate.h"
#include "sparsecl/model/lora.h"
#include "sparsecl/text/chat_template.h"
#include "sparsecl/text/tokenizer.h"

namespace sparsecl::cli {

namespace {
namespace fs = std::filesystem;

struct GenerateArgs {
  std::string model, adapter, ids, prompt, system, dtype = "float32", device = "cpu", device_map;
  bool chat = false, ignore_eos = false;
  int64_t max_new_tokens = 64;
};

std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw Error("--ids: '" + item + "' is not an integer");
    }
  }
  return ids;
}

// EOS ids from config.json and generation_config.json (either may hold an int or a list).
std::vector<int64_t> stop_ids_for(const fs::path& dir, const model::ModelConfig& config, const text::Tokenizer* tok) {
  std::vector<int64_t> stops = config.eos_token_ids;
  const fs::path gen = dir / "generation_config.json";
  if (fs::exists(gen)) {
    std::ifstream in(gen);
    auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("eos_token_id")) {
      if (j["eos_token_id"].is_number_integer()) stops.push_back(j["eos_token_id"].get<int64_t>());
      if (j["eos_token_id"].is_array())
        for (auto& e : j["eos_token_id"]) stops.push_back(e.get<int64_t>());
    }
  }
  if (tok && tok->eos_id()) stops.push_back(*tok->eos_id());
  return stops;
}

void run_generate(const GenerateArgs& a) {
  if (a.ids.empty() == a.prompt.empty()) throw Error("generate: give exactly one of --ids or --prompt");
  std::unique_ptr<text::Tokenizer> tok = text::Tokenizer::load_if_present(a.model);
  std::vector<int64_t> prompt;
  if (!a.ids.empty()) {
    prompt = parse_ids(a.ids);
  } else {
    if (!tok) throw Error(a.model + ": --prompt needs a tokenizer in the model directory");
    if (a.chat) {
      const text::ChatTemplate* tmpl = tok->chat_template();
      if (!tmpl) throw Error(a.model + ": --chat given but the tokenizer has no chat template");
      std::vector<text::ChatMessage> msgs;
      if (!a.system.empty()) msgs.push_back({"system", a.system});
      msgs.push_back({"user", a.prompt});
      prompt = tok->encode(tmpl->render(msgs, /*add_generation_prompt=*/true), /*add_special_tokens=*/false);
    } else {
      prompt = tok->encode(a.prompt, /*add_special_tokens=*/true);
    }
  }
  auto decoder = model::load_decoder(a.model, model::parse_dtype(a.dtype), a.device, a.device_map);
  if (!a.adapter.empty()) model::attach_lora(decoder, model::LoraAdapter::load(a.adapter));
  model::GenerateOptions opt;
  opt.max_new_tokens = a.max_new_tokens;
  if (!a.ignore_eos) {
    opt.stop_ids = stop_ids_for(a.model, decoder.config(), tok.get());
    // A chat reply ends with the template's end-of-turn token (<|im_end|>, <|eot_id|>, <|end|>), which
    // is not always among the EOS ids.
    if (a.chat && tok && tok->end_of_turn_id()) opt.stop_ids.push_back(*tok->end_of_turn_id());
  }
  auto out = model::greedy_generate(decoder, {prompt}, opt);
  std::cout << nlohmann::json(out[0]).dump() << std::endl;
  if (tok) std::cout << tok->decode(out[0], /*skip_special_tokens=*/true) << std::endl;
}

}  // namespace

void add_generate(CLI::App& root) {
  auto* cmd = root.add_subcommand("generate", "Greedy generation from ids or a prompt (KV cache)");
  auto a = std::make_shared<GenerateArgs>();
  cmd->add_option("--model", a->model, "HF model directory")->required();
  cmd->add_option("--ids", a->ids, "Prompt token ids, comma-separated (e.g. 1,2,3)");
  cmd->add_option("--prompt", a->prompt, "Prompt text (tokenized with the model's tokenizer)");
  cmd->add_flag("--chat", a->chat, "Render --prompt as a user turn through the chat template");
  cmd->add_option("--system", a->system, "System message for --chat");
  cmd->add_option("--max-new-tokens", a->max_new_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_flag("--ignore-eos", a->ignore_eos, "Do not stop at the end-of-sequence token");
  cmd->add_option("--adapter", a->adapter, "PEFT LoRA adapter directory to apply");
  cmd->add_option("--dtype", a->dtype, "Compute dtype")->check(CLI::IsMember({"float32", "bfloat16", "float16"}))->capture_default_str();
  cmd->add_option("--device", a->device, "cpu, cuda or cuda:N")->capture_default_str();
  cmd->add_option("--device-map", a->device_map, "layers over several devices: auto or cuda:0,cuda:1,... (overrides --device)");
  cmd->callback([a] { run_generate(*a); });
}

}  // namespace sparsecl::cli
