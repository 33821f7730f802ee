#!/usr/bin/env python3
"""Real-tokenizer parity: `sparsecl tokenize` against the reference implementations.

Takes a few thousand lines of the real corpora in <shared>/data/raw (code, math, medical, chat, ARC,
MMLU csv: whole multi-line records and their single lines, plus unicode / whitespace edge cases) and
runs them through every tokenizer in <shared>/assets/tokenizers, through tokenizer.json variants of
the qwen2_bpe fixture that exercise the other supported components, and through SentencePiece-style
tokenizer.json files (Llama-2 / Mistral: Metaspace or Prepend+Replace, byte fallback) that transformers'
own converter makes from the SentencePiece models. Without <shared> it runs the same checks on the
repository's copies (tests/data/tokenizers and the bundled data/ records) instead of skipping:
  tokenizer.json             HF `tokenizers` (and, on a subset, transformers' AutoTokenizer)
  tokenizer.model            python `sentencepiece`, with BOS as HF's Llama tokenizers add it
  vocab.json + merges.txt    transformers' GPT-2 tokenizer (no BOS)
Ids must be identical for every line with and without special tokens, and decode(ids) (specials kept)
identical too. Prints counts and the first mismatch per tokenizer; exit 1 on any mismatch, 77 (ctest
skip) when the reference packages are absent.

Run by ctest as: python test_tokenizer_parity.py --binary <sparsecl> --shared <../shared> --repo <root>
"""
import argparse
import csv
import glob
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sentencepiece_json  # noqa: E402

SKIP = 77


def skip(msg):
    print(f"SKIP: {msg}")
    sys.exit(SKIP)


# ---- corpus ----------------------------------------------------------------------------------------
def read_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def add_record(out, text, max_lines=6):
    """The whole (possibly multi-line) record, then up to max_lines of its lines."""
    if not isinstance(text, str) or not text:
        return
    out.append(text)
    if "\n" in text:
        for line in [l for l in text.split("\n") if l.strip()][:max_lines]:
            out.append(line)


