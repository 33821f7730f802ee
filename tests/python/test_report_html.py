#!/usr/bin/env python3
"""Renders `sparsecl report` output in headless Chromium: synthetic sweep (two methods x two seeds, with
drift, general retention and stages) + a probe directory with two model sizes, then checks that
  - every figures/*.svg is well-formed XML and report.html is parseable, with one inline <svg> per figure;
  - Chromium's DOM after load holds the figures, the marker the report's inline script sets
    (data-figures = data-figures-rendered = number of figures: the script ran and every figure has a box),
    and the numbers of the tables;
  - the browser log has no console message or JavaScript error, and no network request left the page;
  - a screenshot is a PNG of the requested size.

Run by ctest as: python tests/python/test_report_html.py --binary B --shared S --repo R
Exit 0 pass, 1 fail, 77 skip (no chromium).
"""
from __future__ import annotations

import argparse
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print("FAIL:", msg)


def check(cond: bool, msg: str) -> None:
    if not cond:
        fail(msg)


TASKS = ["code", "math", "medical"]


def metrics(method: str, seed: int) -> dict:
    last = {("lora", 0): [0.5, 0.7, 0.85], ("lora", 1): [0.6, 0.8, 0.85],
            ("full", 0): [0.3, 0.5, 0.9], ("full", 1): [0.4, 0.5, 0.9]}[(method, seed)]
    layers = lambda base: [{"layer": i, "cka": round(1 - base * i, 4), "subspace_similarity": round(1 - base * i / 2, 4),
                            "inside_share": None if i == 0 else 0.5, "k": 3, "k_after": 3} for i in range(5)]
    return {
        "provenance": {"config_hash": f"{method}{seed}abcdef", "model": "models/tiny", "seed": seed},
        "method": method, "seed": seed, "model": "models/tiny", "tasks": TASKS,
        "score_metric": {"code": "neg_heldout_loss", "math": "exact_match", "medical": "acc"},
        "R": [[0.2, 0.3, 0.4], [0.8, 0.35, None], [0.6, 0.9, 0.45], last],
        "general": {"metric": "acc_norm", "scores": [0.4, 0.39, 0.37, 0.36],
                    "retention": [1.0, 0.975, 0.925, 0.9]},
        "drift": [{"row": r, "stage": TASKS[r - 1], "layers": layers(0.02 * r * (2 if method == "full" else 1))}
                  for r in (1, 2, 3)],
        "stages": [{"row": r, "stage": TASKS[r - 1], "seconds": 10.0 * r, "tokens_per_s": 200.0, "train_loss": 1.5 - 0.1 * r}
                   for r in (1, 2, 3)],
    }


def probe_model(name: str, hidden: int, scale: float) -> dict:
    layers = [{"layer": l, "pairs": [
        {"a": a, "b": b, "iou": 0.1 * scale * (1 + i), "iou_random": 0.0257, "ratio": 4.0 * scale * (1 + i) + l,
         "p_value": 0.01 * (1 + i)} for i, (a, b) in enumerate([("code", "math"), ("code", "chat"), ("math", "chat")])],
        "mean_ratio": 8.0 * scale + l} for l in range(4)]
    return {"model": f"models/{name}", "hidden_size": hidden, "intermediate_size": 3 * hidden, "num_layers": 4,
            "params": 1000 * hidden, "K": 10, "mean_iou": 0.2 * scale, "mean_ratio": 8.0 * scale + 1.5,
            "min_ratio": 4.0 * scale, "max_ratio": 12.0 * scale + 3, "pairs_p_le_0.05": 6, "pairs_total": 12,
            "layers": layers}


def write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


