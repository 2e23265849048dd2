#!/usr/bin/env python
"""Where the 2 x 2 coarsening protocol's error comes from: score runs at the original spots by the
size of the coarse block that holds them. A block of k < 4 spots (at the section's edge, or where
spots are missing) becomes one pseudo-spot of twice the spot radius, the footprint of four spots,
whose count is that of k: its count per footprint super-pixel is about k / 4 of its neighbours'.
This prints, per run, the median per-gene Pearson r (100 most variable genes, raw counts, as
`utils.protocols score`) over all original spots, over the spots of full blocks only, and the mean
log ratio of predicted to measured total counts at the spots of each block size.

    python bench/coarsen_blocks.py --sections C2 C3 --runs stack-full-s0 interp-full-s0

Reads bench/her2st.py's folders (bench/data/her2st/<section>-coarsen); writes
bench/results/coarsen_blocks.json."""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.evaluation.heldout import HeldOut  # noqa: E402
from utils.evaluation.metrics import pearson_per_gene  # noqa: E402
from utils.evaluation.protocols import _array_coords, split  # noqa: E402


def block_sizes(held: HeldOut) -> np.ndarray:
    """(n original spots,) how many spots the coarse block of each spot holds (1-4), in the held-out
    order (the source's spot order, as `utils.protocols make coarsen` writes it)."""
    ax, ay, _ = _array_coords(held.protocol["source"], len(held.counts))
    _, block = split(ax, ay, "coarsen")
    _, inv, counts = np.unique(block, return_inverse=True, return_counts=True)
    return counts[inv]


def by_block(held: HeldOut, name: str, predicted: np.ndarray, sizes: np.ndarray) -> dict:
    """median per-gene r over all spots and over the spots of full blocks; mean log ratio of predicted
    to measured spot totals per block size."""
    measured = held.measured()
    full = sizes == 4
    ratio = np.log((predicted.sum(1) + 1) / (measured.sum(1) + 1))
    return {"run": name, "median_r_all": float(np.median(pearson_per_gene(predicted, measured))),
            "median_r_full_blocks": float(np.median(pearson_per_gene(predicted[full], measured[full]))),
            "log_ratio_by_block_size": {int(k): float(ratio[sizes == k].mean()) for k in np.unique(sizes)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["C2", "C3"])
    p.add_argument("--runs", nargs="+", default=["stack-full-s0", "interp-full-s0"],
                   help="run folders under <section>-coarsen/results")
    p.add_argument("--root", type=Path, default=REPO / "bench" / "data" / "her2st")
    a = p.parse_args(argv)
    out = {}
    for section in a.sections:
        d = a.root / f"{section}-coarsen"
        runs = [r for r in a.runs if (d / "results" / r / "super-res.h5ad").is_file()]
        if not runs:
            print(f"{d}: none of the runs {a.runs} is there; run bench/her2st.py first")
            continue
        held = HeldOut(d)
        sizes = block_sizes(held)
        rows = [by_block(held, r, held.predicted(d / "results" / r), sizes) for r in runs]
        rows.append(by_block(held, "coarse-spot copy", held.nearest_spot(), sizes))
        out[section] = {"spots_by_block_size": {int(k): int((sizes == k).sum()) for k in np.unique(sizes)},
                        "runs": rows}
        print(f"{section} coarsen: original spots by block size {out[section]['spots_by_block_size']}")
        print("| run | median r, all spots | full blocks only | log(pred/meas) totals by block size |")
        print("|---|---|---|---|")
        for r in rows:
            ratios = ", ".join(f"{k}: {v:+.2f}" for k, v in r["log_ratio_by_block_size"].items())
            print(f"| {r['run']} | {r['median_r_all']:.3f} | {r['median_r_full_blocks']:.3f} | {ratios} |")
    path = REPO / "bench" / "results" / "coarsen_blocks.json"
    path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