def collect_texts(raw, per_source=60, seed=1234):
    rng = random.Random(seed)
    sources = {}

    def pick(items, n):
        items = list(items)
        if len(items) <= n:
            return items
        return items[: n // 3] + rng.sample(items[n // 3:], n - n // 3)

    def src(name, records):
        texts = []
        for r in records:
            add_record(texts, r)
        sources[name] = texts

    p = os.path.join(raw, "code", "HumanEval.jsonl.gz")
    if os.path.exists(p):
        recs = pick(read_jsonl(p), per_source)
        src("humaneval", [r["prompt"] + r["canonical_solution"] for r in recs] + [r["test"] for r in recs[:10]])
    p = os.path.join(raw, "code", "mbpp_sanitized.jsonl")
    if os.path.exists(p):
        recs = pick(read_jsonl(p), per_source)
        src("mbpp", [r["prompt"] if "prompt" in r else r.get("text", "") for r in recs] + [r["code"] for r in recs]
            + ["\n".join(r.get("test_list", [])) for r in recs[:15]])
    p = os.path.join(raw, "code", "code_alpaca_2k.json")
    if os.path.exists(p):
        recs = pick(json.load(open(p, encoding="utf-8")), per_source)
        src("code_alpaca", [r["instruction"] + ("\n" + r["input"] if r.get("input") else "") for r in recs]
            + [r["output"] for r in recs])
    for name in ("gsm8k_test.jsonl", "gsm8k_train.jsonl"):
        p = os.path.join(raw, "math", name)
        if os.path.exists(p):
            recs = pick(read_jsonl(p), per_source // 2)
            src(name.split(".")[0], [r["question"] for r in recs] + [r["answer"] for r in recs])
    p = os.path.join(raw, "medical", "chatdoctor5k.json")
    if os.path.exists(p):
        recs = pick(json.load(open(p, encoding="utf-8")), per_source)
        src("chatdoctor", [r["input"] for r in recs] + [r["output"] for r in recs])
    p = os.path.join(raw, "medical", "pubmedqa_pqal.json")
    if os.path.exists(p):
        recs = pick(json.load(open(p, encoding="utf-8")).values(), per_source // 2)
        src("pubmedqa", [r["QUESTION"] for r in recs] + ["\n".join(r["CONTEXTS"]) for r in recs]
            + [r.get("LONG_ANSWER", "") for r in recs])
    p = os.path.join(raw, "chat", "alpaca_eval.jsonl")
    if os.path.exists(p):
        recs = pick(read_jsonl(p), per_source)
        src("alpaca_eval", [r["instruction"] for r in recs] + [r["output"] for r in recs])
    p = os.path.join(raw, "chat", "mt_bench_questions.jsonl")
    if os.path.exists(p):
        recs = pick(read_jsonl(p), per_source)
        src("mt_bench", [t for r in recs for t in r["turns"]])
    p = os.path.join(raw, "general", "arc_challenge_test.jsonl")
    if os.path.exists(p):
        recs = pick(read_jsonl(p), per_source // 2)
        src("arc", [r["question"] + "\n" + "\n".join(f"{l}. {t}" for l, t in zip(r["choices"]["label"], r["choices"]["text"]))
                    for r in recs] + [r.get("response", "") for r in recs])
    mmlu = sorted(glob.glob(os.path.join(raw, "general", "mmlu", "*", "*.csv")))
    if mmlu:
        files = pick(mmlu, 40)
        recs = []
        for f in files:
            with open(f, encoding="utf-8", newline="") as fh:
                rows = list(csv.reader(fh))
            for row in rows[:3]:
                if len(row) >= 6:
                    recs.append(f"{row[0]}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer: {row[5]}")
            with open(f, encoding="utf-8", newline="") as fh:
                recs.extend(fh.read().splitlines()[:2])  # raw csv lines, quotes and commas included
        src("mmlu", recs)

    sources["edge"] = EDGE_CASES
    sources["fuzz"] = fuzz_texts(rng, 400)
    return sources


EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "a  b   c    d", "x\n\n\n\ny", "\t\tindented\n\t\t\tmore",
    "trailing   ", "   leading", "mixed \t \n \r\n whitespace", "    def f():\n        return 1\n",
    "naïve café déjà vu — “quotes” ‘single’ … ½ ° ± × ÷", "日本語のテキストと中文和한국어", "Ελληνικά Русский עברית العربية",
    "emoji 👍🏽🎉 👨\u200d👩\u200d👧 🇫🇷", "e\u0301 (decomposed) vs é", "Å vs A\u030a", "ﬁ ligature ① ²",
    "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "tab\there", "numbers 1 12 123 1234 12345 3.14159 -42 1e-5",
    "I'm here, don't you know? WE'LL see; they'd've", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "<s>[INST] hi [/INST]</s>",
    "<|endoftext|>between<|endoftext|>", "<think>\nhmm\n</think>\n\nanswer", "x" * 300, " " * 50 + "end",
    "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$", "http://example.com/a?b=c&d=e#f", "C:\\path\\to\\file.txt",
    "{\"json\": [1, 2, {\"k\": null}]}", "a\u3000b", "\u2028line sep\u2029para sep", "\x0bvt\x0cff\x1cfs\x85nel",
    "\u2581already\u2581metaspace\u2581\u2581", " <s> spaced special </s> ", "<unk><s></s>", "\u2581 \u2581",
]


def collect_repo_texts(repo, per_file=120, seed=1234):
    """Without <shared>: every string field of the bundled data/ records (code, math, medical, chat,
    general), their lines, and the same edge cases and fuzz."""
    rng = random.Random(seed)
    sources = {}
    for path in sorted(glob.glob(os.path.join(repo, "data", "*", "*.jsonl"))):
        texts = []

        def strings(x):
            if isinstance(x, str):
                add_record(texts, x)
            elif isinstance(x, list):
                for v in x:
                    strings(v)
            elif isinstance(x, dict):
                for k, v in x.items():
                    if k not in ("id", "source"):
                        strings(v)
        recs = read_jsonl(path)
        for r in recs[:per_file]:
            strings(r)
        sources[os.path.relpath(path, os.path.join(repo, "data"))] = texts
    sources["edge"] = EDGE_CASES
    sources["fuzz"] = fuzz_texts(rng, 400)
    return sources


def fuzz_texts(rng, n):
    """Random strings over character classes where regex engines and normalisers tend to disagree."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "'\"!?.,;:-_()[]{}<>/\\|@#$%^&*+=~`",
        " ", "  ", "\t", "\n", "\r\n", "\u00a0\u2000\u2009\u3000\u1680\u202f\u205f\u0085\u000b\u000c\u001c\u001f",
        "\u200b\u200c\u200d\u2060\ufeff", "àéîõüçñßøåæœÀÉÎÕÜ", "e\u0301a\u0308o\u0302\u0323", "日本語中文한국어ひらがなカタカナ",
        "ΑΒΓαβγЖжЩщאבגابت", "١٢٣٤٥٦٧٨٩٠०१२३४५", "²³¹¼½¾ⅠⅡⅢ①②", "👍🏽🎉🇫🇷👨\u200d👩\u200d👧🙂", "ﬁﬂ℃№™Å",
        "'s'S'll'LL'Ve'd'M", "ǅǈǋ\u0345ΐ", "\U0001d400\U0001d7ce\U00020000",
    ]
    out = []
    for _ in range(n):
        k = rng.randint(1, 24)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(k)))
    return out


# ---- references ------------------------------------------------------------------------------------
class Reference:
    def __init__(self, name, d):
        self.name, self.dir = name, d
        files = set(os.listdir(d))
        self.check_transformers = None
        if "tokenizer.json" in files:
            import tokenizers
            self.kind = "tokenizers"
            self.tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
            try:
                import transformers  # noqa: F401
                self.check_transformers = True
            except ImportError:
                self.check_transformers = False
        elif "tokenizer.model" in files:
            import sentencepiece
            self.kind = "sentencepiece"
            self.sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
        elif "vocab.json" in files and "merges.txt" in files:
            from transformers import GPT2TokenizerFast
            self.kind = "gpt2"
            self.tok = GPT2TokenizerFast.from_pretrained(d)
        else:
            raise RuntimeError(f"{d}: no tokenizer files")

    def encode(self, text, special):
        if self.kind == "tokenizers":
            return self.tok.encode(text, add_special_tokens=special).ids
        if self.kind == "sentencepiece":
            ids = self.sp.encode(text)
            return ([self.sp.bos_id()] if special and self.sp.bos_id() >= 0 else []) + ids
        return self.tok.encode(text, add_special_tokens=special)

    def vocab_size(self):
        if self.kind == "sentencepiece":
            return self.sp.get_piece_size()
        if self.kind == "tokenizers":
            return self.tok.get_vocab_size(with_added_tokens=True)
        return len(self.tok)

    def decode(self, ids):
        if self.kind == "tokenizers":
            return self.tok.decode(ids, skip_special_tokens=False)
        if self.kind == "sentencepiece":
            return self.sp.decode(ids)
        return self.tok.backend_tokenizer.decode(ids, skip_special_tokens=False)


def run_binary(binary, tok_dir, texts, special, key="text"):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}, ensure_ascii=False) + "\n")
        path = f.name
    try:
        cmd = [binary, "tokenize", "--tokenizer", tok_dir, "--input", path] + ([] if special else ["--no-special"])
        r = subprocess.run(cmd, capture_output=True, timeout=900)
    finally:
        os.unlink(path)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")
    # split on "\n" only: str.splitlines() would also split at U+2028, U+0085, ... inside the JSON strings
    out = [json.loads(l) for l in r.stdout.decode("utf-8").split("\n") if l]
    if len(out) != len(texts):
        raise RuntimeError(f"{tok_dir}: {len(out)} output lines for {len(texts)} inputs")
    return out


def component_variants(repo, out_dir):
    """tokenizer.json variants of the qwen2_bpe fixture exercising components the real files do not use
    (Digits as in SmolLM, ByteLevel with prefix space and its own regex, NFKC/NFD, Split with a String
    pattern and every delimiter behaviour, inverted Split patterns, TemplateProcessing with BOS and EOS,
    ignore_merges)."""
    base = json.load(open(os.path.join(repo, "tests", "data", "tokenizers", "qwen2_bpe", "tokenizer.json"), encoding="utf-8"))
    bl = lambda prefix, regex: {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": regex}
    variants = {
        "digits_individual": {"normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, bl(False, True)]}},
        "digits_runs": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": False}, bl(False, True)]}},
        "bytelevel_prefix_space": {"normalizer": None, "pre_tokenizer": bl(True, True)},
        "nfkc_split_removed": {"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}]},
                               "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                                   {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed", "invert": False},
                                   bl(False, False)]}},
        "nfd_split_string": {"normalizer": {"type": "NFD"}, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated", "invert": False}, bl(False, False)]}},
        "template_bos_eos": {"post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
                               "<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}}}},
        "ignore_merges": {"model": dict(base["model"], ignore_merges=True)},
        "split_merged_previous": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "MergedWithPrevious", "invert": False},
            bl(False, False)]}},
        "split_merged_next": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "[.,;:!?]"}, "behavior": "MergedWithNext", "invert": False},
            bl(False, False)]}},
        "split_contiguous": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"String": " "}, "behavior": "Contiguous", "invert": False},
            bl(False, False)]}},
        "split_invert": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{L}+|\\p{N}+"}, "behavior": "Isolated", "invert": True},
            bl(False, False)]}},
        "split_invert_removed": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\S+"}, "behavior": "Removed", "invert": True},
            bl(False, False)]}},
    }
    dirs = {}
    for name, change in variants.items():
        j = dict(base)
        j.update(change)
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(j, f, ensure_ascii=False)
        dirs[name] = d
    return dirs


def sentencepiece_json_variants(model_file, out_dir, prefix):
    """SentencePiece-style tokenizer.json files made from a SentencePiece BPE model by transformers' own
    converter (LlamaTokenizerFast from tokenizer.model), in the forms published checkpoints ship:
      metaspace_first   what the converter writes today: Metaspace (prepend_scheme first, no split)
      hub_normalizer    the Llama-2 / Mistral hub files: Prepend("▁") + Replace(" " -> "▁")
                        normalizer, no pre-tokenizer, BOS by TemplateProcessing
      metaspace_split   Metaspace in its pre-0.15 form (add_prefix_space, split on every "▁") with
                        the Metaspace decoder
      unk_no_fallback   no byte fallback: characters outside the vocabulary become a fused <unk>
    Returns {name: dir}, or {} (with the reason printed) when the converter cannot run here."""
    converted = sentencepiece_json.convert(model_file, out_dir, prefix + "_converted")
    if converted is None:
        return {}
    base = json.load(open(os.path.join(converted, "tokenizer.json"), encoding="utf-8"))
    bos = next(t for t in base["added_tokens"] if t["content"] == "<s>")
    metaspace_decoder = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}
    variants = {
        "metaspace_first": {},
        "hub_normalizer": {
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": None,
            "post_processor": {"type": "TemplateProcessing",
                               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {"<s>": {"id": "<s>", "ids": [bos["id"]], "tokens": ["<s>"]}}}},
        "metaspace_split": {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True},
                            "decoder": metaspace_decoder},
        "unk_no_fallback": {"model": dict(base["model"], byte_fallback=False, unk_token="<unk>", fuse_unk=True)},
    }
    dirs = {}
    for name, change in variants.items():
        j = dict(base)
        j.update(change)
        d = os.path.join(out_dir, f"{prefix}_{name}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(j, f, ensure_ascii=False)
        dirs[f"{prefix}_{name}"] = d
    return dirs


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--shared", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--per-source", type=int, default=60)
    ap.add_argument("--only", default="", help="comma-separated tokenizer names")
    args = ap.parse_args()

    tok_root = os.path.join(args.shared, "assets", "tokenizers")
    raw = os.path.join(args.shared, "data", "raw")
    with_shared = os.path.isdir(tok_root) and os.path.isdir(raw)
    if not with_shared:
        print(f"note: {tok_root} or {raw} is absent: checking the repository's tokenizers on its bundled data")
        tok_root = os.path.join(args.repo, "tests", "data", "tokenizers")
    try:
        import sentencepiece  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        skip(f"reference package missing: {e} (pip install tokenizers sentencepiece transformers)")
    if not os.path.exists(args.binary):
        print(f"FAIL: binary {args.binary} does not exist")
        return 1

    sources = collect_texts(raw, args.per_source) if with_shared else collect_repo_texts(args.repo)
    texts = []
    for name, ts in sources.items():
        ts = [t for t in ts if isinstance(t, str)]
        texts.extend(ts)
    # Valid UTF-8 only (no lone surrogates).
    texts = [t for t in texts if not any(0xD800 <= ord(c) <= 0xDFFF for c in t)]
    n_lines = sum(1 for t in texts if "\n" not in t)
    print(f"corpus: {len(texts)} texts ({n_lines} single lines, {len(texts) - n_lines} multi-line records) from "
          + ", ".join(f"{k}={len(v)}" for k, v in sources.items()))
    need = 2000 if with_shared else 1000
    if len(texts) < need:
        print(f"FAIL: only {len(texts)} texts collected (need >= {need})")
        return 1

    variant_root = tempfile.mkdtemp(prefix="sparsecl_tok_variants_")
    dirs = {n: os.path.join(tok_root, n) for n in sorted(os.listdir(tok_root))
            if os.path.isdir(os.path.join(tok_root, n)) and n != "chat"}
    dirs.update({f"variant:{n}": d for n, d in component_variants(args.repo, variant_root).items()})
    sp_models = ({"llama2": os.path.join(tok_root, "llama2", "tokenizer.model"),
                  "mistral_v1": os.path.join(tok_root, "mistral_v1", "tokenizer.model")} if with_shared else
                 {"llama2": os.path.join(tok_root, "llama2_sp", "tokenizer.model")})
    for prefix, model_file in sp_models.items():
        if os.path.exists(model_file):
            dirs.update({f"spjson:{n}": d for n, d in sentencepiece_json_variants(model_file, variant_root, prefix).items()})
    if args.only:
        dirs = {n: d for n, d in dirs.items() if n in args.only.split(",")}
    failures = 0
    for name, d in dirs.items():
        t0 = time.time()
        ref = Reference(name, d)
        results = {}
        for special in (True, False):
            t1 = time.time()
            results[special] = run_binary(args.binary, d, texts, special)
            results[f"time{special}"] = time.time() - t1
        mism = {"ids": 0, "ids_no_special": 0, "decoded": 0}
        first = None
        for i, text in enumerate(texts):
            for special, key in ((True, "ids"), (False, "ids_no_special")):
                exp = ref.encode(text, special)
                got = results[special][i]["ids"]
                if got != exp:
                    mism[key] += 1
                    if first is None:
                        k = first_diff(got, exp)
                        first = (f"{key} of text #{i} {text[:200]!r}: first difference at token {k}: "
                                 f"sparsecl {got[max(0, k - 3):k + 5]} vs reference {exp[max(0, k - 3):k + 5]}")
            exp_ids = ref.encode(text, True)
            exp_dec = ref.decode(exp_ids)
            got_dec = results[True][i]["decoded"]
            if results[True][i]["ids"] == exp_ids and got_dec != exp_dec:
                mism["decoded"] += 1
                if first is None:
                    k = first_diff(got_dec, exp_dec)
                    first = f"decode of text #{i}: at char {k}: sparsecl {got_dec[k:k+40]!r} vs reference {exp_dec[k:k+40]!r}"
        # decode of random id sequences (cut multi-byte characters, specials mixed in)
        rng = random.Random(7)
        vocab = ref.vocab_size()
        id_seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(300)]
        dec = run_binary(args.binary, d, id_seqs, True, key="ids")
        for seq, o in zip(id_seqs, dec):
            exp_dec = ref.decode(seq)
            if o["decoded"] != exp_dec:
                mism["decoded"] += 1
                if first is None:
                    first = f"decode of random ids {seq}: sparsecl {o['decoded']!r} vs reference {exp_dec!r}"
        # transformers' AutoTokenizer agrees with `tokenizers` on tokenizer.json files (subset).
        tf_mism = 0
        if ref.kind == "tokenizers" and ref.check_transformers:
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(d)
            for i, text in enumerate(texts[:300]):
                for special in (True, False):
                    if hf.encode(text, add_special_tokens=special) != results[special][i]["ids"]:
                        tf_mism += 1
                        if first is None:
                            first = f"transformers AutoTokenizer ids differ for text #{i} {text[:100]!r} (special={special})"
        bad = sum(mism.values()) + tf_mism
        failures += bad
        status = "OK" if bad == 0 else "MISMATCH"
        print(f"{status} {name} [{ref.kind}]: {len(texts)} texts x (special, no-special): ids mismatches "
              f"{mism['ids']}/{len(texts)}, no-special {mism['ids_no_special']}/{len(texts)}, decode {mism['decoded']}/{len(texts) + 300}"
              + (f", transformers {tf_mism}/600" if ref.kind == 'tokenizers' else "")
              + f"; sparsecl {results['timeTrue']:.1f}s + {results['timeFalse']:.1f}s, total {time.time() - t0:.1f}s")
        if first:
            print(f"  first mismatch: {first}")
    import shutil
    shutil.rmtree(variant_root, ignore_errors=True)
    if failures:
        print(f"FAIL: {failures} mismatches")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
