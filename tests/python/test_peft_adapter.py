#!/usr/bin/env python3
"""An adapter trained by `sparsecl finetune-lora` loads in HF PEFT and gives the same logits.

Trains a few steps on models/smollm2-135m-instruct with data/math/train.jsonl (short sequences), then
loads the output directory with `peft.PeftModel.from_pretrained` over the HF model in float32 and
compares its logits with `sparsecl forward --adapter` on the same token ids (max |diff| <= 1e-4).
It also checks that training moved the adapter (lora_B != 0, logits differ from the base model).

Args: --binary (sparsecl), --shared (unused), --repo (repository root). Exit 77 (ctest skip) when
peft / transformers are not importable or the default model is absent.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--shared", default="")
    ap.add_argument("--repo", required=True)
    args = ap.parse_args()

    try:
        import torch
        import peft
        import transformers
        from safetensors.torch import save_file, load_file
    except ImportError as e:
        print(f"skip: {e}")
        return 77
    model_dir = os.path.join(args.repo, "models", "smollm2-135m-instruct")
    data = os.path.join(args.repo, "data", "math", "train.jsonl")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")) or not os.path.exists(data):
        print(f"skip: {model_dir} or {data} absent")
        return 77
    help_text = subprocess.run([args.binary, "--help"], capture_output=True, text=True).stdout
    if "finetune-lora" not in help_text:
        print("skip: this sparsecl binary has no finetune-lora subcommand")
        return 77

    with tempfile.TemporaryDirectory(prefix="sparsecl_peft_") as tmp:
        out = os.path.join(tmp, "adapter")
        cmd = [args.binary, "finetune-lora", "--model", model_dir, "--data", data, "--output", out,
               "--steps", "3", "--batch-size", "2", "--max-length", "160", "--lr", "1e-3", "--no-progress",
               "lora.r=4", "lora.alpha=8", "lora.dropout=0", "lora.rslora=true", "train.log_every=1"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout, r.stderr, sep="\n")
            print("FAIL: finetune-lora exited", r.returncode)
            return 1
        for f in ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "train_log.jsonl"):
            if not os.path.exists(os.path.join(out, f)):
                print(f"FAIL: {f} missing in the output directory")
                return 1
        with open(os.path.join(out, "train_log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        if [l["step"] for l in log] != [1, 2, 3] or not all(l["loss"] > 0 for l in log):
            print("FAIL: unexpected step log", log)
            return 1
        weights = load_file(os.path.join(out, "adapter_model.safetensors"))
        max_b = max(t.abs().max().item() for k, t in weights.items() if "lora_B" in k)
        if not max_b > 0:
            print("FAIL: lora_B is still zero after training")
            return 1

        ids = torch.tensor([[1, 504, 3250, 28, 253, 1616, 30, 3145, 2],
                            [1, 2378, 314, 1935, 284, 216, 33, 32, 17]], dtype=torch.int64)
        inp = os.path.join(tmp, "input.safetensors")
        save_file({"input_ids": ids}, inp)
        got_path = os.path.join(tmp, "got.safetensors")
        r = subprocess.run([args.binary, "forward", "--model", model_dir, "--input", inp, "--output", got_path,
                            "--adapter", out], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout, r.stderr, sep="\n")
            print("FAIL: forward exited", r.returncode)
            return 1
        got = load_file(got_path)["logits"]

        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        base.eval()
        with torch.no_grad():
            base_logits = base(input_ids=ids).logits
        model = peft.PeftModel.from_pretrained(base, out)
        model.eval()
        with torch.no_grad():
            want = model(input_ids=ids).logits
        diff = (want - got).abs().max().item()
        moved = (want - base_logits).abs().max().item()
        print(f"peft {peft.__version__}: max |logits diff| vs sparsecl = {diff:.3g}; adapter moved logits by {moved:.3g}")
        if not diff <= 1e-4:
            print("FAIL: PEFT and sparsecl logits differ")
            return 1
        if not moved > 1e-3:
            print("FAIL: the trained adapter does not change the logits")
            return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
