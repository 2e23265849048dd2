"""Real-data evaluation protocols of DESIGN-NOTES section 3, for any raw-layout folder with array
coordinates in section.json (ST square lattice or Visium hexagonal):

  python -m utils.protocols make leave-out SRC --directory DST   # hide every other spot
  python -m utils.protocols make coarsen   SRC --directory DST   # sum 2 x 2 blocks of spots
  python -m utils.protocols make sparse-leave-out SRC ...         # hide a seeded random 1 in 5
  (run the five stages on DST)
  python -m utils.protocols score DST/results/trihrge DST/results/interp ...

`make` writes DST in the raw layout with the training spots only, plus DST/heldout/ (the spots
to score at: the hidden ones, or the original ones) and DST/protocol.json. `score` sums each run's
super-pixel predictions over every held-out spot's footprint and reports, per gene, Pearson r
across held-out spots with the measured counts (the 100 most variable genes), next to the
nearest-training-spot baseline."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..core import geometry as geo
from ..core.cli import POSITIVE_INT, HelpFormatter, Parser, output_directory, path_arg, setup_logging
from ..core.errors import InputError
from ..core.h5ad_io import read_anndata
from ..core.raw_io import COUNTS_NAMES, IMAGE_NAMES, find_one, match_spots, read_counts, read_locs
from ..core.stage import Stage
from ..core.text_io import require_file
from .metrics import pearson_per_gene


def _array_coords(src, n):
    p = Path(src) / "section.json"
    if not p.is_file():
        raise InputError(f"{p}: not found; the protocols need the array coordinates (array_x, array_y) of every spot")
    sec = json.loads(p.read_text())
    ax, ay = np.asarray(sec.get("array_x", []), int), np.asarray(sec.get("array_y", []), int)
    if len(ax) != n or len(ay) != n:
        raise InputError(f"{p}: array_x/array_y hold {len(ax)}/{len(ay)} values for {n} spots; "
                         f"they must follow the row order of the counts")
    return ax, ay, sec


def _is_hex(ax, ay):
    # Visium: array_x steps by 2 within a row and odd rows are shifted by 1
    return bool(np.all((ax + ay) % 2 == 0) and len(np.unique(ax % 2)) == 2)


SPARSE_HIDDEN = 5  # sparse-leave-out hides 1 spot in 5: a hidden spot's neighbours are mostly measured


def split(ax, ay, kind):
    """leave-out / sparse-leave-out: (train mask, None); coarsen: (None, block id per spot)."""
    if kind == "sparse-leave-out":
        hidden = np.zeros(len(ax), bool)
        hidden[np.random.default_rng(0).permutation(len(ax))[::SPARSE_HIDDEN]] = True
        return ~hidden, None
    hexagonal = _is_hex(ax, ay)
    col = ax // 2 if hexagonal else ax
    if kind == "leave-out":
        return (col + ay) % 2 == 0, None
    return None, (col // 2) * 100003 + (ay // 2)


def make(kind, src, dst):
    src, dst = Path(src), Path(dst)
    ids, genes, X = read_counts(src)
    locs, locs_path = read_locs(src)
    locs = match_spots(ids, locs, find_one(src, COUNTS_NAMES, "counts"), locs_path)
    ax, ay, sec = _array_coords(src, len(ids))
    radius = float((src / "radius-raw.txt").read_text().split()[0])
    xy = locs[["x", "y"]].to_numpy(float)
    if kind in ("leave-out", "sparse-leave-out"):
        train, _ = split(ax, ay, kind)
        t_ids, t_X, t_xy, t_r = ids[train], X[train], xy[train], radius
        h_ids, h_X, h_xy = ids[~train], X[~train], xy[~train]
    elif kind == "coarsen":
        _, block = split(ax, ay, kind)
        uniq, inv = np.unique(block, return_inverse=True)
        t_X = np.zeros((len(uniq), X.shape[1]), np.float32)
        np.add.at(t_X, inv, X)
        t_xy = np.stack([np.bincount(inv, xy[:, k]) / np.bincount(inv) for k in (0, 1)], 1)
        t_ids = pd.Index([f"block{b}" for b in range(len(uniq))])
        # one disk of twice the radius has the area of the four spots it sums
        t_r = 2.0 * radius
        h_ids, h_X, h_xy = ids, X, xy
    else:
        raise InputError(f"unknown protocol {kind!r}; use leave-out, sparse-leave-out or coarsen")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"{dst}: must differ from the source folder")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "protocol.json").is_file():
        raise InputError(f"{dst}: holds other files and is not a protocol folder (no protocol.json); give a new or "
                         f"empty folder, or one written by python -m utils.protocols make")
    image = find_one(src, IMAGE_NAMES, "H&E image")
    _write(dst, image, kind, src, genes, (t_ids, t_X, t_xy, t_r), (h_ids, h_X, h_xy), radius)
    return len(t_ids), len(h_ids)


def _write(dst, image, kind, src, genes, train, heldout, radius):
    """The protocol folder's files, inside the stage runner (lock, sweep, disk, one commit)."""
    (t_ids, t_X, t_xy, t_r), (h_ids, h_X, h_xy) = train, heldout
    with Stage("protocols", dst, manifest=False, sweep=(dst / "heldout",), create=True) as st:
        st.require_space(image.stat().st_size + 8 * (t_X.size + h_X.size), image.name)
        out = st.out
        img_out = dst / image.name
        if not img_out.exists():
            tmp = out.path(img_out)
            try:
                os.link(image, tmp)
            except OSError:
                shutil.copyfile(image, tmp)
        out.write_text(dst / "pixel-size-raw.txt", (src / "pixel-size-raw.txt").read_text())
        out.write_text(dst / "radius-raw.txt", f"{t_r:.6f}\n")
        pd.DataFrame(t_X.astype(np.int64), index=pd.Index(t_ids, name="spot"), columns=genes).to_csv(
            out.path(dst / "cnts.tsv.gz"), sep="\t", compression="gzip")
        pd.DataFrame({"spot": t_ids, "x": t_xy[:, 0], "y": t_xy[:, 1]}).to_csv(out.path(dst / "locs-raw.tsv"), sep="\t", index=False)
        pd.DataFrame(h_X.astype(np.int64), index=pd.Index(h_ids, name="spot"), columns=genes).to_csv(
            out.path(dst / "heldout" / "cnts.tsv.gz"), sep="\t", compression="gzip")
        pd.DataFrame({"spot": h_ids, "x": h_xy[:, 0], "y": h_xy[:, 1]}).to_csv(
            out.path(dst / "heldout" / "locs-raw.tsv"), sep="\t", index=False)
        out.write_json(dst / "protocol.json", {"protocol": kind, "source": str(src), "train_spots": int(len(t_ids)),
                                               "heldout_spots": int(len(h_ids)), "radius_raw_px": radius,
                                               "train_radius_raw_px": t_r})


