#!/usr/bin/env python3
"""The HF transformers + PEFT side of `sparsecl bench model` (docs/bench.md): the same workloads, the
same FLOP model and the same JSON schema, on a LlamaForCausalLM (any AutoModelForCausalLM family) built
from the same config.json with random weights, so that scripts/bench_compare.sh can put the two side by
side. What each workload runs is what people run today:

  lora-step       PEFT LoRA (r, alpha, all 7 projections; adapters upcast to fp32 by get_peft_model),
                  HF's own loss (labels=input_ids), backward, clip_grad_norm_(1.0) and torch's AdamW
                  (fused on CUDA: the HF Trainer's default optimizer), under bf16 autocast on CUDA as the
                  Trainer's bf16=True does
  lora-step-ckpt  the same after gradient_checkpointing_enable(use_reentrant=False)
  probe-forward   the base model (model.model: no LM head, as the sparsecl probe) under inference_mode,
                  with a forward pre-hook on every mlp.down_proj taking the top-k statistics of its input
                  h: sum |h| per neuron and the per-token top-k membership counts
                  (torch.topk(|h|, k) + bincount)
  generate        model.generate(do_sample=False), every row to max_new_tokens (EOS disabled), HF's
                  default dynamic cache

Timings synchronise the device; per workload the CUDA allocator's peaks are reset (after empty_cache)
and read (max_memory_allocated / max_memory_reserved); peak RSS is the process's so far.

  python3 scripts/bench_hf.py --model-config configs/models/llama-3-8b.json --json hf.json
  python3 scripts/bench_hf.py --model-config configs/models/tiny.json --device cpu --batch 2 --seq 128
"""
import argparse
import json
import math
import os
import platform
import resource
import sys
import time
import warnings

import torch

# transformers 5.2x renamed gradient_checkpointing_* to activation_checkpointing_* (5.17 on the GPU machine
# has only the old names): keep the old ones, without the deprecation noise.
warnings.filterwarnings("ignore", category=FutureWarning)

