#!/usr/bin/env python3
"""Chat template parity: `sparsecl tokenize` renders {"messages": ...} lines exactly as HF
`apply_chat_template(tokenize=False)` does, and the ids of the prompt (encoded without added specials,
as the model code does) match HF's.

Templates: tests/data/tokenizers/chat/*.json (Llama-3 as in ../shared/assets, its Instruct form, the
Llama-3.1 template and its Llama-3.2 date variant (today's date via strftime_now), Qwen3 as
in ../shared/assets, SmolLM2's published template with its injected default system prompt, a Qwen2.5-
style template, Mistral-Instruct [INST] with and without a folded system message, Llama-2-chat, Zephyr
(TinyLlama-Chat), Phi-3 style), rendered by HF with the small fixture tokenizers of tests/data/tokenizers
(the SentencePiece-vocabulary templates with the Llama-2 fixture as transformers converts it to
tokenizer.json); plus, when <shared>/assets/tokenizers exists, the real llama3 and qwen3 tokenizers with
their own templates. A conversation a template rejects (raise_exception: roles that do not alternate, a
role it does not render) must make sparsecl fail too, with the template's message.

--write-expected regenerates tests/data/tokenizers/chat/expected.json (what the C++ unit tests compare
against) from HF. Exit 1 on any mismatch, 77 when transformers is not installed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sentencepiece_json  # noqa: E402

SKIP = 77

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "  café\n\n日本語 👍  \n"}, {"role": "assistant", "content": "\n  sure  \n"}],
    [{"role": "user", "content": "Think first."},
     {"role": "assistant", "content": "<think>\nreasoning here\n</think>\n\nThe answer is 4."}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>r1</think>a1"},
     {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "plain answer"}],
    [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Calling the tool."},
     {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "{\"wind\": 3}"},
     {"role": "assistant", "content": "21 degrees, light wind."}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "I start."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
]

FIXTURE_TOKENIZER = {"llama3": "llama3_bpe", "llama3_instruct": "llama3_bpe", "llama31": "llama3_bpe",
                     "llama32": "llama3_bpe", "qwen3": "qwen2_bpe", "smollm2": "qwen2_bpe", "qwen25": "qwen2_bpe",
                     "mistral_instruct": "llama2_json", "mistral_system": "llama2_json", "llama2_chat": "llama2_json",
                     "zephyr": "llama2_json", "phi3": "llama2_json"}
# Renders that depend on today's date are compared live but not written to expected.json.
DATE_DEPENDENT = {"llama32"}


def run_binary(binary, tok_dir, template_file, requests):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        path = f.name
    cmd = [binary, "tokenize", "--tokenizer", tok_dir, "--input", path]
    if template_file:
        cmd += ["--chat-template", template_file]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=600)
    finally:
        os.unlink(path)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.decode(errors='replace')[-2000:]}")
    return [json.loads(l) for l in r.stdout.decode("utf-8").split("\n") if l]


def expect_rejected(label, binary, tok_dir, template_file, request, message, failures):
    """sparsecl must refuse a conversation HF's template rejects, naming the template's message."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
        f.write(json.dumps(request, ensure_ascii=False) + "\n")
        path = f.name
    cmd = [binary, "tokenize", "--tokenizer", tok_dir, "--input", path] + (["--chat-template", template_file] if template_file else [])
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=600)
    finally:
        os.unlink(path)
    err = r.stderr.decode(errors="replace")
    if r.returncode == 0 or message not in err:
        failures[0] += 1
        print(f"  MISMATCH {label}: HF rejects {request['messages']} ({message!r}); sparsecl rc={r.returncode}, "
              f"stderr {err[-300:]!r}")
        return False
    return True


