#!/usr/bin/env python3
"""The H1 probe of the default model (models/smollm2-135m-instruct) on the four bundled domains
(data/{code,math,medical,chat}/train.jsonl), through the binary: `sparsecl probe` with a few dozen
samples per domain at max_length 128 (a few minutes on a CPU). Checks probe.json against the schema in
docs/probe.md and probe_stats.safetensors' tensor names, and prints the per-layer table of IoU vs the
random expectation, the normalised ratio and the permutation p-value for every domain pair.

Run by ctest as: python tests/python/test_probe_smollm2.py --binary B --shared S --repo R
Exit 0 pass, 1 fail, 77 skip (no model, or a binary without the `probe` subcommand).
Extra options: --samples N (default 32), --output DIR (default: a temp dir, removed), --device.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

DOMAINS = ["code", "math", "medical", "chat"]


def safetensors_names(path: str) -> list[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--shared", default="")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--output", default="")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    model = os.path.join(args.repo, "models", "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        print(f"SKIP: {model} absent (scripts/setup.sh fetches it)")
        return 77
    helped = subprocess.run([args.binary, "probe", "--help"], capture_output=True, text=True)
    if helped.returncode != 0:
        print("SKIP: this binary has no `probe` subcommand yet (cli::add_probe not wired in main.cpp)")
        return 77

    tmp = None
    out = args.output
    if not out:
        tmp = tempfile.TemporaryDirectory(prefix="sparsecl_probe_")
        out = tmp.name
    cmd = [args.binary, "probe", "--model", model, "--max-samples", str(args.samples), "--max-length", "128",
           "--batch-size", "8", "--permutations", "200", "--token-pairs", "2000", "--seed", "0",
           "--device", args.device, "--output", out, "--no-progress"]
    for d in DOMAINS:
        cmd += ["--domain", f"{d}={os.path.join(args.repo, 'data', d, 'train.jsonl')}"]
    print("$", " ".join(cmd))
    t0 = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True)
    took = time.time() - t0
    if run.returncode != 0:
        print(run.stdout, run.stderr)
        print(f"FAIL: probe exited {run.returncode}")
        return 1

    failures = []
    with open(os.path.join(out, "probe.json"), encoding="utf-8") as f:
        doc = json.load(f)
    layers = doc["layers"]
    if len(layers) != 30:
        failures.append(f"expected 30 layers, got {len(layers)}")
    m = doc["models"][0]
    if (m["hidden_size"], m["intermediate_size"]) != (576, 1536):
        failures.append(f"model shape {m['hidden_size']}/{m['intermediate_size']}")
    K = m["K"]
    for layer in layers:
        for d in DOMAINS:
            ids = layer["top"][d]
            if len(ids) != K or ids != sorted(set(ids)):
                failures.append(f"layer {layer['layer']} {d}: top set is not {K} sorted unique ids")
        if len(layer["pairs"]) != 6:
            failures.append(f"layer {layer['layer']}: {len(layer['pairs'])} pairs")
        for p in layer["pairs"]:
            inter = len(set(layer["top"][p["a"]]) & set(layer["top"][p["b"]]))
            if abs(p["iou"] - inter / (2 * K - inter)) > 1e-12:
                failures.append(f"layer {layer['layer']} {p['a']}-{p['b']}: iou disagrees with the top sets")
            if not (0 < p["p_value"] <= 1):
                failures.append(f"p_value {p['p_value']}")
    for key in ("config", "config_hash", "model", "seed", "versions"):
        if key not in doc["provenance"]:
            failures.append(f"provenance lacks {key}")
    names = set(safetensors_names(os.path.join(out, "probe_stats.safetensors")))
    for d in DOMAINS:
        for want in (f"0.{d}.layer0.mean_abs", f"0.{d}.layer29.freq", f"0.{d}.tokens"):
            if want not in names:
                failures.append(f"probe_stats.safetensors lacks {want}")

    # The table: per layer and pair, IoU / random / ratio / p.
    rnd = layers[0]["pairs"][0]["iou_random"]
    print(f"SmolLM2-135M-Instruct, {args.samples} samples/domain, max_length 128, K={K} of 1536, "
          f"random IoU {rnd:.4f}, probe took {took:.0f} s")
    pairs = [(p["a"], p["b"]) for p in layers[0]["pairs"]]
    print("layer " + " ".join(f"{a[:4]}-{b[:4]:<4} iou  ratio   p   " for a, b in pairs))
    for layer in layers:
        cells = []
        for p in layer["pairs"]:
            cells.append(f"{p['iou']:.3f} {p['ratio']:5.2f} {p['p_value']:.3f}    ")
        print(f"{layer['layer']:>5} " + "  ".join(cells))
    print(f"mean IoU {m['mean_iou']:.3f}, mean ratio {m['mean_ratio']:.2f}, "
          f"pairs with p <= 0.05: {m['pairs_p_le_0.05']}/{m['pairs_total']}")
    tok = layers[len(layers) // 2]["token_overlap"]
    print(f"token-level (layer {len(layers) // 2}): random {tok['iou_random']:.4f}, within "
          + ", ".join(f"{d} {tok['within'][d]['mean']:.3f}" for d in DOMAINS) + "; across "
          + ", ".join(f"{x['a'][:4]}-{x['b'][:4]} {x['mean']:.3f}" for x in tok["across"]))

    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
