// `sparsecl forward`: one forward pass over token ids from a safetensors file, dumping logits, hidden
// states, every layer's MLP intermediate and (with labels) the loss. A user's tool for dumping
// activations, and the parity harness against HF transformers.
#include "sparsecl/cli/commands.h"
#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/io/safetensors.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/lora.h"

namespace sparsecl::cli {

namespace {

struct ForwardArgs {
  std::string model, input, output, adapter, dtype = "float32", device = "cpu";
};

void run_forward(const ForwardArgs& a) {
  auto inputs = io::load_safetensors(a.input);
  auto need = [&](const char* name) -> at::Tensor {
    auto it = inputs.find(name);
    if (it == inputs.end()) throw Error(a.input + ": missing tensor '" + std::string(name) + "'");
    return it->second;
  };
  at::Tensor ids = need("input_ids");
  if (ids.scalar_type() != at::kLong || ids.dim() != 2) throw Error(a.input + ": 'input_ids' must be I64 [B, T]");
  model::ForwardInput in;
  in.input_ids = ids;
  if (inputs.count("attention_mask")) {
    in.attention_mask = inputs["attention_mask"];
    if (in.attention_mask.sizes() != ids.sizes()) throw Error(a.input + ": 'attention_mask' must have the shape of input_ids");
  }
  auto dev = model::parse_device(a.device);
  auto decoder = model::Decoder::load(a.model, model::parse_dtype(a.dtype), dev);
  if (!a.adapter.empty()) model::attach_lora(decoder, model::LoraAdapter::load(a.adapter));

  at::NoGradGuard no_grad;
  model::ForwardOptions opt;
  opt.hidden_states = true;
  opt.mlp_act = true;
  auto out = decoder.forward(in, opt);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  tensors.push_back({"logits", out.logits.to(at::kFloat)});
  tensors.push_back({"hidden_states", at::stack(out.hidden_states).to(at::kFloat)});
  for (size_t i = 0; i < out.mlp_act.size(); ++i) tensors.push_back({"mlp_act." + std::to_string(i), out.mlp_act[i].to(at::kFloat)});
  if (inputs.count("labels")) {
    at::Tensor labels = inputs["labels"];
    if (labels.sizes() != ids.sizes()) throw Error(a.input + ": 'labels' must have the shape of input_ids");
    tensors.push_back({"loss", model::causal_lm_loss(out.logits, labels).reshape({1}).to(at::kFloat)});
  }
  io::save_safetensors(a.output, tensors, {{"model", a.model}, {"dtype", a.dtype}, {"producer", "sparsecl " SPARSECL_VERSION}});
  log::info("wrote ", a.output, " (", tensors.size(), " tensors)");
}

}  // namespace

void add_forward(CLI::App& root) {
  auto* cmd = root.add_subcommand("forward", "One forward pass: dump logits, hidden states, MLP activations and loss");
  auto a = std::make_shared<ForwardArgs>();
  cmd->add_option("--model", a->model, "HF model directory")->required();
  cmd->add_option("--input", a->input, "safetensors with input_ids i64 [B,T] (+ attention_mask, labels)")->required();
  cmd->add_option("--output", a->output, "safetensors to write")->required();
  cmd->add_option("--adapter", a->adapter, "PEFT LoRA adapter directory to apply");
  cmd->add_option("--dtype", a->dtype, "Compute dtype")->check(CLI::IsMember({"float32", "bfloat16", "float16"}))->capture_default_str();
  cmd->add_option("--device", a->device, "cpu, cuda or cuda:N")->capture_default_str();
  cmd->callback([a] { run_forward(*a); });
}

}  // namespace sparsecl::cli
