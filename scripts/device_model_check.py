#!/usr/bin/env python3
"""GPU check of the decoder (run on the GPU machine after building build-gpu/): for each fixture model,
`sparsecl forward --device cuda` in float32 and bfloat16 against the HF transformers reference logits
(tests/data/models/*/reference.safetensors, made in fp32 on CPU), with and without the LoRA adapter;
prints the largest errors. fp32 on CUDA must agree to 1e-3 (TF32 is off in libtorch by default), bf16
is reported with its relative error and must keep the argmax on >= 95% of positions."""
import subprocess, sys, tempfile, os
import torch
from safetensors.torch import load_file

binary = sys.argv[1] if len(sys.argv) > 1 else "build-gpu/sparsecl"
root = "tests/data/models"
failed = False
for name in ["llama3", "qwen2", "mistral", "qwen3"]:
    for adapter in [None, f"{root}/{name}/lora_adapter"]:
        ref = load_file(f"{root}/{name}/reference.safetensors")
        want = load_file(f"{adapter}/reference.safetensors")["logits"] if adapter else ref["logits"]
        mask = ref["attention_mask"].bool()
        for dtype in ["float32", "bfloat16"]:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "out.safetensors")
                cmd = [binary, "forward", "--model", f"{root}/{name}", "--input", f"{root}/{name}/reference.safetensors",
                       "--output", out, "--device", "cuda", "--dtype", dtype] + (["--adapter", adapter] if adapter else [])
                subprocess.run(cmd, check=True, capture_output=True)
                got = load_file(out)["logits"]
            err = (got - want)[mask].abs().max().item()
            rel = err / want[mask].abs().max().item()
            agree = (got.argmax(-1) == want.argmax(-1))[mask].float().mean().item()
            ok = err < 1e-3 if dtype == "float32" else agree >= 0.95
            failed |= not ok
            print(f"{name:8s} {'lora' if adapter else 'base':4s} {dtype:9s} max|dlogit|={err:.2e} rel={rel:.2e} argmax agree={agree:.3f} {'ok' if ok else 'FAIL'}")
sys.exit(1 if failed else 0)
