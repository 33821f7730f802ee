#!/usr/bin/env python3
"""Data parallelism over c10d/Gloo with two CPU processes gives the one-process results.

A tiny random-weight llama (tiny_model.py) with the real SmolLM2 tokenizer and the bundled data. Every
case runs the same work once as one process and once as two, launched the way clusters launch PyTorch:
torchrun (`python -m torch.distributed.run --no-python`) and, for the probe, Slurm's variables
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID + MASTER_ADDR/PORT) on two hand-started processes.

1. finetune-lora, -full (train.bucket_mb=1: several gradient buckets), -mask (its selection probe split),
   -migu (its output norms summed) and -orth (its finish_stage covariances summed): 2 ranks x
   grad_accum 1 against 1 process x grad_accum 2 (the same global batch): the same loss curve and the
   same trained tensors / bases within float tolerance (the ranks' sums are added in another order).
2. A 2-rank finetune-full killed with SIGKILL after a checkpoint and resumed with 2 ranks equals the
   uninterrupted 2-rank run bit for bit; resuming it as one process is refused.
3. probe (with gradient overlap): counts, per-sequence sums, reservoir bitsets, top sets, IoUs and
   permutation nulls equal the one-process ones exactly; the fp64 sums of |h| to 1e-12.
4. eval: held-out losses (1e-12), multiple-choice and generation scores and the generated texts equal.
5. run (the sequential driver, one lora stage): the same R matrix, held-out losses and probe.
6. A subcommand that does not run data-parallel (generate) refuses a torchrun environment, and a
   device_map with two processes on one node is refused.

Args: --binary, --shared (unused), --repo. Exit 77 (ctest skip) when numpy / safetensors / torch are
missing or the default model's tokenizer is absent (run scripts/setup.sh first).
"""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_model import make_tiny_model, parse_args_or_skip, report, untimed  # noqa: E402

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT")


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    def __init__(self, binary, repo):
        self.binary, self.repo = binary, repo

    def single(self, *args):
        return self._check(subprocess.run([self.binary, *args], cwd=self.repo, env=clean_env(),
                                          capture_output=True, text=True, timeout=600), args)

    def torchrun_cmd(self, *args):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--no-python", self.binary, *args]

    def torchrun(self, *args):
        return self._check(subprocess.run(self.torchrun_cmd(*args), cwd=self.repo, env=clean_env(),
                                          capture_output=True, text=True, timeout=600), args)

    def slurm(self, *args):
        port = str(free_port())
        procs = []
        for rank in range(2):
            env = clean_env()
            env.update({"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            procs.append(subprocess.Popen([self.binary, *args], cwd=self.repo, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=600)[0] for p in procs]
        for p, out in zip(procs, outs):
            if p.returncode != 0:
                raise AssertionError(f"slurm-style rank exited {p.returncode}: {' '.join(args)}\n{out}")
        return "\n".join(outs)

    @staticmethod
    def _check(proc, args):
        if proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}: {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout + proc.stderr


def load_tensors(path):
    from safetensors.numpy import load_file
    return load_file(path)


def losses(train_dir):
    with open(os.path.join(train_dir, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def max_rel_diff(a, b):
    import numpy as np
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3))) if a.size else 0.0


def compare_tensors(one, two, rtol, what, failures, exact=()):
    """Integer tensors and those whose name contains an `exact` part must be bit-identical; float ones
    agree to rtol (a number, or a function of the tensor's name)."""
    import numpy as np
    if sorted(one) != sorted(two):
        failures.append(f"{what}: tensor names differ: {sorted(set(one) ^ set(two))[:5]}")
        return
    for name in sorted(one):
        a, b = one[name], two[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            failures.append(f"{what}: {name}: shape/dtype {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}")
        elif not np.issubdtype(a.dtype, np.floating) or any(e in name for e in exact):
            if not np.array_equal(a, b):
                failures.append(f"{what}: {name}: not bit-identical")
        else:
            tol = rtol(name) if callable(rtol) else rtol
            if max_rel_diff(b, a) > tol:
                failures.append(f"{what}: {name}: relative difference {max_rel_diff(b, a):.3g} > {tol}")


def compare_subspaces(one, two, tol, failures):
    """orth bases U [in, k]: the same subspaces (projectors U U^T within tol). The columns themselves
    may rotate inside a near-degenerate eigenspace when the covariance's sums are added in another order."""
    import numpy as np
    worst = 0.0
    for name in sorted(one):
        a, b = one[name].astype(np.float64), two[name].astype(np.float64)
        if a.shape != b.shape:
            failures.append(f"orth bases: {name}: {a.shape[1]} vs {b.shape[1]} directions")
            continue
        worst = max(worst, float(np.max(np.abs(a @ a.T - b @ b.T))))
    print(f"orth: max |U U^T (1 process) - U U^T (2 ranks)| = {worst:.3g} over {len(one)} bases")
    if worst > tol:
        failures.append(f"orth bases: projectors differ by {worst:.3g} > {tol}")


def check_training(r, tmp, model, failures):
    """Case 1: 2 ranks x grad_accum 1 == 1 process x grad_accum 2."""
    import numpy as np
    for method, product, extra in (("lora", "adapter_model.safetensors", ["lora.dropout=0", "lora.r=4"]),
                                   ("full", "model.safetensors", ["train.bucket_mb=1"]),
                                   # the selection probe (collect_domain_stats) runs split over the ranks
                                   ("mask", "mask_deltas.safetensors", ["mask.ratio=0.25", "probe.batch_size=1"]),
                                   # the per-step output norms are summed over the ranks
                                   ("migu", "model.safetensors", ["migu.quantile=0.5"]),
                                   # finish_stage's activation covariances are summed over the ranks
                                   ("orth", "orth_bases.safetensors", ["lora.dropout=0", "lora.r=4"])):
        common = [f"finetune-{method}", "--model", model, "--data", "data/code/train.jsonl", "--steps", "4",
                  "--batch-size", "2", "--max-length", "96", "--lr", "1e-3", "--no-progress", "train.log_every=1",
                  "train.warmup_steps=1", *extra]
        one, two = os.path.join(tmp, f"{method}-1"), os.path.join(tmp, f"{method}-2")
        r.single(*common, "train.grad_accum=2", "--output", one)
        log = r.torchrun("-v", *common, "train.grad_accum=1", "--output", two)
        if "rank 1 of 2" not in log and "rank 0 of 2" not in log:
            failures.append(f"{method}: the torchrun log does not show a 2-process job:\n{log[-2000:]}")
        # The all-reduce overlaps the backward pass: buckets are sent from the gradient hooks.
        overlap = re.findall(r"(\d+) of (\d+) gradient buckets were sent during the backward pass", log)
        print(f"{method}: buckets sent during backward (per step and rank): {overlap}")
        if not overlap or not all(int(k) > 0 for k, _ in overlap) or (method == "full" and int(overlap[0][1]) < 2):
            failures.append(f"{method}: gradient buckets were not sent during the backward pass: {overlap}")
        if method == "orth":  # the bases need no training equivalence, only the covariance reduction
            compare_tensors(load_tensors(os.path.join(one, "adapter_model.safetensors")),
                            load_tensors(os.path.join(two, "adapter_model.safetensors")), 1e-4, "orth adapter", failures)
        l1, l2 = losses(one), losses(two)
        print(f"{method}: losses 1 process {l1}\n{method}: losses 2 ranks   {l2}")
        if len(l1) != 4 or len(l2) != 4 or max_rel_diff(l2, l1) > 1e-5:
            failures.append(f"{method}: loss curves differ: {l1} vs {l2}")
        t1, t2 = load_tensors(os.path.join(one, product)), load_tensors(os.path.join(two, product))
        if method == "orth":
            compare_subspaces(t1, t2, 1e-4, failures)
        else:
            compare_tensors(t1, t2, 1e-4, f"{method} {product}", failures)
        base = load_tensors(os.path.join(model, "model.safetensors"))
        if method == "full":
            moved = max(float(np.max(np.abs(t2[k] - base[k]))) for k in base)
            diff = max(float(np.max(np.abs(t2[k] - t1[k]))) for k in base)
            print(f"full: max |w - w0| {moved:.3g}, max |w(2 ranks) - w(1 process)| {diff:.3g}")
            if not moved > 100 * diff:
                failures.append(f"full: training moved the weights by {moved:.3g}, not far above the rank difference {diff:.3g}")


def kill_processes_mentioning(text):
    """SIGKILL every process whose command line contains `text`, and wait until they are gone."""
    def matching():
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read() and int(pid) != os.getpid():
                        pids.append(int(pid))
            except OSError:
                pass
        return pids
    t0 = time.time()
    while matching() and time.time() - t0 < 30:
        for pid in matching():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


def check_resume(r, tmp, model, failures):
    """Case 2: a 2-rank run killed after a checkpoint and resumed equals the uninterrupted one."""
    common = ["finetune-full", "--model", model, "--data", "data/math/train.jsonl", "--steps", "40", "--batch-size",
              "2", "--max-length", "64", "--lr", "1e-3", "--no-progress", "train.log_every=1",
              "train.checkpoint_every=1", "train.bucket_mb=1"]
    ref, killed = os.path.join(tmp, "resume-ref"), os.path.join(tmp, "resume-killed")
    r.torchrun(*common, "--output", ref)
    proc = subprocess.Popen(r.torchrun_cmd(*common, "--output", killed), cwd=r.repo, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = os.path.join(killed, "checkpoints", "step-00000003")
    t0 = time.time()
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.01)
    # torchrun's workers live in their own sessions: kill every process of the job, as a scheduler would.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_processes_mentioning(killed)
    with open(os.path.join(killed, "manifest.json")) as f:
        if json.load(f)["status"] == "finished":
            failures.append("resume: the run finished before it could be killed (make it longer)")
            return
    steps = sorted(glob.glob(os.path.join(killed, "checkpoints", "step-*")))
    print(f"resume: killed with checkpoint(s) {[os.path.basename(s) for s in steps]}")
    refused = subprocess.run([r.binary, *common, "--output", killed, "--resume"], cwd=r.repo, env=clean_env(),
                             capture_output=True, text=True, timeout=300)
    if refused.returncode == 0 or "2-process run" not in refused.stdout + refused.stderr:
        failures.append(f"resume: one process resuming a 2-rank checkpoint was not refused:\n{refused.stderr[-1500:]}")
    r.torchrun(*common, "--output", killed, "--resume")
    if losses(killed) != losses(ref):
        failures.append(f"resume: loss curve differs from the uninterrupted run:\n{losses(killed)}\n{losses(ref)}")
    compare_tensors(load_tensors(os.path.join(ref, "model.safetensors")),
                    load_tensors(os.path.join(killed, "model.safetensors")), 0.0, "resume model", failures)


def check_probe(r, tmp, model, failures):
    """Case 3: the probe's statistics over two ranks (torchrun and Slurm-style) equal one process's."""
    common = ["probe", "--model", model, "--domain", "code=data/code/train.jsonl", "--domain",
              "math=data/math/train.jsonl", "--max-samples", "7", "--batch-size", "2", "--max-length", "48",
              "--permutations", "20", "--token-pairs", "30", "--token-reservoir", "64", "--gradient-overlap",
              "--no-progress"]
    runs = {"one": os.path.join(tmp, "probe-1"), "torchrun": os.path.join(tmp, "probe-tr"),
            "slurm": os.path.join(tmp, "probe-slurm")}
    r.single(*common, "--output", runs["one"])
    r.torchrun(*common, "--output", runs["torchrun"])
    r.slurm(*common, "--output", runs["slurm"])
    ref_stats = load_tensors(os.path.join(runs["one"], "probe_stats.safetensors"))
    with open(os.path.join(runs["one"], "probe.json")) as f:
        ref_layers = json.load(f)["models"][0]["layers"]
    for name in ("torchrun", "slurm"):
        stats = load_tensors(os.path.join(runs[name], "probe_stats.safetensors"))
        # freq comes from integer counts: exact. mean_abs is an fp64 sum (added in another order) cast
        # to fp32: at most one fp32 rounding apart. grad_mass comes from fp32 gradient sums.
        compare_tensors(ref_stats, stats, lambda t: 1e-5 if "grad" in t else 1e-6, f"probe ({name})", failures,
                        exact=("freq",))
        with open(os.path.join(runs[name], "probe.json")) as f:
            layers = json.load(f)["models"][0]["layers"]
        for a, b in zip(ref_layers, layers):
            if a["top"] != b["top"]:
                failures.append(f"probe ({name}): layer {a['layer']}: top sets differ")
            for pa, pb in zip(a["pairs"], b["pairs"]):
                for key in ("iou", "perm_mean", "perm_std", "p_value"):
                    if pa[key] != pb[key]:
                        failures.append(f"probe ({name}): layer {a['layer']} {key} {pa[key]} vs {pb[key]}")
            if a.get("token_overlap") != b.get("token_overlap"):
                failures.append(f"probe ({name}): layer {a['layer']}: token-level overlap differs")
    print(f"probe: {len(ref_stats)} tensors compared for torchrun and slurm launches")


def check_eval(r, tmp, model, failures):
    """Case 4: eval over two ranks scores exactly what one process scores."""
    common = ["eval", "--model", model, "--domains", "math,medical", "--max-samples", "3", "--heldout-samples", "5",
              "--batch-size", "1", "eval.max_new_tokens=6", "--no-progress"]
    one, two = os.path.join(tmp, "eval-1"), os.path.join(tmp, "eval-2")
    r.single(*common, "--output", one)
    r.torchrun(*common, "--output", two)
    with open(os.path.join(one, "eval.json")) as f:
        a = json.load(f)
    with open(os.path.join(two, "eval.json")) as f:
        b = json.load(f)
    for d in ("math", "medical"):
        la, lb = a["domains"][d]["heldout"]["loss"], b["domains"][d]["heldout"]["loss"]
        if abs(la - lb) > 1e-12 * abs(la):
            failures.append(f"eval: {d} held-out loss {la} vs {lb}")
        if a["domains"][d]["score"] != b["domains"][d]["score"]:
            failures.append(f"eval: {d} score {a['domains'][d]['score']} vs {b['domains'][d]['score']}")
        if json.dumps(untimed(a["domains"][d]["tasks"]), sort_keys=True) != \
                json.dumps(untimed(b["domains"][d]["tasks"]), sort_keys=True):
            failures.append(f"eval: {d} task results (items, completions) differ")
    print(f"eval: math loss {a['domains']['math']['heldout']['loss']} / {b['domains']['math']['heldout']['loss']}")


RUN_CONFIG = """
model: {model}
stages: [code]
methods: [lora]
seeds: [0]
output: {output}
probe:
  domains: [code, math]
  max_samples: 4
  batch_size: 2
  max_length: 32
  permutations: 5
  token_pairs: 20
train:
  steps: 3
  batch_size: 2
  grad_accum: {grad_accum}
  max_length: 128
  warmup_steps: 1
lora:
  r: 2
  alpha: 4
  dropout: 0.0
eval:
  max_samples: 2
  heldout_samples: 3
  batch_size: 1
  max_length: 256
  max_new_tokens: 4
  drift_samples: 2
"""


def check_run(r, tmp, model, failures):
    """Case 5: the sequential driver over two ranks."""
    outs = {}
    for name, accum in (("one", 2), ("two", 1)):
        cfg = os.path.join(tmp, f"run-{name}.yaml")
        outs[name] = os.path.join(tmp, f"run-{name}")
        with open(cfg, "w") as f:
            f.write(RUN_CONFIG.format(model=model, output=outs[name], grad_accum=accum))
        (r.single if name == "one" else r.torchrun)("run", cfg, "--no-progress", "--no-report")
    ma = json.load(open(os.path.join(outs["one"], "lora-seed0", "metrics.json")))
    mb = json.load(open(os.path.join(outs["two"], "lora-seed0", "metrics.json")))
    print(f"run: heldout_loss 1 process {ma['heldout_loss']}\nrun: heldout_loss 2 ranks   {mb['heldout_loss']}")
    if max_rel_diff(sum(mb["heldout_loss"], []), sum(ma["heldout_loss"], [])) > 1e-5:
        failures.append("run: held-out loss matrices differ")
    if ma["R"] != mb["R"]:
        failures.append(f"run: R differs: {ma['R']} vs {mb['R']}")
    pa = json.load(open(os.path.join(outs["one"], "probe", "probe.json")))["models"][0]["layers"]
    pb = json.load(open(os.path.join(outs["two"], "probe", "probe.json")))["models"][0]["layers"]
    if [l["top"] for l in pa] != [l["top"] for l in pb]:
        failures.append("run: base probe top sets differ")


def check_refusal(r, tmp, model, failures):
    """Case 6: a subcommand that is not data-parallel refuses a launcher's environment."""
    env = clean_env()
    env.update({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    p = subprocess.run([r.binary, "generate", "--model", model, "--prompt", "hi"], cwd=r.repo, env=env,
                       capture_output=True, text=True, timeout=120)
    if p.returncode == 0 or "does not run data-parallel" not in p.stdout + p.stderr:
        failures.append(f"generate under WORLD_SIZE=2 was not refused:\n{p.stderr[-1000:]}")
    # a pipeline placement (device_map) with two processes on one node: both would use the same devices
    p = subprocess.run(r.torchrun_cmd("finetune-lora", "--model", model, "--data", "data/math/train.jsonl",
                                      "--steps", "1", "--output", os.path.join(tmp, "map"),
                                      "--no-progress", "device_map=cpu,cpu"),
                       cwd=r.repo, env=clean_env(), capture_output=True, text=True, timeout=300)
    if p.returncode == 0 or "processes on this node" not in p.stdout + p.stderr:
        failures.append(f"device_map with 2 processes on one node was not refused:\n{p.stderr[-1500:]}")


def main():
    args = parse_args_or_skip(["numpy", "safetensors", "torch.distributed.run"])  # torchrun
    if args is None:
        return 77
    r = Runner(os.path.abspath(args.binary), args.repo)
    failures = []
    with tempfile.TemporaryDirectory(prefix="sparsecl_dist_") as tmp:
        model = os.path.join(tmp, "tiny")
        make_tiny_model(args.repo, model)
        for case in (check_training, check_resume, check_probe, check_eval, check_run):
            t0 = time.time()
            case(r, tmp, model, failures)
            print(f"{case.__name__}: {time.time() - t0:.1f} s")
        check_refusal(r, tmp, model, failures)
    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
