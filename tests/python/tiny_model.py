"""A tiny random-weight llama with the default model's real tokenizer, for the CLI tests that run whole
pipelines (test_run_resume.py, test_distributed.py): hidden 32, 2 layers, every step takes milliseconds.
Also their common command line, skip rule, result report and timing-free comparison. Not a test itself
(ctest collects only test_*.py)."""
import argparse
import importlib
import json
import os


def parse_args_or_skip(modules):
    """The tests' arguments (--binary, --shared (unused), --repo), or None after printing why the test must
    be skipped (exit 77): one of the Python `modules` is missing, or the default model's tokenizer is."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--shared", default="")
    ap.add_argument("--repo", required=True)
    args = ap.parse_args()
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            print(f"skip: {e}")
            return None
    if not os.path.exists(os.path.join(args.repo, "models", "smollm2-135m-instruct", "tokenizer.json")):
        print("skip: models/smollm2-135m-instruct absent (scripts/setup.sh converts it)")
        return None
    return args


def make_tiny_model(repo: str, out: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    src = os.path.join(repo, "models", "smollm2-135m-instruct")
    os.makedirs(out)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": True})
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, f)):
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(out, f), "wb") as b:
                b.write(a.read())
    rng = np.random.default_rng(0)
    H, I, V, L = 32, 64, cfg["vocab_size"], 2
    t = {"model.embed_tokens.weight": rng.normal(0, 0.02, (V, H)), "model.norm.weight": np.ones(H)}
    for l in range(L):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = np.ones(H)
        t[p + "post_attention_layernorm.weight"] = np.ones(H)
        for name, shape in (("self_attn.q_proj", (32, H)), ("self_attn.k_proj", (16, H)), ("self_attn.v_proj", (16, H)),
                            ("self_attn.o_proj", (H, 32)), ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)),
                            ("mlp.down_proj", (H, I))):
            t[p + name + ".weight"] = rng.normal(0, 0.1, shape)
    save_file({k: v.astype(np.float32) for k, v in t.items()}, os.path.join(out, "model.safetensors"))


def untimed(x):
    """`x` without its wall-time fields (the only ones two runs of the same work may disagree on)."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k not in ("seconds", "tokens_per_s")}
    if isinstance(x, list):
        return [untimed(v) for v in x]
    return x


def report(failures, ok="OK"):
    """Prints the failures (or `ok`) and returns the exit code."""
    for f in failures:
        print("FAIL:", f)
    print(ok if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0
