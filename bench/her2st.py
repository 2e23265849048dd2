#!/usr/bin/env python
"""Accuracy on real data: the her2st sections under both protocols of DESIGN-NOTES section 3
(checkerboard leave-out, 2 x 2 coarsening), for TriHRGE, the iStar MLP and the interpolation
baseline, scored per gene by Pearson r at the held-out / original spots (100 most variable genes),
with the nearest-training-spot baseline alongside.

    python bench/her2st.py --sections C2 C3 --protocols leave-out coarsen --seeds 0 1 2

Needs ../shared/data/her2st (exits cleanly when absent). Each protocol folder is written once under
bench/data/her2st/<section>-<protocol>/ with `python -m utils.protocols make`, stages 1-4 run once,
then one HISTEX.py run per model and seed, one after the other (a directory takes one HISTEX.py at a
time: its lock), each on the CPUs available (--threads 0: its states train in parallel).
Prints a table and writes bench/results/her2st.json."""
import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "her2st"
# named configurations: the models, and TriHRGE with one part off (the ablation of issue 13); each
# names the parts it compares explicitly, so a table keeps its meaning when a default changes
# ("no-gene-tokens" has window attention, the network without tokens before it became opt-in; in tables
# "full" and "full-s1" made before this session, "trihrge" had gene tokens on and no fusion, the defaults then)
NONE = ["--fusion", "none"]
MODELS = {"trihrge": [], "mlp": ["--model", "mlp", *NONE], "interp": ["--model", "interp"],
          "gene-tokens": ["--gene-tokens", *NONE], "no-gene-tokens": ["--no-gene-tokens", "--window-attention", *NONE],
          "mlp-local": ["--model", "mlp", "--spot-consistency", "local", *NONE],
          "no-multiscale": ["--no-multiscale"], "no-macro": ["--no-macro"],
          "no-linear-head": ["--no-linear-head"], "token-mask-0": ["--gene-tokens", "--token-mask", "0", *NONE],
          "consistency-global": ["--spot-consistency", "global"], "consistency-none": ["--spot-consistency", "none"],
          "fusion-blend": ["--fusion", "blend"], "no-fusion": NONE, "blend-linear": ["--fusion", "blend-linear"], "stack": ["--fusion", "stack"], "no-cross-fit": ["--no-cross-fit"],
          "no-gene-tokens-blend": ["--no-gene-tokens", "--window-attention", "--fusion", "blend"],
          "gene-tokens-blend": ["--gene-tokens", "--fusion", "blend"],
          "no-gene-tokens-blend-linear": ["--no-gene-tokens", "--window-attention", "--fusion", "blend-linear"],
          "mlp-local-blend": ["--model", "mlp", "--spot-consistency", "local", "--fusion", "blend"],
          "no-window-attention": ["--no-gene-tokens", "--no-window-attention", *NONE],
          "no-window-attention-blend": ["--no-gene-tokens", "--no-window-attention", "--fusion", "blend"],
          "residual": ["--residual", "--fusion", "blend"], "residual-no-fusion": ["--residual", *NONE],
          "mlp-residual": ["--model", "mlp", "--residual", "--spot-consistency", "local", "--fusion", "blend"],
          "poisson": ["--loss", "poisson"], "std": ["--standardize-features"], "plateau": ["--lr-schedule", "plateau", "--patience", "10"],
          "auto": ["--lr-schedule", "auto"], "constant": ["--lr-schedule", "constant"],
          "mlp-stack": ["--model", "mlp", "--spot-consistency", "local", "--fusion", "stack"],
          "mlp-std": ["--model", "mlp", "--standardize-features", *NONE],
          "mlp-std-stack": ["--model", "mlp", "--standardize-features", "--spot-consistency", "local", "--fusion", "stack"]}
# configurations that change only what happens after training: they start from the trained states of
# the configuration named here (same tag and seed; the states cache retrains what does not match)
SAME_STATES = {"fusion-blend": "trihrge", "stack": "trihrge", "consistency-global": "trihrge", "consistency-none": "trihrge",
               "no-fusion": "trihrge", "blend-linear": "trihrge", "trihrge": "blend-linear", "no-gene-tokens-blend": "no-gene-tokens", "gene-tokens-blend": "gene-tokens",
               "no-gene-tokens-blend-linear": "no-gene-tokens",
               "mlp-local": "mlp", "mlp-local-blend": "mlp-local", "no-window-attention": "no-window-attention-blend",
               "residual-no-fusion": "residual", "mlp-stack": "mlp", "mlp-std-stack": "mlp-std"}