class HeldOut:
    """The held-out spots of a protocol folder: their counts, raw positions and footprints, and the
    training spots (for the nearest-spot baseline). The genes scored are the n_genes most variable
    held-out genes that a run predicts (chosen at the first run read)."""

    def __init__(self, directory, n_genes=100):
        d = Path(directory)
        if not (d / "protocol.json").is_file():
            raise InputError(f"{d}: not a protocol folder (no protocol.json); score runs made in DST/results/<run> "
                             f"of a folder written by `python -m utils.protocols make ... --directory DST`")
        try:
            self.protocol = json.loads((d / "protocol.json").read_text())
            self.calib = json.loads((d / "calibration.json").read_text())
            self.counts = pd.read_csv(d / "heldout" / "cnts.tsv.gz", sep="\t", index_col=0)
            self.locs = pd.read_csv(d / "heldout" / "locs-raw.tsv", sep="\t", index_col=0)
            self.train_counts = pd.read_csv(d / "cnts.tsv.gz", sep="\t", index_col=0)
            self.train_locs = pd.read_csv(d / "locs-raw.tsv", sep="\t", index_col=0)
        except (OSError, ValueError, EOFError) as e:  # missing, truncated, not JSON / TSV
            raise InputError(f"{d}: damaged protocol folder ({type(e).__name__}: {e}); write it again with "
                             f"`python -m utils.protocols make` and rerun the five stages") from None
        self.n_genes, self.genes = n_genes, None

    def predicted(self, run_dir):
        """(held-out spots, genes) float64: a run's super-pixel counts summed over each held-out footprint."""
        p = require_file(Path(run_dir) / "super-res.h5ad", fix="give run directories written by HISTEX.py (DST/results/<run>)")
        sr = read_anndata(p, "rerun HISTEX.py")
        if self.genes is None:
            common = [g for g in sr.var_names if g in self.counts.columns]
            self.genes = list(self.counts[common].var().sort_values(ascending=False).index[:self.n_genes])
        gi = [list(sr.var_names).index(g) for g in self.genes]
        lookup = np.full(tuple(self.calib["superpixel_grid"]), -1)
        lookup[sr.obs["row"].to_numpy(), sr.obs["col"].to_numpy()] = np.arange(sr.n_obs)
        scale = self.calib["scale"]
        M = geo.footprint_matrix(self.locs[["x", "y"]].to_numpy() * scale, self.protocol["radius_raw_px"] * scale,
                                 lookup, sr.n_obs, dtype=np.float64)
        return np.asarray(M @ np.asarray(sr.X, dtype=np.float64)[:, gi])

    def measured(self):
        """(held-out spots, genes) float64 measured counts of the scored genes."""
        return self.counts[self.genes].to_numpy(float)

    def nearest_spot(self):
        """(held-out spots, genes): the counts of the nearest training spot (the copy baseline)."""
        _, nn = cKDTree(self.train_locs[["x", "y"]].to_numpy()).query(self.locs[["x", "y"]].to_numpy())
        return self.train_counts[self.genes].to_numpy(float)[nn]


