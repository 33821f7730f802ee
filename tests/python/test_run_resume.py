#!/usr/bin/env python3
"""`sparsecl run` killed with SIGKILL at several moments and started again finishes the same work.

A tiny random-weight llama (hidden 32, 2 layers) with the default model's real tokenizer keeps every step
fast; the data are the bundled domain files. Two stages (code -> math), methods lora and full, short
training with a checkpoint every step, small evaluations, drift on.

1. A reference run, uninterrupted, into ref/.
2. The same config into killed/: the process is killed with SIGKILL as soon as each of a series of
   milestones appears (the base probe, the base evaluation, a training checkpoint inside stage 1, a
   finished stage, ...), then started again with the same arguments; finally it is left to finish.
3. Checks: every run finished (sweep.json, metrics.json per run, report.html); no temporary files are
   left; every JSON output parses; R, held-out losses, ACC/BWT/FWT/F and the step logs equal the
   reference bit for bit (CPU, one seed: the whole pipeline is deterministic); completed stages were not
   redone (their done.json kept its first modification time across later restarts).
4. A second config with a different hash is refused in the same output directory.

Args: --binary, --shared (unused), --repo. Exit 77 (ctest skip) when numpy / safetensors are missing or
the default model's tokenizer is absent (run scripts/setup.sh first).
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_model import make_tiny_model, parse_args_or_skip, report  # noqa: E402


CONFIG = """
model: {model}
stages: [code, math]
methods: [lora, full]
seeds: [0]
output: {output}
probe:
  domains: [code, math]
  max_samples: 4
  batch_size: 2
  max_length: 32
  permutations: 5
  token_pairs: 20
  stage_samples: 2
train:
  steps: 3
  batch_size: 2
  max_length: 192
  warmup_steps: 1
  checkpoint_every: 1
  log_every: 1
lora:
  r: 2
  alpha: 4
  dropout: 0.1
eval:
  max_samples: 2
  heldout_samples: 2
  batch_size: 2
  max_length: 256
  max_new_tokens: 4
  drift_samples: 3
