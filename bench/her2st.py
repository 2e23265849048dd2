#!/usr/bin/env python
"""Accuracy on real data: the her2st sections under both protocols of DESIGN-NOTES section 3
(checkerboard leave-out, 2 x 2 coarsening), for TriHRGE, the iStar MLP and the interpolation
baseline, scored per gene by Pearson r at the held-out / original spots (100 most variable genes),
with the nearest-training-spot baseline alongside.

    python bench/her2st.py --sections C2 C3 --protocols leave-out coarsen --seeds 0 1 2

Needs ../shared/data/her2st (exits cleanly when absent). Each protocol folder is written once under
bench/data/her2st/<section>-<protocol>/ with `python -m utils.protocols make`, stages 1-4 run once,
then one HISTEX.py run per model and seed (two at a time with --jobs 2, one torch thread each).
Prints a table and writes bench/results/her2st.json."""
import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "her2st"
MODELS = {"trihrge": [], "mlp": ["--model", "mlp"], "interp": ["--model", "interp"]}
from utils.core.manifest import SCRIPTS  # noqa: E402

STAGES = SCRIPTS[:-1]  # stages 1-4 (utils/core/manifest.py: the one stage list)


def sh(cmd):
    r = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    return r


def prepare(section, protocol, root):
    d = root / f"{section}-{protocol}"
    if not (d / "protocol.json").is_file():
        sh([sys.executable, "-m", "utils.protocols", "make", protocol, DATA / section, "--directory", d])
    for s in STAGES:
        if not (d / "manifests" / f"{s[:-3]}.json").is_file():
            sh([sys.executable, s, "--directory", d, "-q"])
    return d


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["C2", "C3"])
    p.add_argument("--protocols", nargs="+", default=["leave-out", "coarsen"], choices=["leave-out", "coarsen"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds (interp is deterministic: one run)")
    p.add_argument("--train-args", default="--epochs 30 --n-states 2 --lr 1e-3 --val-fraction 0",
                   help="HISTEX.py training options for trihrge and mlp (default: the `make demo` budget)")
    p.add_argument("--tag", default="demo", help="name of this budget in the results")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--root", type=Path, default=REPO / "bench" / "data" / "her2st")
    a = p.parse_args()
    if not DATA.is_dir():
        print(f"{DATA} is absent: nothing to benchmark")
        return 0
    from utils.evaluation.protocols import score
    out_p = REPO / "bench" / "results" / "her2st.json"
    allres = json.loads(out_p.read_text()) if out_p.is_file() else {}
    for section in a.sections:
        for protocol in a.protocols:
            t0 = time.time()
            d = prepare(section, protocol, a.root)
            jobs = []
            for m in a.models:
                for seed in (a.seeds if m != "interp" else a.seeds[:1]):
                    run = d / "results" / f"{m}-{a.tag}-s{seed}"
                    extra = a.train_args.split() if m != "interp" else []
                    jobs.append((run, [sys.executable, "HISTEX.py", "--directory", d, "--out", run, "--seed", seed,
                                       "--threads", "1", "-q", *MODELS[m], *extra]))
            with ThreadPoolExecutor(a.jobs) as ex:
                list(ex.map(lambda j: sh(j[1]), jobs))
            proto, res = score([j[0] for j in jobs])
            per_model = {}
            for name, v in res.items():
                key = name.split(f"-{a.tag}-")[0] if name != "nearest spot" else name
                per_model.setdefault(key, []).append(v["median"])
            summary = {k: {"median_r_mean": float(np.mean(v)), "median_r_sd": float(np.std(v)), "runs": len(v),
                           "per_seed": v} for k, v in per_model.items()}
            allres.setdefault(a.tag, {})[f"{section} {protocol}"] = {
                "train_spots": proto["train_spots"], "heldout_spots": proto["heldout_spots"],
                "train_args": a.train_args, "seconds": round(time.time() - t0), "models": summary}
            out_p.parent.mkdir(exist_ok=True)
            out_p.write_text(json.dumps(allres, indent=1))
            print(f"{section} {protocol} ({proto['train_spots']} training, {proto['heldout_spots']} scored spots, "
                  f"{time.time() - t0:.0f} s):")
            for k, v in summary.items():
                print(f"  {k:14s} median per-gene r {v['median_r_mean']:.3f} +- {v['median_r_sd']:.3f} ({v['runs']} run(s))",
                      flush=True)
    rows = sorted({r for tag in allres.values() for r in tag})
    print("\n| section, protocol | " + " | ".join(a.models + ["nearest spot"]) + " |")
    print("|---" * (len(a.models) + 2) + "|")
    for r in rows:
        v = allres.get(a.tag, {}).get(r)
        if v:
            cells = [f"{v['models'][m]['median_r_mean']:.3f} +- {v['models'][m]['median_r_sd']:.3f}"
                     if m in v["models"] else "" for m in a.models + ["nearest spot"]]
            print(f"| {r} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