class SvgCounter(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.svgs = 0
        self.figures = 0
        self.scripts_with_src = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.svgs += 1
        if tag == "figure":
            self.figures += 1
        if tag == "script" and "src" in a:
            self.scripts_with_src += 1


def png_size(path: str) -> tuple[int, int] | None:
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--shared", default="")
    ap.add_argument("--repo", default="")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        print("SKIP: chromium is not installed")
        return 77

    with tempfile.TemporaryDirectory(prefix="sparsecl_report_html_") as tmp:
        sweep = os.path.join(tmp, "sweep")
        write(os.path.join(sweep, "sweep.json"), {"config_hash": "sweep0123", "methods": ["lora", "full"], "seeds": [0, 1]})
        for method in ("lora", "full"):
            for seed in (0, 1):
                write(os.path.join(sweep, f"{method}-seed{seed}", "metrics.json"), metrics(method, seed))
        probe = os.path.join(tmp, "probe")
        write(os.path.join(probe, "probe.json"), {
            "models": [probe_model("small", 576, 1.0), probe_model("large", 4096, 0.5)],
            "provenance": {"config_hash": "probe0123", "model": "models/small", "seed": 0}})
        out = os.path.join(tmp, "out")
        r = subprocess.run([args.binary, "report", sweep, probe, "--output", out], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"sparsecl report exited {r.returncode}: {r.stderr}")
            return 1

        figs = sorted(f for f in os.listdir(os.path.join(out, "figures")) if f.endswith(".svg"))
        expected = {"cl_metrics.svg", "R_lora.svg", "R_full.svg", "general_retention.svg", "drift_lora.svg",
                    "drift_full.svg", "drift_methods.svg", "iou_small.svg", "iou_large.svg", "scale.svg"}
        check(expected <= set(figs), f"figures missing: {sorted(expected - set(figs))} (have {figs})")
        for f in figs:
            try:
                root = ET.parse(os.path.join(out, "figures", f)).getroot()
                check(root.tag == "{http://www.w3.org/2000/svg}svg", f"{f}: root is {root.tag}")
            except ET.ParseError as e:
                fail(f"{f}: not well-formed XML: {e}")
        with open(os.path.join(out, "report.html"), encoding="utf-8") as fh:
            page = fh.read()
        counter = SvgCounter()
        counter.feed(page)
        check(counter.svgs == len(figs), f"report.html has {counter.svgs} <svg>, figures/ has {len(figs)}")
        check(counter.figures == len(figs), f"report.html has {counter.figures} <figure>, expected {len(figs)}")
        check(counter.scripts_with_src == 0, "report.html loads an external script")
        check(not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "report.html references an external URL")

        # Headless Chromium: DOM after scripts ran, with the browser log on stderr.
        url = "file://" + os.path.join(out, "report.html")
        base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                f"--user-data-dir={os.path.join(tmp, 'profile')}", "--enable-logging=stderr", "--v=0"]
        dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
        check(dom.returncode == 0, f"chromium --dump-dom exited {dom.returncode}")
        d = dom.stdout
        m = re.search(r'data-figures="(\d+)"', d)
        n = re.search(r'data-figures-rendered="(\d+)"', d)
        check(m is not None and int(m.group(1)) == len(figs),
              f"inline script marker data-figures={m.group(1) if m else None}, expected {len(figs)}")
        check(n is not None and int(n.group(1)) == len(figs),
              f"data-figures-rendered={n.group(1) if n else None}: not every figure has a layout box")
        check(d.count("<svg") == len(figs), f"DOM has {d.count('<svg')} svg elements, expected {len(figs)}")
        for text in ("0.717 ± 0.047", "0.583 ± 0.024", "IoU / random IoU: small", "Normalised IoU vs hidden size",
                     "lora: seeds 0, 1", "config hash probe0123"):
            check(text in d, f"rendered DOM lacks {text!r}")
        log = dom.stderr
        console = [l for l in log.splitlines() if "CONSOLE" in l or "Uncaught" in l]
        check(not console, f"browser console output: {console[:3]}")
        net = [l for l in log.splitlines() if re.search(r"ERR_(NAME|CONNECTION|INTERNET|FILE_NOT_FOUND)", l)]
        check(not net, f"failed resource loads: {net[:3]}")

        shot = os.path.join(tmp, "shot.png")
        s = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,2400", url],
                           capture_output=True, text=True, timeout=120)
        size = png_size(shot) if os.path.exists(shot) else None
        check(s.returncode == 0 and size == (1200, 2400), f"screenshot: rc {s.returncode}, PNG size {size}")
        if size:
            check(os.path.getsize(shot) > 20000, f"screenshot is only {os.path.getsize(shot)} bytes: blank page?")

    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print(f"ok: {len(figs)} figures rendered in headless Chromium without console errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