"""


def run(binary, cfg, repo, extra=(), timeout=600):
    return subprocess.Popen([binary, "run", cfg, "--no-progress", *extra], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc, predicate, limit=300):
    """SIGKILL `proc` as soon as predicate() holds; False if the process ended first."""
    t0 = time.time()
    while time.time() - t0 < limit:
        if predicate():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("milestone not reached in time")


def load_jsons(root):
    out = {}
    for path in glob.glob(os.path.join(root, "**", "*.json"), recursive=True):
        with open(path) as f:
            out[os.path.relpath(path, root)] = json.load(f)  # raises on a corrupt file
    return out


def main() -> int:
    args = parse_args_or_skip(["numpy", "safetensors"])
    if args is None:
        return 77

    failures = []
    with tempfile.TemporaryDirectory(prefix="sparsecl_run_") as tmp:
        model = os.path.join(tmp, "tiny")
        make_tiny_model(args.repo, model)
        cfgs = {}
        for name in ("ref", "killed"):
            cfgs[name] = os.path.join(tmp, f"{name}.yaml")
            with open(cfgs[name], "w") as f:
                f.write(CONFIG.format(model=model, output=os.path.join(tmp, name)))

        t0 = time.time()
        p = run(args.binary, cfgs["ref"], args.repo)
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            print(out)
            print("FAIL: reference run exited", p.returncode)
            return 1
        print(f"reference run: {time.time() - t0:.1f} s")

        k = os.path.join(tmp, "killed")
        milestones = [
            ("base probe written", lambda: os.path.exists(f"{k}/probe/probe.json")),
            ("base evaluation written", lambda: os.path.exists(f"{k}/base/eval.json")),
            ("lora stage 1 checkpoint", lambda: glob.glob(f"{k}/lora-seed0/stages/1-code/train/checkpoints/step-*")),
            ("lora stage 1 done", lambda: os.path.exists(f"{k}/lora-seed0/stages/1-code/done.json")),
            ("lora stage 2 training log", lambda: os.path.exists(f"{k}/lora-seed0/stages/2-math/train/train_log.jsonl")),
            ("full stage 1 checkpoint", lambda: glob.glob(f"{k}/full-seed0/stages/1-code/train/checkpoints/step-*")),
            ("full stage 2 eval", lambda: os.path.exists(f"{k}/full-seed0/stages/2-math/eval.json")),
        ]
        done_mtimes = {}
        kills = 0
        for label, pred in milestones:
            p = run(args.binary, cfgs["killed"], args.repo)
            killed = kill_when(p, pred)
            kills += killed
            print(f"{'killed at' if killed else 'finished before'}: {label}")
            for d in glob.glob(f"{k}/*/stages/*/done.json"):
                m = os.stat(d).st_mtime_ns
                if d in done_mtimes and done_mtimes[d] != m:
                    failures.append(f"{d} was rewritten after a restart (a completed stage was redone)")
                done_mtimes.setdefault(d, m)
        p = run(args.binary, cfgs["killed"], args.repo)
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            print(out)
            print("FAIL: final resumed run exited", p.returncode)
            return 1
        print(f"{kills} kills")
        if kills < 4:
            failures.append(f"only {kills} milestones were hit before the run finished; the test did not test resume")

        ref, got = load_jsons(os.path.join(tmp, "ref")), load_jsons(k)
        leftovers = [f for f in glob.glob(f"{k}/**/*", recursive=True) if ".tmp" in os.path.basename(f)]
        if leftovers:
            failures.append(f"temporary files left: {leftovers[:5]}")
        for f in ("sweep.json", "lora-seed0/metrics.json", "full-seed0/metrics.json", "report/report.html"):
            if not os.path.exists(os.path.join(k, f)):
                failures.append(f"{f} missing after the resumed run")
        for run_name in ("lora-seed0", "full-seed0"):
            a, b = ref.get(f"{run_name}/metrics.json"), got.get(f"{run_name}/metrics.json")
            if not a or not b:
                continue
            for key in ("R", "heldout_loss", "ACC", "BWT", "FWT", "F", "forgetting", "general"):
                if a.get(key) != b.get(key):
                    failures.append(f"{run_name} metrics.json {key}: {b.get(key)} != reference {a.get(key)}")
            if [d.get("layers") for d in a.get("drift", [])] != [d.get("layers") for d in b.get("drift", [])]:
                failures.append(f"{run_name} drift differs from the reference")
            for stage in ("1-code", "2-math"):
                la = open(f"{tmp}/ref/{run_name}/stages/{stage}/train/train_log.jsonl").read().splitlines()
                lb = open(f"{k}/{run_name}/stages/{stage}/train/train_log.jsonl").read().splitlines()
                strip = lambda ls: [{kk: vv for kk, vv in json.loads(l).items() if kk not in ("tokens_per_s",)} for l in ls]
                if strip(la) != strip(lb):
                    failures.append(f"{run_name} {stage} step log differs from the reference")

        # lora.merge=false keeps every stage's adapter attached (frozen) under the next one instead of
        # merging it: the same model up to float rounding, so the same metrics to 1e-4. With stage 2 removed
        # and the run started again, stage 1's adapter is reapplied unmerged from its product and stage 2
        # is redone: the metrics are identical.
        stacked = os.path.join(tmp, "stacked")
        stacked_cfg = os.path.join(tmp, "stacked.yaml")
        with open(stacked_cfg, "w") as f:
            f.write(CONFIG.format(model=model, output=stacked).replace("methods: [lora, full]", "methods: [lora]"))
        overrides = ["lora.merge=false", "--no-report"]
        metrics = []
        for attempt in range(2):
            if attempt == 1:  # stage 2 never happened: it is redone on stage 1's adapter, reapplied unmerged
                shutil.rmtree(os.path.join(stacked, "lora-seed0", "stages", "2-math"))
            p = run(args.binary, stacked_cfg, args.repo, overrides)
            out, _ = p.communicate(timeout=900)
            if p.returncode != 0:
                print(out)
                failures.append(f"lora.merge=false run {attempt + 1} exited {p.returncode}")
                break
            metrics.append(json.load(open(os.path.join(stacked, "lora-seed0", "metrics.json"))))
        if len(metrics) == 2:
            merged = ref.get("lora-seed0/metrics.json", {})
            for key in ("heldout_loss", "R"):  # R's code column is minus the held-out loss in this config
                a, b = metrics[0][key], merged.get(key)
                diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
                print(f"lora.merge=false vs merged: max {key} difference {diff:.3g}")
                if diff > 1e-4:
                    failures.append(f"lora.merge=false differs from the merged run in {key}: {a} vs {b}")
            if metrics[1]["heldout_loss"] != metrics[0]["heldout_loss"] or metrics[1]["R"] != metrics[0]["R"]:
                failures.append("lora.merge=false: stage 2 redone on stage 1's adapter reapplied unmerged changed the metrics")

        # A different config must not write into this directory.
        other = os.path.join(tmp, "other.yaml")
        with open(other, "w") as f:
            f.write(CONFIG.format(model=model, output=k).replace("steps: 3", "steps: 4"))
        r = subprocess.run([args.binary, "run", other, "--no-progress"], cwd=args.repo, capture_output=True, text=True)
        if r.returncode == 0 or "another config" not in (r.stdout + r.stderr):
            failures.append("a run with a different config was not refused in the same directory")

    return report(failures, ok="ok")


if __name__ == "__main__":
    sys.exit(main())
