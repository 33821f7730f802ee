#!/usr/bin/env python3
"""Checks the bundled data/ subset: schema of every file, no training prompt in any evaluation or
held-out file, counts and checksums as data/manifest.json states them, and (when ../shared's raw data
is present) that scripts/prepare_data.py regenerates the bundled files byte for byte from the same seed,
that the bundled files are prefixes of the full run, and that the full run has no leakage either.

Run by ctest as: python tests/python/test_data_splits.py --binary B --shared S --repo R
Exit 0 pass, 1 fail, 77 skip.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

SCHEMAS = {
    "loss": {"prompt": str, "response": str},
    "mc": {"question": str, "choices": list, "answer": int},
    "gen": {"prompt": str, "answer": str},
    "code": {"prompt": str, "tests": str, "entry_point": str, "prompt_style": str},
}
EXPECTED_FILES = [
    "code/train.jsonl", "code/heldout.jsonl", "code/humaneval.jsonl", "code/mbpp_test.jsonl",
    "math/train.jsonl", "math/heldout.jsonl", "math/gsm8k_test.jsonl",
    "medical/train.jsonl", "medical/heldout.jsonl", "medical/pubmedqa_test.jsonl", "medical/mmlu_medical.jsonl",
    "chat/train.jsonl", "chat/heldout.jsonl", "chat/arc_challenge.jsonl", "chat/mmlu_general.jsonl",
    "general/mmlu_probe.jsonl",
]

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print("FAIL:", msg)


def norm(s: str) -> str:
    return " ".join(s.lower().split())


def load_dir(root: str) -> tuple[dict, dict[str, list[dict]], dict[str, bytes]]:
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    recs, blobs = {}, {}
    for name in manifest["files"]:
        with open(os.path.join(root, name), "rb") as f:
            blobs[name] = f.read()
        rows = []
        text = blobs[name].decode("utf-8")
        if text and not text.endswith("\n"):
            fail(f"{root}/{name}: last line lacks its newline")
        for i, line in enumerate(text.split("\n")[:-1]):  # records end in "\n"; never splitlines()
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                fail(f"{root}/{name}:{i + 1}: not JSON ({e})")
        recs[name] = rows
    return manifest, recs, blobs


def check_schema(root: str, manifest: dict, recs: dict, blobs: dict) -> None:
    missing = [n for n in EXPECTED_FILES if n not in manifest["files"]]
    if missing:
        fail(f"{root}: manifest lacks {missing}")
    for name, meta in manifest["files"].items():
        schema = SCHEMAS.get(meta["schema"])
        if schema is None:
            fail(f"{name}: unknown schema {meta['schema']!r}")
            continue
        rows = recs[name]
        if len(rows) != meta["records"]:
            fail(f"{name}: {len(rows)} records, manifest says {meta['records']}")
        if hashlib.sha256(blobs[name]).hexdigest() != meta["sha256"]:
            fail(f"{name}: sha256 differs from manifest")
        if not rows:
            fail(f"{name}: empty")
        ids = set()
        for i, r in enumerate(rows):
            where = f"{name}:{i + 1}"
            for field, typ in list(schema.items()) + [("id", str), ("source", str)]:
                if not isinstance(r.get(field), typ) or isinstance(r.get(field), bool):
                    fail(f"{where}: field '{field}' missing or not {typ.__name__}")
                    break
                if typ is str and field not in ("tests",) and not r[field].strip():
                    fail(f"{where}: field '{field}' is empty")
                    break
            else:
                if meta["schema"] == "mc":
                    ch = r["choices"]
                    if len(ch) < 2 or not all(isinstance(c, str) and c for c in ch) or not 0 <= r["answer"] < len(ch):
                        fail(f"{where}: bad choices/answer")
                if meta["schema"] == "code":
                    if r["prompt_style"] not in ("completion", "instruction") or not r["entry_point"].isidentifier():
                        fail(f"{where}: bad prompt_style or entry_point")
                    if r["entry_point"] not in r["tests"] and r["prompt_style"] == "instruction":
                        fail(f"{where}: tests never call {r['entry_point']}")
                if r["id"] in ids:
                    fail(f"{where}: duplicate id {r['id']}")
                ids.add(r["id"])


def check_leakage(root: str, recs: dict) -> None:
    train = {n for n in recs if n.endswith("/train.jsonl")}
    evals: dict[str, str] = {}
    for name, rows in recs.items():
        if name in train:
            continue
        for r in rows:
            evals.setdefault(norm(r.get("prompt") or r.get("question") or ""), name)
    n = 0
    for name in sorted(train):
        for r in recs[name]:
            k = norm(r["prompt"])
            n += 1
            if k in evals:
                fail(f"{root}: training prompt {r['id']} of {name} appears in {evals[k]}")
    # MMLU subjects are used by one file each.
    seen: dict[str, str] = {}
    for name, rows in recs.items():
        for s in {r.get("subject") for r in rows if r.get("source") == "MMLU"}:
            if s in seen and seen[s] != name:
                fail(f"MMLU subject {s} in both {seen[s]} and {name}")
            seen[s] = name
    print(f"leakage: {n} training prompts checked against {len(evals)} evaluation/held-out prompts in {root}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary")
    ap.add_argument("--shared")
    ap.add_argument("--repo", required=True)
    args = ap.parse_args()
    data = os.path.join(args.repo, "data")
    if not os.path.isfile(os.path.join(data, "manifest.json")):
        print(f"FAIL: {data}/manifest.json is missing (the bundled subset should be in the repo)")
        return 1
    manifest, recs, blobs = load_dir(data)
    check_schema(data, manifest, recs, blobs)
    check_leakage(data, recs)

    raw = os.path.join(args.shared, "data", "raw") if args.shared else None
    if raw and os.path.isdir(raw):
        script = os.path.join(args.repo, "scripts", "prepare_data.py")
        with tempfile.TemporaryDirectory() as tmp:
            capped, full = os.path.join(tmp, "capped"), os.path.join(tmp, "full")
            base = [sys.executable, script, "--raw", raw, "--seed", str(manifest["seed"])]
            for out, extra in ((capped, ["--max-per-file", str(manifest.get("max_per_file") or 0)]), (full, [])):
                p = subprocess.run(base + ["--output", out] + extra, capture_output=True, text=True)
                if p.returncode != 0:
                    fail(f"prepare_data.py {' '.join(extra)} failed: {p.stderr.strip()[-2000:]}")
                    return 1
            for name in list(manifest["files"]) + ["manifest.json"]:
                with open(os.path.join(capped, name), "rb") as f:
                    if f.read() != (blobs.get(name) or open(os.path.join(data, name), "rb").read()):
                        fail(f"regenerated {name} differs from the bundled data/{name} "
                             "(re-run scripts/prepare_data.py with the manifest's seed and max_per_file)")
            fman, frecs, fblobs = load_dir(full)
            check_schema(full, fman, frecs, fblobs)
            check_leakage(full, frecs)
            for name in manifest["files"]:
                if not fblobs[name].startswith(blobs[name]):
                    fail(f"bundled {name} is not a prefix of the full run's")
            print("regeneration: bundled files reproduced byte for byte; full run: "
                  + ", ".join(f"{n}={m['records']}" for n, m in fman["files"].items()))
    else:
        print(f"note: {raw} absent; skipped the regeneration check")

    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print("data splits OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