def compare(label, hf_tok, template, binary, tok_dir, template_file, failures, expected_out=None):
    requests, refs, rejected = [], [], 0
    for conv in CONVERSATIONS:
        for gen in (True, False):
            kwargs = {"chat_template": template} if template else {}
            try:
                text = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kwargs)
            except Exception as e:  # the template rejects the conversation: so must sparsecl
                if gen:  # (the same either way)
                    rejected += expect_rejected(label, binary, tok_dir, template_file,
                                                {"messages": conv, "add_generation_prompt": gen}, str(e), failures)
                continue
            requests.append({"messages": conv, "add_generation_prompt": gen})
            refs.append((text, hf_tok.encode(text, add_special_tokens=False)))
    outs = run_binary(binary, tok_dir, template_file, requests)
    bad = 0
    for req, (text, ids), out in zip(requests, refs, outs):
        if out["text"] != text or out["ids"] != ids:
            bad += 1
            if bad == 1:
                print(f"  first mismatch ({label}) for {req}:\n    HF:       {text!r}\n    sparsecl: {out['text']!r}"
                      + ("" if out["text"] != text else f"\n    ids HF {ids}\n    ids sparsecl {out['ids']}"))
        if expected_out is not None:
            expected_out.append({"template": label, "messages": req["messages"],
                                 "add_generation_prompt": req["add_generation_prompt"], "text": text})
    print(f"{'OK' if bad == 0 else 'MISMATCH'} {label}: {len(requests) - bad}/{len(requests)} renders identical (text and ids)"
          + (f", {rejected} rejected conversations rejected alike" if rejected else ""))
    failures[0] += bad


def llama2_tokenizer_json(data, work):
    """The Llama-2 fixture tokenizer.model as transformers converts it to tokenizer.json (the vocabulary
    of the [INST] / Zephyr templates), or None when the converter cannot run (no protobuf)."""
    return sentencepiece_json.convert(os.path.join(data, "llama2_sp", "tokenizer.model"), work, "llama2_json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--shared", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--write-expected", action="store_true")
    args = ap.parse_args()
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError as e:
        print(f"SKIP: transformers missing ({e})")
        return SKIP
    if not os.path.exists(args.binary):
        print(f"FAIL: binary {args.binary} does not exist")
        return 1

    data = os.path.join(args.repo, "tests", "data", "tokenizers")
    chat_dir = os.path.join(data, "chat")
    failures = [0]
    expected = []
    work = tempfile.mkdtemp(prefix="sparsecl_chat_")
    tok_dirs = {n: os.path.join(data, n) for n in set(FIXTURE_TOKENIZER.values())}
    tok_dirs["llama2_json"] = llama2_tokenizer_json(data, work)
    for name in sorted(FIXTURE_TOKENIZER):
        file = os.path.join(chat_dir, name + ".json")
        cfg = json.load(open(file, encoding="utf-8"))
        tok_dir = tok_dirs[FIXTURE_TOKENIZER[name]]
        if tok_dir is None:
            if args.write_expected:
                print("FAIL: --write-expected needs every template (protobuf for the Llama-2 tokenizer.json)")
                return 1
            print(f"({name}: skipped, no Llama-2 tokenizer.json here)")
            continue
        hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"),
                                     bos_token=cfg.get("bos_token"), eos_token=cfg.get("eos_token"))
        compare(name, hf, cfg["chat_template"], args.binary, tok_dir, file, failures,
                None if name in DATE_DEPENDENT else expected)

    if args.write_expected:
        with open(os.path.join(chat_dir, "expected.json"), "w", encoding="utf-8") as f:
            json.dump({"_comment": "HF transformers apply_chat_template(tokenize=False) of the templates in this "
                                   "directory; regenerate with tests/python/test_chat_template.py --write-expected",
                       "cases": expected}, f, ensure_ascii=False, indent=1)
        print(f"wrote {len(expected)} cases to {chat_dir}/expected.json")

    real = os.path.join(args.shared, "assets", "tokenizers")
    for name in ("llama3", "qwen3"):
        d = os.path.join(real, name)
        if os.path.exists(os.path.join(d, "tokenizer_config.json")):
            compare(f"real {name}", AutoTokenizer.from_pretrained(d), None, args.binary, d, None, failures)
        else:
            print(f"(real {name} tokenizer absent: {d})")
    shutil.rmtree(work, ignore_errors=True)
    if failures[0]:
        print(f"FAIL: {failures[0]} mismatches")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
