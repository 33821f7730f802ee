#!/usr/bin/env python3
"""Model parity beyond the fixtures: tiny random checkpoints that HF transformers itself builds and saves
(save_pretrained, safetensors) for the config options published Llama / Mistral / Qwen2 / Qwen3
checkpoints use — GQA, an explicit head_dim, llama3, linear and yarn RoPE scaling, attention / MLP biases,
tied embeddings, a Mistral sliding window shorter than the sequence, Qwen2's per-layer sliding window,
Qwen3's q/k norms, gelu activations. `sparsecl forward` on each must give HF's fp32 logits (max abs
difference <= 2e-4) on a batch with a left-padded row, `sparsecl info` must count HF's parameters, and
`sparsecl generate` must give HF generate's greedy tokens (prompt + new tokens longer than the sliding
windows) with both the dynamic and the fixed-shape decoding step.

Run by ctest as: python test_hf_config_variants.py --binary <sparsecl> --shared <unused> --repo <root>;
exit 77 when torch / transformers / safetensors are not installed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

SKIP = 77
TOL = 2e-4

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)

# name -> (config class name, overrides)
VARIANTS = {
    "llama_gqa": ("LlamaConfig", {}),
    "llama_head_dim": ("LlamaConfig", {"head_dim": 24}),
    "llama_rope_llama3": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "llama_rope_linear": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "qwen2_rope_yarn": ("Qwen2Config", {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 64}}),
    "qwen3_rope_yarn_mscale": ("Qwen3Config", {"rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
        "mscale": 0.9, "mscale_all_dim": 0.5, "truncate": False}}),
    "llama_biases": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "llama_tied_mha": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama_gelu": ("LlamaConfig", {"hidden_act": "gelu_pytorch_tanh"}),
    "mistral_window": ("MistralConfig", {"sliding_window": 8, "rope_theta": 1e6}),
    "mistral_head_dim": ("MistralConfig", {"sliding_window": None, "head_dim": 32}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2_window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "qwen3_window": ("Qwen3Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
}


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-1500:]}")
    return r.stdout.decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--shared", default="")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    try:
        import torch
        import transformers
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        print(f"SKIP: {e}")
        return SKIP
    torch.manual_seed(0)
    failures = []
    with tempfile.TemporaryDirectory(prefix="sparsecl_hf_variants_") as tmp:
        # One batch for every model: row 1 left-padded by 5, T longer than the sliding windows.
        B, T = 2, 24
        ids = torch.randint(3, BASE["vocab_size"], (B, T), dtype=torch.long)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, :5] = 0
        ids[1, :5] = 0
        inp = os.path.join(tmp, "input.safetensors")
        save_file({"input_ids": ids, "attention_mask": mask}, inp)
        for name, (cls, over) in VARIANTS.items():
            if args.only and name not in args.only.split(","):
                continue
            cfg = getattr(transformers, cls)(**dict(BASE, **over))
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
            with torch.no_grad():  # non-trivial norms and biases, so that a missed one shows
                for n, p in model.named_parameters():
                    if n.endswith("norm.weight"):
                        p.copy_(1 + 0.2 * torch.randn_like(p))
                    elif n.endswith(".bias"):
                        p.copy_(0.05 * torch.randn_like(p))
            d = os.path.join(tmp, name)
            model.save_pretrained(d, safe_serialization=True)
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask).logits.float()
            out = os.path.join(tmp, name + ".out.safetensors")
            try:
                run([args.binary, "forward", "--model", d, "--input", inp, "--output", out])
                got = load_file(out)["logits"]
                info = json.loads(run([args.binary, "info", "--model", d]))
            except RuntimeError as e:
                failures.append(f"{name}: {e}")
                print(f"FAIL {name}: {e}")
                continue
            # Padded positions are not compared (HF fills them with whatever the mask-free path gives).
            keep = mask.bool()
            diff = (got[keep] - ref[keep]).abs().max().item()
            n_params = sum(p.numel() for p in model.parameters())
            # Greedy decoding: 6 prompt tokens + 20 new ones, past every window above.
            prompt = ids[0, :6]
            with torch.no_grad():
                hf_new = model.generate(prompt.view(1, -1), attention_mask=torch.ones(1, 6, dtype=torch.long),
                                        max_new_tokens=20, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)[0, 6:].tolist()
            gen_ok = True
            for mode in ("dynamic", "fixed"):
                r = subprocess.run([args.binary, "generate", "--model", d, "--ids", ",".join(map(str, prompt.tolist())),
                                    "--max-new-tokens", "20", "--ignore-eos"], capture_output=True, timeout=600,
                                   env=dict(os.environ, SPARSECL_DECODE=mode))
                got_new = json.loads(r.stdout.decode().splitlines()[0]) if r.returncode == 0 else r.stderr.decode()[-300:]
                if got_new != hf_new:
                    gen_ok = False
                    print(f"  {name} generate ({mode}): sparsecl {got_new} vs HF {hf_new}")
            ok = diff <= TOL and info.get("parameters") == n_params and gen_ok
            print(f"{'OK' if ok else 'FAIL'} {name} ({cls} {json.dumps(over)}): max |logit diff| {diff:.2e}, "
                  f"parameters {info.get('parameters')} vs HF {n_params}, greedy tokens "
                  f"{'identical' if gen_ok else 'DIFFER'} (dynamic, fixed)")
            if not ok:
                failures.append(name)
    if failures:
        print(f"FAIL: {len(failures)} variant(s): {failures}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
