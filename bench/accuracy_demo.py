#!/usr/bin/env python
"""Accuracy on the demo tissue: TriHRGE, the two baselines and the ablations on the same features
and spots, scored against the simulated 8 um truth (median/mean per-gene Pearson r, SSIM, RMSE).

    python bench/accuracy_demo.py --size medium --seeds 0 1 2

Runs stages 1-4 once (skipped when already done), then one HISTEX.py run per configuration and
seed, one after the other (a directory takes one HISTEX.py at a time: its lock; each run trains its
states in parallel on the CPUs available), prints one table and writes
bench/results/accuracy_demo-<size>[-<tag>].json. The full defaults (5 cross-fitted states, early
stopping): --epochs 500 --n-states 5 --val-fraction 0.1 --tag full."""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from utils.core.manifest import SCRIPTS  # noqa: E402

NONE = ["--fusion", "none"]
CONFIGS = {  # baselines name their fusion, so the table keeps its meaning when a default changes
    "trihrge": [],
    "mlp (iStar)": ["--model", "mlp", *NONE],
    "interp": ["--model", "interp"],
    "trihrge --no-macro": ["--no-macro"],
    "trihrge --no-multiscale": ["--no-multiscale"],
    "trihrge --gene-tokens": ["--gene-tokens"],
    "trihrge --no-linear-head": ["--no-linear-head"],
    "trihrge --fusion none": NONE,
    "trihrge --fusion blend-linear": ["--fusion", "blend-linear"],
    "trihrge --window-attention": ["--window-attention"],
    "trihrge --gene-tokens --token-mask 0": ["--gene-tokens", "--token-mask", "0"],
    "trihrge --spot-consistency global": ["--spot-consistency", "global"],
    "trihrge --spot-consistency none": ["--spot-consistency", "none"],
    "trihrge --loss poisson": ["--loss", "poisson"],
    "mlp --spot-consistency local": ["--model", "mlp", "--spot-consistency", "local", *NONE],
    "mlp --spot-consistency local --fusion blend": ["--model", "mlp", "--spot-consistency", "local", "--fusion", "blend"],
    "mlp --spot-consistency local --fusion stack": ["--model", "mlp", "--spot-consistency", "local", "--fusion", "stack"],
    "mlp --standardize-features": ["--model", "mlp", "--standardize-features", *NONE],
    "mlp --standardize-features --spot-consistency local --fusion stack":
        ["--model", "mlp", "--standardize-features", "--spot-consistency", "local", "--fusion", "stack"],
    "trihrge --standardize-features": ["--standardize-features"],
    "trihrge --lr-schedule plateau --patience 10": ["--lr-schedule", "plateau", "--patience", "10"],
    "trihrge --lr-schedule auto": ["--lr-schedule", "auto"],
    "trihrge --lr-schedule constant": ["--lr-schedule", "constant"],
    "trihrge --batch-size 128": ["--batch-size", "128"],
    "trihrge --batch-size 32": ["--batch-size", "32"],
    "trihrge --batch-size 16": ["--batch-size", "16"],
}


def sh(cmd):
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="medium", choices=["small", "medium", "large"])
    p.add_argument("--directory", type=Path, default=None, help="demo directory (default bench/data/<size>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="model seeds (the spread over seeds)")
    p.add_argument("--epochs", default="30")
    p.add_argument("--n-states", default="2")
    p.add_argument("--lr", default="1e-3")
    p.add_argument("--val-fraction", default="0", help="held-out spots per state (0: the demo budget trains every spot)")
    p.add_argument("--only", nargs="*", default=None, help="configuration names to run (default all)")
    p.add_argument("--tag", default="", help="name of this budget: results go to accuracy_demo-<size>[-<tag>].json "
                                              "and the runs to results/bench-<tag>-...")
    a = p.parse_args()
    d = a.directory or REPO / "bench" / "data" / a.size
    if not (d / "truth" / "super.h5ad").is_file():
        sh([sys.executable, "-m", "utils.simulate", "--directory", str(d), "--size", a.size, "--seed", "0"])
    for s in SCRIPTS[:-1]:  # stages 1-4
        if not (d / "manifests" / f"{s[:-3]}.json").is_file():
            sh([sys.executable, s, "--directory", str(d), "-q"])
    configs = {k: v for k, v in CONFIGS.items() if a.only is None or k in a.only}
    common = ["--epochs", a.epochs, "--n-states", a.n_states, "--lr", a.lr, "--val-fraction", a.val_fraction,
              "-q"]
    jobs = [(name, seed) for name in configs for seed in a.seeds]

    def one(job):
        name, seed = job
        out = d / "results" / ("bench-" + (f"{a.tag}-" if a.tag else "") + name.replace(" ", "").replace("--", "_").replace("(", "").replace(")", "") + f"-s{seed}")
        t = time.time()
        sh([sys.executable, "HISTEX.py", "--directory", str(d), *configs[name], *common, "--seed", str(seed), "--out", str(out)])
        m = json.loads((out / "metrics.json").read_text())
        return name, seed, m["summary"], time.time() - t

    results = [one(job) for job in jobs]
    table = {}
    for name, seed, summ, secs in results:
        table.setdefault(name, []).append({"seed": seed, "summary": summ, "seconds": secs})
    head = f"{'configuration':36s} {'r median':>14s} {'r mean':>8s} {'SSIM median':>14s} {'SSIM mean':>9s} {'RMSE median':>11s} {'s/run':>6s}"
    print(head)
    print("-" * len(head))
    for name, runs in table.items():
        def stat(metric, key):
            v = np.array([r["summary"][metric][key] for r in runs])
            return v.mean(), v.std()
        rm, rs = stat("pearson", "median")
        sm, ss = stat("ssim", "median")
        print(f"{name:36s} {rm:8.4f}±{rs:.3f} {stat('pearson', 'mean')[0]:8.4f} {sm:8.4f}±{ss:.3f} "
              f"{stat('ssim', 'mean')[0]:9.4f} {stat('rmse', 'median')[0]:11.4f} {np.mean([r['seconds'] for r in runs]):6.0f}")
    out = REPO / "bench" / "results" / f"accuracy_demo-{a.size}{'-' + a.tag if a.tag else ''}.json"
    earlier = json.loads(out.read_text()).get("results", {}) if out.is_file() else {}
    # a later call with other --only configurations adds to the same table
    out.write_text(json.dumps({"size": a.size, "seeds": a.seeds, "epochs": a.epochs, "n_states": a.n_states,
                               "lr": a.lr, "val_fraction": a.val_fraction, "results": {**earlier, **table}}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