DEFAULT_MODELS = ["trihrge", "mlp", "interp"]
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


def _seconds(d, name, tag):
    """Mean HISTEX.py wall time (run.json) of the runs of one configuration; None for a baseline."""
    t = [json.loads(r.read_text())["seconds"] for r in sorted((d / "results").glob(f"{name}-{tag}-s*/run.json"))]
    return round(float(np.mean(t)), 1) if t else None


def report(allres, tags, models):
    """Markdown table: per configuration and section/protocol, mean +- sd of the median per-gene r
    over the runs recorded under `tags` (one seed each, e.g. full full-s1 full-s2), and their count."""
    rows = sorted({r for t in tags for r in allres.get(t, {})})
    models = [*models, "nearest spot"] if models else \
        sorted({m for t in tags for r in allres.get(t, {}).values() for m in r["models"]})
    print("| configuration | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for m in models:
        cells = []
        for r in rows:
            v = [x for t in tags if m in allres.get(t, {}).get(r, {}).get("models", {})
                 for x in allres[t][r]["models"][m]["per_seed"]]
            cells.append(f"{np.mean(v):.3f} +- {np.std(v):.3f} ({len(v)})" if v else "")
        print(f"| {m} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["C2", "C3"])
    p.add_argument("--protocols", nargs="+", default=["leave-out", "coarsen"], choices=["leave-out", "coarsen"])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS),
                   help="named configurations (MODELS): the models and TriHRGE with one part off")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds (interp is deterministic: one run)")
    p.add_argument("--train-args", default="--epochs 30 --n-states 2 --lr 1e-3 --val-fraction 0",
                   help="HISTEX.py training options for trihrge and mlp (default: the `make demo` budget)")
    p.add_argument("--tag", default="demo", help="name of this budget in the results")
    p.add_argument("--root", type=Path, default=REPO / "bench" / "data" / "her2st")
    p.add_argument("--report", nargs="+", metavar="TAG", default=None,
                   help="run nothing: print mean +- sd over the results recorded under these tags (e.g. full "
                        "full-s1 full-s2, one seed each) for --models (default: every configuration found)")
    a = p.parse_args()
    if a.report:
        out_p = REPO / "bench" / "results" / "her2st.json"
        report(json.loads(out_p.read_text()) if out_p.is_file() else {}, a.report,
               a.models if a.models != DEFAULT_MODELS else None)
        return 0
    if not DATA.is_dir():
        print(f"{DATA} is absent: nothing to benchmark")
        return 0
    from utils.evaluation.heldout import score
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
                    extra = shlex.split(a.train_args) if m != "interp" else []
                    source = d / "results" / f"{SAME_STATES.get(m)}-{a.tag}-s{seed}" / "states"
                    if m in SAME_STATES and source.is_dir() and not (run / "states").exists():
                        shutil.copytree(source, run / "states")
                    if not (run / "run.json").is_file():  # a finished run is kept (rerun: delete it)
                        sh([sys.executable, "HISTEX.py", "--directory", d, "--out", run, "--seed", seed, "-q",
                            *MODELS[m], *extra])
                    jobs.append(run)
            proto, res = score(jobs)
            per_model = {}
            for name, v in res.items():
                key = name.split(f"-{a.tag}-")[0] if name != "nearest spot" else name
                per_model.setdefault(key, []).append(v["median"])
            summary = {k: {"median_r_mean": float(np.mean(v)), "median_r_sd": float(np.std(v)), "runs": len(v),
                           "per_seed": v, "histex_seconds": _seconds(d, k, a.tag)} for k, v in per_model.items()}
            entry = allres.setdefault(a.tag, {}).setdefault(f"{section} {protocol}", {"models": {}})
            entry.update({"train_spots": proto["train_spots"], "heldout_spots": proto["heldout_spots"],
                          "train_args": a.train_args})
            entry["models"].update(summary)  # a later call with other --models adds to the same table
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