WORKLOADS = ["lora-step", "lora-step-ckpt", "probe-forward", "generate"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- FLOP model: exactly include/sparsecl/bench/workloads.h's ----------------------------------------

def shape(c):
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    return dict(L=c["num_hidden_layers"], H=c["hidden_size"], I=c["intermediate_size"], V=c["vocab_size"],
                q=c["num_attention_heads"] * head_dim, kv=kv_heads * head_dim)


def layer_matmul_parameters(s):
    return s["L"] * (s["H"] * s["q"] + 2 * s["H"] * s["kv"] + s["q"] * s["H"] + 3 * s["H"] * s["I"])


def lm_head_parameters(s):
    return s["V"] * s["H"]


def lora_parameters(s, r):
    H, I, q, kv = s["H"], s["I"], s["q"], s["kv"]
    return s["L"] * r * ((H + q) + 2 * (H + kv) + (q + H) + 3 * (H + I))


def lora_step_flops_per_token(s, seq, r):
    N = layer_matmul_parameters(s) + lm_head_parameters(s)
    return 4.0 * N + 6.0 * lora_parameters(s, r) + 12.0 * s["L"] * seq * s["q"]


def probe_forward_flops_per_token(s, seq):
    return 2.0 * layer_matmul_parameters(s) + 4.0 * s["L"] * seq * s["q"]


def generate_flops(s, batch, P, n):
    Nl, Nh = float(layer_matmul_parameters(s)), float(lm_head_parameters(s))
    attn = 4.0 * s["L"] * s["q"]
    per_row = P * (2.0 * Nl + attn * P) + n * 2.0 * Nh
    per_row += (n - 1.0) * 2.0 * Nl + attn * ((n - 1.0) * P + n * (n - 1.0) / 2.0)
    return batch * per_row


def top_count(ratio, I):  # probe::top_count: llround, clamped to [1, I]
    return min(max(int(math.floor(ratio * I + 0.5)), 1), I)


# ---- measurement ---------------------------------------------------------------------------------------

class Meter:
    """Synchronised wall time and the allocator peaks of one workload."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset(self):
        self.sync()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self):
        self.sync()
        out = {"peak_allocated_bytes": None, "peak_reserved_bytes": None,
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.cuda:
            out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out


def result(name, tokens, seconds, flops, peaks, **details):
    r = {"name": name, "tokens": tokens, "seconds": seconds,
         "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
         "flops": flops, "tflops_per_s": flops / seconds / 1e12 if seconds > 0 else 0.0}
    r.update(peaks)
    r.update(details)
    return r


def random_ids(gen, rows, length, vocab, device):
    return torch.randint(0, vocab, (rows, length), generator=gen).to(device)  # [rows, length] int64


# ---- workloads -----------------------------------------------------------------------------------------

def lora_step(model, a, s, device, dtype, meter, checkpointing):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules=PROJECTIONS,
                     bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(a.seed)
    peft_model = get_peft_model(model, cfg)  # adapters in fp32 (autocast_adapter_dtype=True)
    if checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    autocast = device.type == "cuda" and dtype != torch.float32
    gen = torch.Generator().manual_seed(a.seed + 1)
    mask = torch.ones(a.batch, a.seq, dtype=torch.long, device=device)
    meter.reset()
    seconds, loss = 0.0, float("nan")
    for step in range(a.warmup + a.iters):
        ids = random_ids(gen, a.batch, a.seq, s["V"], device)  # [B, T]
        meter.sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = peft_model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        del out
        meter.sync()
        if step >= a.warmup:
            seconds += time.perf_counter() - t0
    peaks = meter.peaks()
    if checkpointing:
        peft_model.gradient_checkpointing_disable()
    del opt, params
    base = peft_model.unload()  # the base model without the LoRA layers
    tokens = a.iters * a.batch * a.seq
    r = result("lora-step-ckpt" if checkpointing else "lora-step", tokens, seconds,
               lora_step_flops_per_token(s, a.seq, a.lora_r) * tokens, peaks,
               batch=a.batch, seq=a.seq, iters=a.iters, warmup=a.warmup, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
               loss=loss, activation_checkpointing=checkpointing,
               trainable_parameters=lora_parameters(s, a.lora_r))
    return r, base


def probe_forward(model, a, s, device, meter):
    I, L = s["I"], s["L"]
    k = top_count(a.top_ratio, I)
    sum_abs = [torch.zeros(I, dtype=torch.float64, device=device) for _ in range(L)]  # [I] per layer
    counts = [torch.zeros(I, dtype=torch.long, device=device) for _ in range(L)]      # [I] per layer

    def make_hook(layer):
        def hook(module, args):
            h = args[0].reshape(-1, I).abs()  # [B*T, I]
            sum_abs[layer] += h.sum(0, dtype=torch.float64)
            counts[layer] += torch.bincount(torch.topk(h, k, dim=-1).indices.flatten(), minlength=I)
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(model.model.layers)]
    gen = torch.Generator().manual_seed(a.seed + 11)
    mask = torch.ones(a.batch, a.seq, dtype=torch.long, device=device)
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(a.warmup):
                model.model(input_ids=random_ids(gen, a.batch, a.seq, s["V"], device), attention_mask=mask, use_cache=False)
            batches = [random_ids(gen, a.batch, a.seq, s["V"], device) for _ in range(a.iters)]
            meter.reset()
            t0 = time.perf_counter()
            for ids in batches:
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            meter.sync()
            seconds = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    total = int(counts[0].sum().item())
    tokens = a.iters * a.batch * a.seq
    if total != (tokens + a.warmup * a.batch * a.seq) * k:
        raise RuntimeError(f"probe-forward: top-k counts hold {total} entries, expected {(tokens + a.warmup * a.batch * a.seq) * k}")
    return result("probe-forward", tokens, seconds, probe_forward_flops_per_token(s, a.seq) * tokens, meter.peaks(),
                  batch=a.batch, seq=a.seq, iters=a.iters, warmup=a.warmup, k=k, top_ratio=a.top_ratio)


def generate(model, a, s, device, meter):
    gen = torch.Generator().manual_seed(a.seed + 21)
    prompts = random_ids(gen, a.gen_batch, a.prompt_len, s["V"], device)  # [G, P]
    mask = torch.ones_like(prompts)
    model.eval()
    gc = model.generation_config
    gc.eos_token_id = None  # every row decodes max_new_tokens, as sparsecl's run does (no stop ids)
    gc.pad_token_id = 0
    gc.do_sample, gc.num_beams, gc.temperature, gc.top_p, gc.top_k = False, 1, None, None, None

    def run(n):
        with torch.inference_mode():
            return model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n)

    run(min(a.new_tokens, 4))  # warm-up: prefill + a few steps
    meter.reset()
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(a.gen_iters):
        out = run(a.new_tokens)
        tokens += (out.shape[1] - a.prompt_len) * out.shape[0]
    meter.sync()
    seconds = time.perf_counter() - t0
    if tokens != a.gen_iters * a.gen_batch * a.new_tokens:
        raise RuntimeError(f"generate produced {tokens} tokens, expected {a.gen_iters * a.gen_batch * a.new_tokens}")
    return result("generate", tokens, seconds, a.gen_iters * generate_flops(s, a.gen_batch, a.prompt_len, a.new_tokens),
                  meter.peaks(), batch=a.gen_batch, prompt_len=a.prompt_len, new_tokens=a.new_tokens, iters=a.gen_iters)


# ---- driver --------------------------------------------------------------------------------------------

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def build_model(config_dict, dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(config_dict)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device(device):  # random init directly on the device
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers 4.x
            return AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", required=True, help="HF config.json of the shape (configs/models/*.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--workload", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--gen-iters", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--top-ratio", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    workloads = [w for w in a.workload.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload '{w}' (known: {', '.join(WORKLOADS)})")
    if a.iters < 1 or a.gen_iters < 1 or a.warmup < 0:
        p.error("--iters and --gen-iters must be >= 1, --warmup >= 0")
    device = torch.device(a.device)
    a.dtype = a.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    dtype = getattr(torch, a.dtype)
    with open(a.model_config) as f:
        config_dict = json.load(f)
    s = shape(config_dict)

    import transformers
    import peft
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model = build_model(config_dict, dtype, device)
    meter = Meter(device)
    meter.sync()
    n_params = sum(t.numel() for t in model.parameters())
    name = device_name(device)
    print(f"bench_hf.py: {a.model_config} ({n_params / 1e9:.3g}B parameters), {a.dtype} on {device} ({name}); "
          f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}; "
          f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{'workload':15s} {'tokens/s':>12s} {'TFLOP/s':>10s} {'peak alloc GiB':>14s} {'peak resv GiB':>14s} "
          f"{'peak RSS GiB':>12s} {'seconds':>9s}", flush=True)
    gib = float(1 << 30)
    results = []
    for w in workloads:
        if w in ("lora-step", "lora-step-ckpt"):
            r, model = lora_step(model, a, s, device, dtype, meter, w == "lora-step-ckpt")
        elif w == "probe-forward":
            r = probe_forward(model, a, s, device, meter)
        else:
            r = generate(model, a, s, device, meter)
        fmt = lambda b: "-" if b is None else f"{b / gib:.2f}"
        print(f"{r['name']:15s} {r['tokens_per_s']:12.1f} {r['tflops_per_s']:10.3g} {fmt(r['peak_allocated_bytes']):>14s} "
              f"{fmt(r['peak_reserved_bytes']):>14s} {r['peak_rss_bytes'] / gib:12.2f} {r['seconds']:9.3f}", flush=True)
        results.append(r)

    doc = {"tool": "hf", "device": str(device), "device_name": name, "dtype": a.dtype, "model_config": a.model_config,
           "model": dict(config_dict, parameters=n_params, layer_matmul_parameters=layer_matmul_parameters(s),
                         lm_head_parameters=lm_head_parameters(s)),
           "options": {k: v for k, v in vars(a).items() if k != "json"} | {"workloads": workloads},
           "threads": torch.get_num_threads(),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                        "cuda": torch.version.cuda, "python": platform.python_version()},
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "workloads": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