def heldout_pearson(run_dirs, n_genes=100, log1p=False):
    """(protocol record, genes, {run name or "nearest spot": per-gene Pearson r at the held-out
    spots}) over the n_genes most variable held-out genes; log1p: of log1p counts."""
    run_dirs = [Path(r) for r in run_dirs]
    held = HeldOut(run_dirs[0].parent.parent, n_genes)
    f = np.log1p if log1p else (lambda v: v)
    results = {r.name: pearson_per_gene(f(held.predicted(r)), f(held.measured())) for r in run_dirs}
    results["nearest spot"] = pearson_per_gene(f(held.nearest_spot()), f(held.measured()))
    return held.protocol, held.genes, results


def score(run_dirs, n_genes=100):
    proto, _, results = heldout_pearson(run_dirs, n_genes)
    return proto, {k: {"median": float(np.median(v)), "mean": float(np.mean(v))} for k, v in results.items()}


def main(argv=None):
    p = Parser(prog="python -m utils.protocols", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a protocol folder from a raw-layout folder", formatter_class=HelpFormatter)
    m.add_argument("protocol", choices=["leave-out", "sparse-leave-out", "coarsen"],
                   help="leave-out: hide every other spot (checkerboard); sparse-leave-out: hide a seeded random 1 in "
                        f"{SPARSE_HIDDEN} (the run keeps a nearly full lattice); coarsen: sum 2 x 2 blocks of spots")
    m.add_argument("source", type=path_arg, help="raw-layout folder with section.json (array_x, array_y)")
    m.add_argument("--directory", type=output_directory, required=True, help="the protocol folder to write")
    s = sub.add_parser("score", help="score runs made on a protocol folder", formatter_class=HelpFormatter)
    s.add_argument("runs", nargs="+", type=path_arg, help="run directories DST/results/<model>")
    s.add_argument("--n-genes", type=POSITIVE_INT, default=100, help="most variable held-out genes to score")
    a = p.parse_args(argv)
    setup_logging(True)
    if a.cmd == "make":
        n_t, n_h = make(a.protocol, a.source, a.directory)
        print(f"{a.directory}: {n_t} training spots, {n_h} held-out spots; now run the five stages on it")
    else:
        proto, res = score(a.runs, a.n_genes)
        print(f"protocol {proto['protocol']}: Pearson r per gene across {proto['heldout_spots']} held-out spots")
        for k, v in res.items():
            print(f"  {k:24s} median {v['median']:.4f}  mean {v['mean']:.4f}")
    return 0

