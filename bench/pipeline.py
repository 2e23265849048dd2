#!/usr/bin/env python
"""Pipeline benchmark: wall time and peak memory (RSS summed over the whole process tree, sampled
every 0.1 s) of each of the five stages on the demo tissue, for each size, with the `make demo`
training budget and/or the full defaults (--epochs 500 --n-states 5), plus training throughput.

    python bench/pipeline.py --sizes small medium large --budgets demo
    python bench/pipeline.py --sizes small --budgets full

The demo tissue is simulated once per size under bench/data/<size> (not timed: not a user stage);
stages 1-4 run once per size, HISTEX.py once per budget (--retrain, so nothing is reused). Run it on
an otherwise idle machine. Prints one table and writes bench/results/pipeline.json (merged with
earlier runs of other sizes/budgets)."""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from utils.core.manifest import SCRIPTS  # noqa: E402

STAGES = SCRIPTS[:-1]  # stages 1-4 (utils/core/manifest.py: the one stage list)
BUDGETS = {"demo": ["--epochs", "30", "--n-states", "2", "--lr", "1e-3", "--val-fraction", "0"],  # `make demo`
           "full": []}  # the defaults: 5 states, up to 500 epochs at lr 1e-3 with early stopping
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root):
    """Resident memory (bytes) of root and all its descendants, from /proc."""
    children, rss = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def timed(cmd, log):
    """Run cmd; (seconds, peak tree RSS in bytes). Exits with the stage's stderr on failure."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)
    dt = time.time() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\nsee {log}")
    return dt, peak


def run_size(size, budgets, seed):
    d = REPO / "bench" / "data" / size
    logs = REPO / "bench" / "results" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if not (d / "truth" / "super.h5ad").is_file():
        print(f"[{size}] simulating the demo tissue (not timed)", flush=True)
        subprocess.run([py, "-m", "utils.simulate", "--directory", str(d), "--size", size, "--seed", "0"],
                       cwd=REPO, check=True, capture_output=True)
    res = {"stages": {}}
    for s in STAGES:
        t, m = timed([py, s, "--directory", str(d), "-q"], logs / f"{size}-{s[:-3]}.log")
        res["stages"][s] = {"seconds": round(t, 2), "peak_rss_mb": round(m / 2**20)}
        print(f"[{size}] {s:24s} {t:7.1f} s {m / 2**20:7.0f} MB", flush=True)
    import anndata

    from utils.core.layout import load_mask
    spots = anndata.read_h5ad(d / "spots.h5ad")
    mask = load_mask(d)
    calib = json.loads((d / "calibration.json").read_text())
    res.update(spots=int(spots.n_obs), genes=int(spots.n_vars), tissue_superpixels=int(mask.sum()),
               image_px=list(calib["padded_shape"]),
               tissue_mm2=round(float(mask.sum()) * 0.008 ** 2, 3))
    res["budgets"] = {}
    for b in budgets:
        out = d / "results" / f"bench-{b}"
        t, m = timed([py, "HISTEX.py", "--directory", str(d), "--out", str(out), "--retrain", "--seed", str(seed),
                      "-q", *BUDGETS[b]], logs / f"{size}-HISTEX-{b}.log")
        states = sorted((out / "states").glob("state-*.json"))
        meta = [json.loads(p.read_text()) for p in states]
        train_s = sum(m["seconds"] for m in meta)
        epochs = [m.get("epochs_run", m["epochs"]) for m in meta]  # early stopping: fewer than the maximum
        spot_epochs = sum(m.get("train_spots", spots.n_obs) * e for m, e in zip(meta, epochs))
        metrics = json.loads((out / "metrics.json").read_text())["summary"]
        r = {"seconds": round(t, 1), "peak_rss_mb": round(m / 2**20), "training_seconds": round(train_s, 1),
             "spot_epochs_per_second": round(spot_epochs / train_s),
             "states": len(states), "epochs_run": epochs, "max_epochs": meta[0]["epochs"],
             "median_pearson": round(metrics["pearson"]["median"], 4), "median_ssim": round(metrics["ssim"]["median"], 4)}
        r["end_to_end_seconds"] = round(t + sum(v["seconds"] for v in res["stages"].values()), 1)
        res["budgets"][b] = r
        print(f"[{size}] HISTEX.py ({b:4s})         {t:7.1f} s {m / 2**20:7.0f} MB  training {train_s:.0f} s, "
              f"{r['spot_epochs_per_second']} spot-epochs/s; end to end {r['end_to_end_seconds']:.0f} s; "
              f"r {r['median_pearson']:.3f}, SSIM {r['median_ssim']:.3f}", flush=True)
    return res


def table(results):
    lines = ["| size | tissue mm2 | spots | tissue super-pixels | stage | seconds | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for size, r in results.items():
        head = f"| {size} | {r['tissue_mm2']} | {r['spots']} | {r['tissue_superpixels']} "
        for s, v in r["stages"].items():
            lines.append(head + f"| {s} | {v['seconds']} | {v['peak_rss_mb']} |")
            head = "| | | | "
        for b, v in r.get("budgets", {}).items():
            ep = v.get("epochs_run", v.get("epochs"))
            ep = f"{min(ep)}-{max(ep)}" if isinstance(ep, list) and min(ep) != max(ep) else (ep[0] if isinstance(ep, list) else ep)
            lines.append(head + f"| HISTEX.py ({b}: {v['states']} states x {ep} epochs) | {v['seconds']} | {v['peak_rss_mb']} |")
            lines.append(head + f"| end to end ({b}) | {v['end_to_end_seconds']} | max of the above |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["small", "medium", "large"], choices=["small", "medium", "large"])
    p.add_argument("--budgets", nargs="+", default=["demo"], choices=list(BUDGETS))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = REPO / "bench" / "results" / "pipeline.json"
    allres = json.loads(out.read_text()) if out.is_file() else {}
    allres.setdefault("machine", {})
    allres["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}
    sizes = allres.setdefault("sizes", {})
    for size in a.sizes:
        r = run_size(size, a.budgets, a.seed)
        old = sizes.get(size, {}).get("budgets", {})
        r["budgets"] = {**old, **r["budgets"]}
        sizes[size] = r
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(allres, indent=1))
    print(table(sizes))
    if len(sizes) > 1:
        base = min(sizes.values(), key=lambda v: v["tissue_mm2"])
        print("\nscaling against the smallest size (area ratio -> time ratio, memory ratio):")
        for size, r in sizes.items():
            ratio = r["tissue_mm2"] / base["tissue_mm2"]
            for s in STAGES:
                v, b0 = r["stages"][s], base["stages"][s]
                print(f"  {size:6s} area x{ratio:5.2f}  {s:24s} time x{v['seconds'] / max(b0['seconds'], 1e-9):5.2f}"
                      f"  memory x{v['peak_rss_mb'] / max(b0['peak_rss_mb'], 1):5.2f}")


if __name__ == "__main__":
    main()
