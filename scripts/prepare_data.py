#!/usr/bin/env python3
"""Turn the raw public datasets into sparsecl's JSONL layout under data/<domain>/.

Why: the trainer, the evaluator and the probes read one small set of record shapes, whatever the
dataset's published form was. This script is the only place that knows the published forms: the files
in ../shared/data/raw (GitHub releases, see its README) and the Hugging Face hub exports of the same
datasets (parquet / json / jsonl). It splits them deterministically from --seed, removes from every
training file any prompt that also occurs in an evaluation or held-out file, and writes data/README.md's
layout plus data/manifest.json (counts, seed, sha256 of every source and output file).

Record shapes (one JSON object per line, UTF-8, keys in this order; "id" and "source" always follow):
  loss  {"prompt", "response"}                 rendered through the chat template at load time,
                                               loss on response tokens only
  mc    {"question", "choices", "answer"}      answer = index into choices (log-likelihood scoring)
  gen   {"prompt", "answer"}                   answer = reference final answer (GSM8K: the number)
  code  {"prompt", "tests", "entry_point", "prompt_style"}
                                               tests = Python source that raises if the program is wrong;
                                               prompt_style "completion" (HumanEval: program = prompt +
                                               completion) or "instruction" (MBPP: the model writes it all)

Rules: a dataset's own test split is only ever evaluated on (MBPP task ids 11-510, GSM8K test, the MMLU
and ARC test files); splits of unsplit sources (CodeAlpaca, ChatDoctor, PubMedQA-L, AlpacaEval) are
seeded; every output file is shuffled with its own seeded RNG, and --max-per-file N keeps the first N
records, so a capped run is a prefix of the full one. No network access.

Usage:
  python scripts/prepare_data.py                                   # ../shared/data/raw -> data/
  python scripts/prepare_data.py --raw RAW --output OUT --seed 1234 [--max-per-file 150]
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import sys

FORMAT_VERSION = 1

# MMLU subjects by use. The medical list is fixed by the study; the rest follow MMLU's own categories:
# humanities + social sciences evaluate the chat domain, STEM + "other" (minus medicine) form the
# general-knowledge drift probe. No subject is used twice.
MMLU_MEDICAL = ["anatomy", "clinical_knowledge", "college_medicine", "medical_genetics",
                "nutrition", "professional_medicine", "virology"]
MMLU_GENERAL = [  # humanities + social sciences -> chat/mmlu_general.jsonl
    "econometrics", "formal_logic", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_microeconomics",
    "high_school_psychology", "high_school_us_history", "high_school_world_history", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
    "philosophy", "prehistory", "professional_law", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "world_religions"]
MMLU_PROBE = [  # STEM + other (non-medical) -> general/mmlu_probe.jsonl
    "abstract_algebra", "astronomy", "business_ethics", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_physics", "computer_security",
    "conceptual_physics", "electrical_engineering", "elementary_mathematics", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "human_aging",
    "machine_learning", "management", "marketing", "miscellaneous", "professional_accounting"]

MBPP_TEST_IDS = range(11, 511)  # the MBPP paper's test split; 1-10 prompt, 511-600 validation, 601+ train

HELDOUT_FRACTION = {"code_alpaca": 0.10, "chatdoctor": 0.10, "alpaca_eval": 0.20}
PUBMEDQA_TRAIN_FRACTION = 0.5

SCHEMAS = {
    "loss": ("prompt", "response"),
    "mc": ("question", "choices", "answer"),
    "gen": ("prompt", "answer"),
    "code": ("prompt", "tests", "entry_point", "prompt_style"),
}
# output file -> schema; the order is the order of the manifest and README
OUTPUTS = {
    "code/train.jsonl": "loss", "code/heldout.jsonl": "loss",
    "code/humaneval.jsonl": "code", "code/mbpp_test.jsonl": "code",
    "math/train.jsonl": "loss", "math/heldout.jsonl": "loss", "math/gsm8k_test.jsonl": "gen",
    "medical/train.jsonl": "loss", "medical/heldout.jsonl": "loss",
    "medical/pubmedqa_test.jsonl": "mc", "medical/mmlu_medical.jsonl": "mc",
    "chat/train.jsonl": "loss", "chat/heldout.jsonl": "loss",
    "chat/arc_challenge.jsonl": "mc", "chat/mmlu_general.jsonl": "mc",
    "general/mmlu_probe.jsonl": "mc",
}
TRAIN_FILES = [k for k in OUTPUTS if k.endswith("/train.jsonl")]


class DataError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------- reading

class Raw:
    """The raw directory: finds a source by glob patterns and remembers every file it read."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise DataError(f"raw data directory not found: {root} (see data/README.md, or run "
                            "scripts/fetch_data.sh on a networked machine)")
        self.root = root
        self.used: dict[str, str] = {}

    def find(self, what: str, patterns: list[str], many: bool = False) -> list[str]:
        for pat in patterns:
            hits = sorted(p for p in glob.glob(os.path.join(self.root, pat), recursive=True) if os.path.isfile(p))
            if hits:
                return hits if many else hits[:1]
        raise DataError(f"{what}: none of {patterns} found under {self.root}")

    def open_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            data = f.read()
        self.used[os.path.relpath(path, self.root).replace(os.sep, "/")] = hashlib.sha256(data).hexdigest()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        return data

    def rows(self, path: str) -> list[dict]:
        """Rows of a .json (list, or dict of records), .jsonl(.gz) or .parquet file."""
        data = self.open_bytes(path)
        name = path[:-3] if path.endswith(".gz") else path
        try:
            if name.endswith(".parquet"):
                return _parquet_rows(data, path)
            text = data.decode("utf-8")
            if name.endswith(".jsonl"):
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot parse ({e})") from e
        if isinstance(obj, list):
            return obj
        if isinstance(obj, dict):  # PubMedQA's ori_pqal.json: {pmid: record}
            return [dict(v, _key=k) for k, v in obj.items()]
        raise DataError(f"{path}: expected a JSON list or object")


