"""The one conversion of a SentencePiece tokenizer.model into a tokenizer.json that the parity tests use:
transformers' own converter (LlamaTokenizerFast from the .model, which needs protobuf). Not a test itself
(ctest collects only test_*.py)."""
import json
import os
import shutil


def convert(model_file, work_dir, name):
    """Writes <work_dir>/<name>/tokenizer.json (nothing else) converted from `model_file` and returns that
    directory, or None with the reason printed when the converter cannot run here."""
    try:
        import google.protobuf  # noqa: F401  (the converter reads the model proto)
        from transformers import LlamaTokenizerFast
    except ImportError as e:
        print(f"note: no tokenizer.json from {model_file}: {e}")
        return None
    src, out = os.path.join(work_dir, name + "_src"), os.path.join(work_dir, name)
    os.makedirs(src, exist_ok=True)
    shutil.copy(model_file, os.path.join(src, "tokenizer.model"))
    LlamaTokenizerFast.from_pretrained(src).save_pretrained(out)
    for f in os.listdir(out):
        if f != "tokenizer.json":
            os.unlink(os.path.join(out, f))
    j = json.load(open(os.path.join(out, "tokenizer.json"), encoding="utf-8"))
    if len(j["model"]["vocab"]) < 1000 or not j["model"]["merges"]:
        raise RuntimeError(f"transformers' converter made an empty tokenizer from {model_file}")
    return out
