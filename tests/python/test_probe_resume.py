#!/usr/bin/env python3
"""`sparsecl probe` over several models resumes per model: a start that dies after model 0 leaves
partial/model-0.*; the next start of the same config takes model 0 from there and probes only the rest.

Two tiny random-weight llamas (tiny_model.py; the second with other weights). Model 1's checkpoint is
truncated so that the first start fails after model 0 is done, then restored:
1. the failed start exits non-zero and leaves partial/model-0.json and .safetensors, no probe.json;
2. a start with another setting (--seed) does not take the partial result (another config);
3. fails again at model 1, then the start with the original settings takes model 0 from partial/ (its log
   says so) and writes probe.json / probe_stats.safetensors equal to an uninterrupted run's (timings
   aside), and removes partial/.

Args: --binary, --shared (unused), --repo. Exit 77 (ctest skip) as tiny_model.parse_args_or_skip says.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_model import make_tiny_model, parse_args_or_skip, report, untimed  # noqa: E402


def main():
    args = parse_args_or_skip(["numpy", "safetensors"])
    if args is None:
        return 77
    import numpy as np
    from safetensors.numpy import load_file, save_file

    failures = []
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID")}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="sparsecl_probe_resume_") as tmp:
        m0, m1 = os.path.join(tmp, "tiny0"), os.path.join(tmp, "tiny1")
        make_tiny_model(args.repo, m0)
        make_tiny_model(args.repo, m1)
        weights = os.path.join(m1, "model.safetensors")
        t = load_file(weights)
        save_file({k: (v * 1.5).astype(np.float32) for k, v in t.items()}, weights)  # another model
        good = open(weights, "rb").read()

        def probe(out, *extra):
            cmd = [args.binary, "probe", "--model", m0, "--model", m1, "--domain", "code=data/code/train.jsonl",
                   "--domain", "math=data/math/train.jsonl", "--max-samples", "5", "--batch-size", "2",
                   "--max-length", "48", "--permutations", "10", "--token-pairs", "20", "--no-progress",
                   "--output", out, *extra]
            return subprocess.run(cmd, cwd=args.repo, env=env, capture_output=True, text=True, timeout=600)

        def break_model1():
            with open(weights, "wb") as f:
                f.write(good[: len(good) // 2])

        def restore_model1():
            with open(weights, "wb") as f:
                f.write(good)

        ref, out = os.path.join(tmp, "ref"), os.path.join(tmp, "out")
        r = probe(ref)
        if r.returncode != 0:
            print(r.stderr)
            return 1

        break_model1()
        r = probe(out)
        partial = os.path.join(out, "partial")
        if r.returncode == 0 or not os.path.exists(os.path.join(partial, "model-0.json")) \
                or not os.path.exists(os.path.join(partial, "model-0.safetensors")) \
                or os.path.exists(os.path.join(out, "probe.json")):
            failures.append(f"a start failing at model 1 did not leave partial/model-0.* only: exit {r.returncode}, "
                            f"{sorted(os.listdir(out)) if os.path.isdir(out) else 'no output dir'}")

        r = probe(out, "--seed", "3")
        if "from another config" not in r.stderr + r.stdout:
            failures.append("a partial result of another config was not refused")

        r = probe(out)  # fails at model 1 again (model 0 taken from partial/)
        restore_model1()
        r = probe(out)
        log = r.stdout + r.stderr
        if r.returncode != 0:
            failures.append(f"the resumed start failed: {log[-1500:]}")
        elif "model 0" not in log or "finished by an earlier start" not in log:
            failures.append("the resumed start did not take model 0 from partial/")
        else:
            a, b = json.load(open(os.path.join(ref, "probe.json"))), json.load(open(os.path.join(out, "probe.json")))
            for key in ("layers", "models", "settings"):
                if untimed(a[key]) != untimed(b[key]):
                    failures.append(f"probe.json {key} differs from the uninterrupted run")
            sa, sb = load_file(os.path.join(ref, "probe_stats.safetensors")), load_file(os.path.join(out, "probe_stats.safetensors"))
            if sorted(sa) != sorted(sb) or any(not np.array_equal(sa[k], sb[k]) for k in sa):
                failures.append("probe_stats.safetensors differs from the uninterrupted run")
            if os.path.exists(partial):
                failures.append("partial/ was not removed after probe.json was written")
            print(f"resumed: {len(sb)} tensors and {len(b['models'])} models equal the uninterrupted run")
        shutil.rmtree(out, ignore_errors=True)

    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
