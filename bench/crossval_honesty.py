#!/usr/bin/env python
"""Is the per-run accuracy estimate honest? On her2st sections under the checkerboard leave-out
protocol, compare each gene's cross-fitted estimate (super-res.h5ad var cv_pearson, made from the
training spots only) with the true Pearson r at the hidden spots, over the 100 most variable
held-out genes: Spearman rank correlation of the two, and the gap between their medians. Both
are of log1p counts (as cv_pearson); the raw-count r of `utils.protocols score` is printed too.

    python bench/crossval_honesty.py --sections C2 C3 [--train-args "..."]

Needs ../shared/data/her2st (exits cleanly when absent); reuses bench/her2st.py's folders.
Writes bench/results/crossval_honesty-<protocol>.json."""
import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from her2st import DATA, prepare, sh  # noqa: E402

from utils.evaluation.heldout import HeldOut, heldout_pearson  # noqa: E402
from utils.evaluation.metrics import pearson_per_gene  # noqa: E402
from utils.scverse.keys import Key  # noqa: E402


def split_half_reliability(pred, meas, n_splits=200, seed=0):
    """How reproducible a per-gene r over these spots (pred, meas: (spots, genes) log1p) is: the mean
    Spearman between the per-gene r of two random halves of the spots, stepped up to the whole set
    (Spearman-Brown). A rough guide: it treats the spread of r between halves as sampling noise;
    with under ~60 spots the halves are too small (and differ in the tissue they cover) for it to
    mean much."""
    rng = np.random.default_rng(seed)
    half = []
    for _ in range(n_splits):
        p = rng.permutation(len(meas))
        a, b = p[:len(p) // 2], p[len(p) // 2:]
        half.append(spearmanr(pearson_per_gene(pred[a], meas[a]), pearson_per_gene(pred[b], meas[b])).statistic)
    h = float(np.mean(half))
    return {"split_half_spearman": h, "reliability": 2 * h / (1 + h)}


def truth_reliability(out):
    """split_half_reliability of the true per-gene r (the held-out spots)."""
    held = HeldOut(out.parent.parent)
    return split_half_reliability(np.log1p(held.predicted(out)), np.log1p(held.measured()))


def estimate_reliability(out, genes):
    """split_half_reliability of the run's own estimate: the out-of-fold spots of spots-pred.h5ad.
    Two noisy rankings of the same per-gene accuracies agree (Spearman) up to about
    sqrt(reliability of one x reliability of the other)."""
    pred = anndata.read_h5ad(out / "spots-pred.h5ad")
    oof, meas = (pd.DataFrame(pred.layers[k], columns=pred.var_names)[genes].to_numpy(np.float64)
                 for k in (Key.OUT_OF_FOLD, Key.MEASURED))
    ok = np.isfinite(oof).all(1)
    return split_half_reliability(np.log1p(np.clip(oof[ok], 0, None)), np.log1p(meas[ok]))


def check(d, model, train_args, out_name, states_from=None):
    out = d / "results" / out_name
    trained = d / "results" / (states_from or f"{model}-cv") / "states"
    if not (out / "states").exists() and trained.is_dir():  # a cache keyed by fingerprint: reuse what matches
        shutil.copytree(trained, out / "states")
    if not (out / "super-res.h5ad").is_file():
        t0 = time.time()
        sh([sys.executable, "HISTEX.py", "--directory", d, "--model", model, "--out", out, "-q", *train_args])
        print(f"  {d.name} {model}: HISTEX.py in {time.time() - t0:.0f} s", flush=True)
    _, genes, true_log = heldout_pearson([out], log1p=True)
    _, _, true_raw = heldout_pearson([out])
    var = anndata.read_h5ad(out / "super-res.h5ad", backed="r").var
    fusion = {"fusion": json.loads((out / "run.json").read_text()).get("fusion")}
    est = var.loc[genes, "cv_pearson"].to_numpy(float)
    ref = var.loc[genes, "cv_pearson_reference"].to_numpy(float)
    truth = true_log[out_name]
    run = json.loads((out / "run.json").read_text())
    return {"section": d.name, "model": model, "n_genes": len(genes),
            "estimate_median": float(np.median(est)), "true_median_log1p": float(np.median(truth)),
            "true_median_raw": float(np.median(true_raw[out_name])),
            "median_gap": float(np.median(est) - np.median(truth)),
            "spearman": float(spearmanr(est, truth).statistic),
            "reference_estimate_median": float(np.median(ref)),
            "nearest_spot_true_median_log1p": float(np.median(true_log["nearest spot"])),
            "truth": truth_reliability(out), "estimate": estimate_reliability(out, genes), "run_summary": run.get("cross_validation"), **fusion}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["C2", "C3"])
    p.add_argument("--models", nargs="+", default=["trihrge"])
    p.add_argument("--protocol", default="leave-out", choices=["leave-out", "sparse-leave-out"],
                   help="leave-out: the checkerboard; sparse-leave-out: 1 spot in 5 hidden, so the run keeps a "
                        "nearly full lattice, as a user's run")
    p.add_argument("--train-args", default="", help="extra HISTEX.py options (default: full defaults); states "
                   "trained with the defaults are reused where the options leave them unchanged (e.g. --fusion)")
    p.add_argument("--states-from", default=None, metavar="RUN",
                   help="start from the trained states of DIR/results/RUN (e.g. trihrge-full-s0 of bench/her2st.py; "
                        "the states cache retrains what does not match)")
    p.add_argument("--root", type=Path, default=REPO / "bench" / "data" / "her2st")
    a = p.parse_args()
    if not (DATA / a.sections[0] / "he-raw.jpg").is_file():
        print(f"{DATA} not present: nothing to measure")
        return
    rows = []
    for section in a.sections:
        d = prepare(section, a.protocol, a.root)
        for model in a.models:
            tag = f"{model}-cv" + ("-" + "".join(ch for ch in a.train_args if ch.isalnum())[:20] if a.train_args else "")
            rows.append(check(d, model, shlex.split(a.train_args), tag, a.states_from))
            r = rows[-1]
            print(f"{section} {a.protocol} {model}: estimate median {r['estimate_median']:.3f}, true held-out median "
                  f"{r['true_median_log1p']:.3f} (raw counts {r['true_median_raw']:.3f}), gap {r['median_gap']:+.3f}, "
                  f"Spearman {r['spearman']:.2f} over {r['n_genes']} genes; interpolation estimate "
                  f"{r['reference_estimate_median']:.3f}; reliability of the gene ranking: truth "
                  f"{r['truth']['reliability']:.2f}, estimate {r['estimate']['reliability']:.2f} (two rankings this "
                  f"noisy agree up to Spearman ~{np.sqrt(max(0, r['truth']['reliability'] * r['estimate']['reliability'])):.2f})",
                  flush=True)
    out = REPO / "bench" / "results" / f"crossval_honesty-{a.protocol}.json"
    out.write_text(json.dumps({"train_args": a.train_args, "protocol": a.protocol, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
