#!/usr/bin/env python
"""How much of the demo's 8 um truth can the stain features explain at all? An upper reference for
any image model on these features: a scikit-learn MLP trained on the simulated truth itself, per
super-pixel (tens of thousands of labels, where HISTEX has ~660 spot counts), scored with a spatial
2-fold split (left / right half of the tissue), next to a HISTEX run's map on the same halves; then
the same with the run's map as extra inputs. Per gene Pearson r of counts, medians over all genes
and per gene group (cell-type markers, housekeeping, the smooth programmes the image cannot see).

    python bench/demo_ceiling.py --run bench/data/medium/results/bench-full-bf16-stack-s0

Needs a simulated demo folder with truth/super.h5ad and its features (bench/accuracy_demo.py makes
both). Writes bench/results/demo_ceiling.json."""
import argparse
import json
import sys
from pathlib import Path

import anndata
import numpy as np
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.core.layout import load_features  # noqa: E402
from utils.evaluation.metrics import align_to_truth, pearson_per_gene  # noqa: E402


def features_at(directory: Path, rows, cols) -> np.ndarray:
    """(n, channels) float32: every feature scale of stage 3 at the super-pixels (rows, cols)."""
    maps, _ = load_features(directory, json.loads((directory / "calibration.json").read_text()))
    return np.concatenate([m[rows, cols].astype(np.float32) for m in maps.values()], 1)


def cross_fitted_r(X, truth, halves, seed):
    """(G,) per-gene r of an MLP fitted to log1p(truth) on one half and scored on the other, mean of
    the two folds."""
    out = []
    for train in halves:
        scale = StandardScaler().fit(X[train])
        m = MLPRegressor(hidden_layer_sizes=(256, 256), max_iter=30, early_stopping=True, random_state=seed)
        m.fit(scale.transform(X[train]), np.log1p(truth[train]))
        out.append(pearson_per_gene(np.expm1(m.predict(scale.transform(X[~train]))), truth[~train]))
    return np.mean(out, 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a HISTEX run folder of the demo (results/<run>)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    d = a.run.parent.parent
    truth = anndata.read_h5ad(d / "truth" / "super.h5ad")
    run = anndata.read_h5ad(a.run / "super-res.h5ad")
    pred, T, rows, cols, genes, _ = align_to_truth(run.obs["row"].to_numpy(), run.obs["col"].to_numpy(), run.X,
                                                   list(run.var_names), truth)
    pred, T = np.asarray(pred), np.asarray(T, np.float32)
    groups = truth.var.loc[genes, "group"].to_numpy()
    left = cols < np.median(cols)
    halves = (left, ~left)
    F = features_at(d, rows, cols)
    scores = {"run's map": np.mean([pearson_per_gene(pred[~h], T[~h]) for h in halves], 0),
              "MLP on the truth (features)": cross_fitted_r(F, T, halves, a.seed),
              "MLP on the truth (features + run's map)": cross_fitted_r(np.concatenate([F, np.log1p(pred)], 1), T,
                                                                        halves, a.seed)}
    table = {k: {"median": float(np.median(v)),
                 **{g: float(np.median(v[groups == g])) for g in sorted(set(groups))}} for k, v in scores.items()}
    cols_ = ["median", *sorted(set(groups))]
    print("| r, spatial 2-fold | " + " | ".join(cols_) + " |")
    print("|---" * (len(cols_) + 1) + "|")
    for k, v in table.items():
        print(f"| {k} | " + " | ".join(f"{v[c]:.3f}" for c in cols_) + " |")
    out = REPO / "bench" / "results" / "demo_ceiling.json"
    out.write_text(json.dumps({"run": str(a.run), "seed": a.seed, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