def _parquet_rows(data: bytes, path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    return pq.read_table(io.BytesIO(data)).to_pylist()


def need(row: dict, key: str, path: str, alts: tuple[str, ...] = ()):
    for k in (key,) + alts:
        if k in row and row[k] is not None:
            return row[k]
    raise DataError(f"{path}: record {str(row)[:120]!r} lacks field '{key}'")


def clean(s: str) -> str:
    return s.replace("\r\n", "\n").strip()


def join_instruction(instruction: str, inp: str) -> str:
    instruction, inp = clean(instruction), clean(inp or "")
    return f"{instruction}\n\n{inp}" if inp else instruction


def norm(s: str) -> str:
    """The normalisation the leakage check uses (also in tests/python/test_data_splits.py)."""
    return " ".join(s.lower().split())


# ------------------------------------------------------------------------------------------ sources

def load_code_alpaca(raw: Raw) -> list[dict]:
    path = raw.find("CodeAlpaca", ["code/code_alpaca_2k.json", "code/code_alpaca_20k.json",
                                   "code/**/code_alpaca*.json*", "code/**/codealpaca*/**/*.parquet"])[0]
    out = []
    for i, r in enumerate(raw.rows(path)):
        resp = clean(need(r, "output", path))
        if not resp:
            continue
        out.append(rec_loss(join_instruction(need(r, "instruction", path), r.get("input", "")), resp,
                            f"code_alpaca:{i}", "CodeAlpaca"))
    return out


def load_humaneval(raw: Raw) -> list[dict]:
    path = raw.find("HumanEval", ["code/HumanEval.jsonl.gz", "code/HumanEval.jsonl", "code/**/HumanEval*.jsonl*",
                                  "code/**/openai_humaneval/**/*.parquet", "code/**/humaneval*.parquet"])[0]
    out = []
    for r in raw.rows(path):
        entry = need(r, "entry_point", path)
        tests = need(r, "test", path).rstrip() + f"\n\ncheck({entry})\n"
        out.append({"prompt": need(r, "prompt", path), "tests": tests, "entry_point": entry,
                    "prompt_style": "completion", "id": need(r, "task_id", path), "source": "HumanEval"})
    return out


def load_mbpp(raw: Raw) -> list[dict]:
    """MBPP rows as {task_id, text, code, tests(list), setup}; accepts the sanitized jsonl (text,
    test_setup_code), google-research's sanitized-mbpp.json and the HF parquet splits (prompt,
    test_imports), and the full mbpp.jsonl."""
    paths = raw.find("MBPP", ["code/mbpp_sanitized.jsonl", "code/sanitized-mbpp.json",
                              "code/**/sanitized/*.parquet", "code/mbpp.jsonl", "code/**/mbpp*.jsonl",
                              "code/**/full/*.parquet"], many=True)
    rows = {}
    for path in paths:
        for r in raw.rows(path):
            tid = int(need(r, "task_id", path))
            setup = r.get("test_setup_code") or ""
            if r.get("test_imports"):
                setup = "\n".join(list(r["test_imports"]) + ([setup] if setup else []))
            tests = [t.strip() for t in need(r, "test_list", path)]
            code = clean(need(r, "code", path))
            rows[tid] = {"task_id": tid, "text": clean(need(r, "text", path, ("prompt",))), "code": code,
                         "tests": tests, "setup": setup.strip(), "entry_point": mbpp_entry_point(code, tests, path)}
    return [rows[k] for k in sorted(rows)]


def mbpp_entry_point(code: str, tests: list[str], path: str) -> str:
    names = re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", code, flags=re.M)
    joined = "\n".join(tests)
    for n in names:
        if re.search(rf"\b{re.escape(n)}\s*\(", joined):
            return n
    if names:
        return names[0]
    raise DataError(f"{path}: MBPP code defines no function: {code[:80]!r}")


def mbpp_prompt(m: dict) -> str:
    return m["text"] + "\nYour code should pass these tests:\n" + "\n".join(m["tests"])


def load_gsm8k(raw: Raw, split: str) -> list[dict]:
    path = raw.find(f"GSM8K {split}", [f"math/gsm8k_{split}.jsonl", f"math/{split}.jsonl",
                                        f"math/**/main/{split}-*.parquet", f"math/**/{split}-*.parquet"])[0]
    out = []
    for i, r in enumerate(raw.rows(path)):
        q, a = clean(need(r, "question", path)), clean(need(r, "answer", path))
        if "####" not in a:
            raise DataError(f"{path}: record {i} answer lacks '#### N'")
        out.append({"question": q, "solution": re.sub(r"<<[^>]*>>", "", a),
                    "final": a.rsplit("####", 1)[1].strip().replace(",", ""), "id": f"gsm8k_{split}:{i}"})
    return out


def load_pubmedqa(raw: Raw) -> list[dict]:
    path = raw.find("PubMedQA", ["medical/pubmedqa_pqal.json", "medical/ori_pqal.json",
                                 "medical/**/pqa_labeled/*.parquet"])[0]
    out = []
    for r in raw.rows(path):
        if "_key" in r:  # ori_pqal.json
            pmid, ctx = r["_key"], r.get("CONTEXTS") or []
            q, long_a, dec = need(r, "QUESTION", path), need(r, "LONG_ANSWER", path), need(r, "final_decision", path)
        else:  # HF qiaojin/PubMedQA pqa_labeled
            pmid, c = str(need(r, "pubid", path)), need(r, "context", path)
            ctx = c.get("contexts") if isinstance(c, dict) else c
            q, long_a, dec = need(r, "question", path), need(r, "long_answer", path), need(r, "final_decision", path)
        if dec not in ("yes", "no", "maybe"):
            raise DataError(f"{path}: PMID {pmid}: final_decision {dec!r} is not yes/no/maybe")
        question = "Abstract: " + " ".join(clean(c) for c in ctx) + "\nQuestion: " + clean(q)
        out.append({"pmid": str(pmid), "question": question, "long_answer": clean(long_a), "decision": dec})
    return sorted(out, key=lambda x: x["pmid"])


def load_chatdoctor(raw: Raw) -> list[dict]:
    path = raw.find("ChatDoctor", ["medical/chatdoctor5k.json", "medical/**/chatdoctor*.json",
                                   "medical/**/HealthCareMagic*.json", "medical/**/*ChatDoctor*/**/*.parquet"])[0]
    out = []
    for i, r in enumerate(raw.rows(path)):
        resp = clean(need(r, "output", path))
        if resp:
            out.append(rec_loss(join_instruction(need(r, "instruction", path), r.get("input", "")), resp,
                                f"chatdoctor:{i}", "ChatDoctor"))
    return out


def load_alpaca_eval(raw: Raw) -> list[dict]:
    path = raw.find("AlpacaEval", ["chat/alpaca_eval.jsonl", "chat/alpaca_eval.json", "chat/**/alpaca_eval*.json*"])[0]
    out = []
    for i, r in enumerate(raw.rows(path)):
        resp = clean(need(r, "output", path))
        if resp:
            out.append(rec_loss(clean(need(r, "instruction", path)), resp, f"alpaca_eval:{i}", "AlpacaEval"))
    return out


def load_mmlu(raw: Raw) -> dict[str, list[dict]]:
    """subject -> MC records of its test split. Accepts the original CSVs (test/<subject>_test.csv) and
    HF cais/mmlu parquet (all/test-*.parquet with a subject column, or <subject>/test-*.parquet)."""
    by_subject: dict[str, list[dict]] = {}
    csvs = sorted(glob.glob(os.path.join(raw.root, "general/mmlu/test/*_test.csv")))
    if csvs:
        for path in csvs:
            subject = os.path.basename(path)[: -len("_test.csv")]
            text = raw.open_bytes(path).decode("utf-8")
            for i, row in enumerate(csv.reader(io.StringIO(text))):
                if len(row) != 6 or row[5].strip() not in "ABCD" or not row[5].strip():
                    raise DataError(f"{path}: row {i} is not question,A,B,C,D,answer")
                by_subject.setdefault(subject, []).append(
                    rec_mc(row[0], row[1:5], "ABCD".index(row[5].strip()), f"mmlu:{subject}:{i}", "MMLU", subject))
        return by_subject
    paths = raw.find("MMLU", ["general/mmlu/all/test-*.parquet", "general/**/mmlu/**/test-*.parquet"], many=True)
    counters: dict[str, int] = {}
    for path in paths:
        for r in raw.rows(path):
            subject = r.get("subject") or os.path.basename(os.path.dirname(path))
            i = counters.get(subject, 0)
            counters[subject] = i + 1
            by_subject.setdefault(subject, []).append(
                rec_mc(need(r, "question", path), list(need(r, "choices", path)), int(need(r, "answer", path)),
                       f"mmlu:{subject}:{i}", "MMLU", subject))
    return by_subject


def load_arc(raw: Raw) -> list[dict]:
    path = raw.find("ARC-Challenge", ["general/arc_challenge_test.jsonl", "general/**/ARC-Challenge/test-*.parquet",
                                      "general/**/ARC-Challenge-Test.jsonl"])[0]
    out = []
    for r in raw.rows(path):
        q = need(r, "question", path)
        if isinstance(q, dict):  # AI2's own jsonl: question{stem, choices[{text,label}]}
            texts = [c["text"] for c in q["choices"]]
            labels = [c["label"] for c in q["choices"]]
            q = q["stem"]
        else:
            ch = need(r, "choices", path)
            texts, labels = list(ch["text"]), list(ch["label"])
        key = need(r, "answerKey", path)
        if key not in labels:
            raise DataError(f"{path}: {r.get('id')}: answerKey {key!r} not among labels {labels}")
        out.append(rec_mc(q, texts, labels.index(key), need(r, "id", path), "ARC-Challenge"))
    return out


# ----------------------------------------------------------------------------------------- records

def rec_loss(prompt: str, response: str, rid: str, source: str) -> dict:
    return {"prompt": prompt, "response": response, "id": rid, "source": source}


def rec_mc(question: str, choices: list, answer: int, rid: str, source: str, subject: str | None = None) -> dict:
    choices = [clean(str(c)) for c in choices]
    if not 0 <= answer < len(choices):
        raise DataError(f"{source} {rid}: answer {answer} outside {len(choices)} choices")
    r = {"question": clean(question), "choices": choices, "answer": answer, "id": rid, "source": source}
    if subject:
        r["subject"] = subject
    return r


def rng_for(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")  # str seeds hash with sha512: stable across runs and platforms


def split(records: list, fraction: float, seed: int, name: str) -> tuple[list, list]:
    """(first, second) with round(len*fraction) records in `second`, chosen by a seeded shuffle."""
    idx = list(range(len(records)))
    rng_for(seed, "split:" + name).shuffle(idx)
    k = int(math.floor(len(records) * fraction + 0.5))
    second = set(idx[:k])
    return ([r for i, r in enumerate(records) if i not in second], [r for i, r in enumerate(records) if i in second])


def build(raw: Raw, seed: int) -> tuple[dict[str, list[dict]], dict]:
    files: dict[str, list[dict]] = {k: [] for k in OUTPUTS}

    # code
    ca_train, ca_held = split(load_code_alpaca(raw), HELDOUT_FRACTION["code_alpaca"], seed, "code_alpaca")
    mbpp = load_mbpp(raw)
    mbpp_test = [m for m in mbpp if m["task_id"] in MBPP_TEST_IDS]
    mbpp_train = [m for m in mbpp if m["task_id"] not in MBPP_TEST_IDS]
    files["code/train.jsonl"] = ca_train + [rec_loss(mbpp_prompt(m), m["code"], f"mbpp:{m['task_id']}", "MBPP")
                                            for m in mbpp_train]
    files["code/heldout.jsonl"] = ca_held + [rec_loss(mbpp_prompt(m), m["code"], f"mbpp:{m['task_id']}", "MBPP")
                                             for m in mbpp_test]
    files["code/humaneval.jsonl"] = load_humaneval(raw)
    files["code/mbpp_test.jsonl"] = [
        {"prompt": mbpp_prompt(m), "tests": "\n".join(([m["setup"]] if m["setup"] else []) + m["tests"]) + "\n",
         "entry_point": m["entry_point"], "prompt_style": "instruction", "id": f"mbpp:{m['task_id']}",
         "source": "MBPP"} for m in mbpp_test]

    # math
    files["math/train.jsonl"] = [rec_loss(g["question"], g["solution"], g["id"], "GSM8K")
                                 for g in load_gsm8k(raw, "train")]
    test = load_gsm8k(raw, "test")
    files["math/heldout.jsonl"] = [rec_loss(g["question"], g["solution"], g["id"], "GSM8K") for g in test]
    files["math/gsm8k_test.jsonl"] = [{"prompt": g["question"], "answer": g["final"], "id": g["id"], "source": "GSM8K"}
                                      for g in test]

    # medical
    pq_all = load_pubmedqa(raw)
    pq_train, pq_test = split(pq_all, 1.0 - PUBMEDQA_TRAIN_FRACTION, seed, "pubmedqa")
    cd_train, cd_held = split(load_chatdoctor(raw), HELDOUT_FRACTION["chatdoctor"], seed, "chatdoctor")

    def pq_loss(p):
        return rec_loss(p["question"], f"{p['decision']}. {p['long_answer']}", f"pubmedqa:{p['pmid']}", "PubMedQA")
    files["medical/train.jsonl"] = cd_train + [pq_loss(p) for p in pq_train]
    files["medical/heldout.jsonl"] = cd_held + [pq_loss(p) for p in pq_test]
    files["medical/pubmedqa_test.jsonl"] = [rec_mc(p["question"], ["yes", "no", "maybe"],
                                                   ["yes", "no", "maybe"].index(p["decision"]),
                                                   f"pubmedqa:{p['pmid']}", "PubMedQA") for p in pq_test]
    mmlu = load_mmlu(raw)
    known = set(MMLU_MEDICAL) | set(MMLU_GENERAL) | set(MMLU_PROBE)
    unknown = sorted(set(mmlu) - known)
    if unknown:
        raise DataError(f"MMLU subjects not assigned to any file: {unknown}")
    for name, subjects in (("medical/mmlu_medical.jsonl", MMLU_MEDICAL), ("chat/mmlu_general.jsonl", MMLU_GENERAL),
                           ("general/mmlu_probe.jsonl", MMLU_PROBE)):
        missing = [s for s in subjects if s not in mmlu]
        if missing:
            raise DataError(f"MMLU test split lacks subjects {missing}")
        files[name] = [r for s in subjects for r in mmlu[s]]

    # chat
    ae_train, ae_held = split(load_alpaca_eval(raw), HELDOUT_FRACTION["alpaca_eval"], seed, "alpaca_eval")
    files["chat/train.jsonl"], files["chat/heldout.jsonl"] = ae_train, ae_held
    files["chat/arc_challenge.jsonl"] = load_arc(raw)

    # Leakage: drop any training record whose prompt occurs (normalised) in any evaluation or held-out
    # file, and duplicates within the training files.
    eval_keys = {norm(r.get("prompt") or r.get("question")) for k, rs in files.items() if k not in TRAIN_FILES
                 for r in rs}
    dropped: dict[str, int] = {}
    seen: set[str] = set()
    for k in TRAIN_FILES:
        kept = []
        for r in files[k]:
            key = norm(r["prompt"])
            if key in eval_keys or key in seen:
                continue
            seen.add(key)
            kept.append(r)
        dropped[k] = len(files[k]) - len(kept)
        files[k] = kept
    for k in files:
        rng_for(seed, "order:" + k).shuffle(files[k])
    info = {"dropped_from_training_as_eval_or_duplicate": dropped}
    return files, info


def check_schema(name: str, r: dict) -> None:
    schema = OUTPUTS[name]
    for f in SCHEMAS[schema]:
        if f not in r:
            raise DataError(f"{name}: record {r.get('id')} lacks '{f}'")
    if schema == "mc" and not (isinstance(r["choices"], list) and 0 <= r["answer"] < len(r["choices"])):
        raise DataError(f"{name}: record {r.get('id')} has a bad answer index")


# Characters that str.splitlines() and some JSONL readers treat as line breaks; JSON allows them raw in
# strings, so escape them to keep "one record per \n-terminated line" true for every reader.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def dump_jsonl(records: list[dict]) -> bytes:
    out = []
    for r in records:
        line = json.dumps(r, ensure_ascii=False)
        for ch, esc in _LINE_BREAKS.items():
            line = line.replace(ch, esc)
        out.append(line + "\n")
    return "".join(out).encode("utf-8")


def main(argv=None) -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", default=os.path.join(repo, "..", "shared", "data", "raw"),
                    help="raw data directory (default: ../shared/data/raw beside the repo)")
    ap.add_argument("--output", default=os.path.join(repo, "data"), help="output directory (default: data/)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-per-file", type=int, default=0,
                    help="keep at most N records per output file (0 = all); used for the bundled subset")
    args = ap.parse_args(argv)
    try:
        raw = Raw(os.path.normpath(args.raw))
        files, info = build(raw, args.seed)
        manifest = {"format_version": FORMAT_VERSION, "generator": "scripts/prepare_data.py", "seed": args.seed,
                    "max_per_file": args.max_per_file or None, "files": {}, **info,
                    "mmlu_subjects": {"medical/mmlu_medical.jsonl": MMLU_MEDICAL,
                                      "chat/mmlu_general.jsonl": MMLU_GENERAL,
                                      "general/mmlu_probe.jsonl": MMLU_PROBE},
                    "sources": dict(sorted(raw.used.items()))}
        for name in OUTPUTS:
            recs = files[name]
            full = len(recs)
            if args.max_per_file:
                recs = recs[: args.max_per_file]
            for r in recs:
                check_schema(name, r)
            blob = dump_jsonl(recs)
            path = os.path.join(args.output, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
            manifest["files"][name] = {"schema": OUTPUTS[name], "records": len(recs), "records_uncapped": full,
                                       "sha256": hashlib.sha256(blob).hexdigest()}
            print(f"[prepare_data] {name:30s} {len(recs):6d} records" + (f" (of {full})" if len(recs) != full else ""))
        blob = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        with open(os.path.join(args.output, "manifest.json"), "wb") as f:
            f.write(blob)
        print(f"[prepare_data] wrote {args.output}/manifest.json (seed {args.seed})")
    except DataError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
