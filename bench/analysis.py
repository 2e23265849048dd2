"""Benchmark of `python -m utils.analysis` (not a test): prints its figures, writes
bench/results/analysis.json.

    python bench/analysis.py accuracy DEMO_DIR      # medium demo after `make demo` (results/trihrge, results/interp)
    python bench/analysis.py scale RUN_DIR           # time and peak RSS of one analysis (the large demo's run)

accuracy: for each run and --smooth setting, domains (k-means, as many as the true regions in the
tissue) scored by the adjusted Rand index against truth/super.h5ad obs 'region', and cell-type labels
(markers: the simulator's marker genes per cell type, truth/simulation.json) scored by the accuracy
against the true dominant cell type of each super-pixel (the type whose cells, truth/cells.tsv.gz as
discs, cover most of it, on a 2 um sub-grid; super-pixels without cells are left out)."""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from pipeline import timed  # noqa: E402

from utils.core.geometry import SUPER_PIXEL_UM  # noqa: E402
from utils.demo import write_demo_markers  # noqa: E402
from utils.scverse.keys import File, Key  # noqa: E402

SUB = 4                       # sub-grid cells per super-pixel side (2 um)
RESULTS = REPO / "bench" / "results"


def dominant_type(directory: Path, grid_shape) -> pd.Series:
    """True dominant cell type per super-pixel ('row_col' -> type) from the cells as discs."""
    import cv2
    sim = json.loads((directory / "truth" / "simulation.json").read_text())
    px = float(sim["raw_pixel_size_um"])
    cells = pd.read_csv(directory / "truth" / "cells.tsv.gz", sep="\t")
    types = sim["cell_types"]
    R, C = grid_shape
    f = SUB / SUPER_PIXEL_UM                       # um -> sub-grid cells
    cover = np.zeros((len(types), R, C), np.float32)
    for k, t in enumerate(types):
        layer = np.zeros((R * SUB, C * SUB), np.uint8)
        for x, y, r in cells.loc[cells["type"] == t, ["x", "y", "radius_um"]].itertuples(index=False):
            cv2.circle(layer, (int(round(x * px * f)), int(round(y * px * f))), max(1, int(round(r * f))), 1, -1)
        cover[k] = layer.reshape(R, SUB, C, SUB).sum(axis=(1, 3))
    best = cover.argmax(0)
    rr, cc = np.nonzero(cover.sum(0) > 0)
    return pd.Series(np.array(types)[best[rr, cc]], index=[f"{r}_{c}" for r, c in zip(rr, cc)])


def score_analysis(run_dir: Path, truth, dominant: pd.Series) -> dict:
    """ARI of the domains vs the true regions and cell-type accuracy vs the dominant type."""
    import anndata
    from sklearn.metrics import adjusted_rand_score
    an = anndata.read_h5ad(run_dir / File.ANALYSIS_DIR / File.ANALYSIS_H5AD)
    key = an.obs["row"].astype(str) + "_" + an.obs["col"].astype(str)
    obs = an.obs.set_index(key)
    t_key = truth.obs["row"].astype(str) + "_" + truth.obs["col"].astype(str)
    region = pd.Series(truth.obs["region"].to_numpy(), index=t_key)
    both = obs.index.intersection(region.index)
    out = {"ari": round(float(adjusted_rand_score(region[both].astype(str), obs.loc[both, Key.DOMAIN].astype(str))), 4),
           "n_superpixels": int(len(both))}
    if Key.CELL_TYPE in obs:
        typed = obs.index.intersection(dominant.index)
        hit = obs.loc[typed, Key.CELL_TYPE].astype(str).to_numpy() == dominant[typed].to_numpy()
        out.update(cell_type_accuracy=round(float(hit.mean()), 4), n_typed=int(len(typed)))
        # the share the best single label would get: what "accuracy" has to beat
        out["majority_baseline"] = round(float(dominant[typed].value_counts(normalize=True).iloc[0]), 4)
    return out


def accuracy(directory: Path, smooths, seed: int) -> dict:
    import anndata
    truth = anndata.read_h5ad(directory / "truth" / "super.h5ad")
    fractions = truth.obs["region"].value_counts(normalize=True)
    n_domains = int((fractions > 0.01).sum())
    calib = json.loads((directory / "calibration.json").read_text())
    dominant = dominant_type(directory, tuple(calib["superpixel_grid"]))
    markers = write_demo_markers(directory)
    res = {"n_domains": n_domains, "true_regions": fractions.round(4).to_dict(), "runs": {}}
    for run in ("trihrge", "interp"):
        for s in smooths:
            run_dir = directory / "results" / run
            t, m = timed([sys.executable, "-m", "utils.analysis", str(run_dir), "--markers", str(markers),
                          "--n-domains", str(n_domains), "--smooth", str(s), "--seed", str(seed), "-q"],
                         RESULTS / "logs" / f"analysis-{run}-smooth{s}.log")
            r = {**score_analysis(run_dir, truth, dominant), "seconds": round(t, 1), "peak_rss_mb": round(m / 2**20)}
            res["runs"][f"{run} smooth={s}"] = r
            print(f"{run:8s} smooth={s}  ARI {r['ari']:.3f}  cell-type accuracy {r.get('cell_type_accuracy', float('nan')):.3f}"
                  f" (majority {r.get('majority_baseline', float('nan')):.3f})  {t:.1f} s  {m / 2**20:.0f} MB", flush=True)
    return res


def scale(run_dir: Path, seed: int, markers) -> dict:
    import anndata
    ad = anndata.read_h5ad(run_dir / "super-res.h5ad", backed="r")
    n, g = ad.shape
    res = {"superpixels": int(n), "genes": int(g)}
    cmd = [sys.executable, "-m", "utils.analysis", str(run_dir), "--seed", str(seed), "-q"]
    if markers:
        cmd += ["--markers", str(markers)]
    for label, extra in (("kmeans", []), ("kmeans smooth=2", ["--smooth", "2"])):
        t, m = timed(cmd + extra, RESULTS / "logs" / f"analysis-scale-{label.replace(' ', '-')}.log")
        res[label] = {"seconds": round(t, 1), "peak_rss_mb": round(m / 2**20)}
        print(f"{n} super-pixels x {g} genes, {label}: {t:.1f} s, peak RSS {m / 2**20:.0f} MB", flush=True)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["accuracy", "scale"])
    p.add_argument("path", type=Path, help="accuracy: the demo directory; scale: a run directory")
    p.add_argument("--smooth", type=int, nargs="+", default=[0, 2], help="--smooth settings to score (accuracy)")
    p.add_argument("--markers", type=Path, default=None, help="scale: a marker TSV (default: the built-in panel)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    res = accuracy(args.path, args.smooth, args.seed) if args.what == "accuracy" else scale(args.path, args.seed,
                                                                                             args.markers)
    out = RESULTS / "analysis.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    old[args.what] = {"path": str(args.path), **res}
    out.write_text(json.dumps(old, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
