"""Real-data evaluation protocols of DESIGN-NOTES section 3, for any raw-layout folder with array
coordinates in section.json (ST square lattice or Visium hexagonal):

  python -m utils.protocols make leave-out SRC --directory DST   # hide every other spot
  python -m utils.protocols make coarsen   SRC --directory DST   # sum 2 x 2 blocks of spots
  python -m utils.protocols make sparse-leave-out SRC ...         # hide a seeded random 1 in 5
  (run the five stages on DST)
  python -m utils.protocols score DST/results/trihrge DST/results/interp ...

`make` writes DST in the raw layout with the training spots only, plus DST/heldout/ (the spots
to score at: the hidden ones, or the original ones) and DST/protocol.json. `score` (heldout.py) sums each run's
super-pixel predictions over every held-out spot's footprint and reports, per gene, Pearson r
across held-out spots with the measured counts (the 100 most variable genes that all the folder's
runs predict), next to the nearest-training-spot baseline. Runs of several protocol folders are each
scored at their own folder's spots (same-named runs are labelled folder/run); a run made before its
folder was written again is refused as stale."""
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from ..convert.raw_layout import write_counts_tsv_gz
from ..core import layout as L
from ..core.cli import POSITIVE_INT, HelpFormatter, Parser, output_directory, path_arg, setup_logging
from ..core.errors import InputError
from ..core.raw_io import (
    COUNTS_NAMES,
    IMAGE_NAMES,
    examples,
    find_one,
    match_spots,
    read_counts,
    read_locs,
    read_pixel_size,
    read_radius,
)
from ..core.stage import Stage, user_entries
from ..core.text_io import json_object
from .heldout import pearson_by_folder, summary

PROTOCOLS = ("leave-out", "sparse-leave-out", "coarsen")
SPARSE_HIDDEN = 5  # sparse-leave-out hides 1 spot in 5: a hidden spot's neighbours are mostly measured
MIN_SPOTS = 3      # Pearson r across fewer held-out spots means nothing; get_HR needs 3 training spots


def _array_coords(src, n):
    """(array_x, array_y, the section record) of the n spots, from SRC/section.json."""
    p = Path(src) / L.SECTION
    fix = ("give the array coordinates of every spot in the row order of the counts, as "
           '{"array_x": [...], "array_y": [...]} (whole numbers)')
    if not p.exists():
        raise InputError(f"{p}: not found; the protocols need the array coordinates (array_x, array_y) of every spot")
    sec = json_object(p, ("array_x", "array_y"), fix)
    return _whole_numbers(p, sec, "array_x", n, fix), _whole_numbers(p, sec, "array_y", n, fix), sec


def _whole_numbers(path, sec, key, n, fix):
    values = sec[key]
    if not isinstance(values, list) or len(values) != n:
        what = f"{len(values)} values" if isinstance(values, list) else f"a JSON {type(values).__name__}"
        raise InputError(f"{path}: {key} holds {what} for {n} spots; {fix}")
    bad = [i for i, v in enumerate(values)
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer()]
    if bad:
        raise InputError(f"{path}: {key} holds {len(bad)} value(s) that are not whole numbers (e.g. "
                         f"{values[bad[0]]!r} for spot {bad[0] + 1}); {fix}")
    return np.asarray(values, np.int64)


def _is_hex(ax, ay):
    # Visium: array_x steps by 2 within a row and odd rows are shifted by 1
    return bool(np.all((ax + ay) % 2 == 0) and len(np.unique(ax % 2)) == 2)


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


class Spots(NamedTuple):
    ids: pd.Index
    X: np.ndarray      # counts, spots x genes
    xy: np.ndarray     # raw pixel centres
    radius: float      # raw pixels


class Source(NamedTuple):
    spots: Spots
    genes: pd.Index
    ax: np.ndarray
    ay: np.ndarray
    pixel_size: float
    image: Path


def _read_source(src):
    """The raw-layout folder a protocol is made from, through the readers stage 1-2 use."""
    ids, genes, X = read_counts(src)
    locs, locs_path = read_locs(src)
    locs = match_spots(ids, locs, find_one(src, COUNTS_NAMES, "counts"), locs_path)
    pixel_size = read_pixel_size(src)
    radius = read_radius(src, pixel_size)
    ax, ay, _ = _array_coords(src, len(ids))
    same = pd.DataFrame({"x": ax, "y": ay}).duplicated(keep=False).to_numpy()
    if same.any():
        raise InputError(f"{Path(src) / L.SECTION}: {int(same.sum())} spots share array coordinates (e.g. "
                         f"{examples(ids[same])} at array_x={ax[same][0]}, array_y={ay[same][0]}); every spot needs "
                         f"its own (array_x, array_y), in the row order of the counts")
    image = find_one(src, IMAGE_NAMES, "H&E image")
    return Source(Spots(ids, X, locs[["x", "y"]].to_numpy(float), radius), genes, ax, ay, pixel_size, image)


def _split_spots(kind, source):
    """(training spots, held-out spots) of the protocol."""
    s = source.spots
    if kind != "coarsen":
        train, _ = split(source.ax, source.ay, kind)
        return tuple(Spots(s.ids[m], s.X[m], s.xy[m], s.radius) for m in (train, ~train))
    _, block = split(source.ax, source.ay, kind)
    uniq, inv = np.unique(block, return_inverse=True)
    X = np.zeros((len(uniq), s.X.shape[1]), np.float64)
    np.add.at(X, inv, s.X)
    xy = np.stack([np.bincount(inv, s.xy[:, k]) / np.bincount(inv) for k in (0, 1)], 1)
    # one disk of twice the radius has the area of the four spots it sums
    return Spots(pd.Index([f"block{b}" for b in range(len(uniq))]), X, xy, 2.0 * s.radius), s


def make(kind, src, dst):
    src, dst = Path(src), Path(dst)
    if kind not in PROTOCOLS:
        raise InputError(f"unknown protocol {kind!r}; use {', '.join(PROTOCOLS)}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"{dst}: must differ from the source folder")
    source = _read_source(src)
    train, held = _split_spots(kind, source)
    if min(len(train.ids), len(held.ids)) < MIN_SPOTS:
        raise InputError(f"{src}: {kind} of its {len(source.spots.ids)} spots gives {len(train.ids)} training and "
                         f"{len(held.ids)} held-out spots, and each needs at least {MIN_SPOTS} (to train; for a "
                         f"Pearson r across held-out spots); give a larger section")
    _write(dst, kind, src, source, train, held)
    return len(train.ids), len(held.ids)


def _refuse_foreign(dst):
    """A folder of other files (not our lock or temporaries) is not made into a protocol folder."""
    if user_entries(dst) and not (dst / "protocol.json").is_file():
        raise InputError(f"{dst}: holds other files and is not a protocol folder (no protocol.json); give a new or "
                         f"empty folder, or one written by python -m utils.protocols make")


def _place_image(out, image, dst):
    """The source's H&E as DST's only image: an earlier source's image (in any format) goes with the commit."""
    final = dst / image.name
    for name in IMAGE_NAMES:
        if name != image.name and (dst / name).exists():
            out.discard(dst / name)
    if final.is_file() and os.path.samefile(image, final):
        return   # already this very file (a hard link made by an earlier make)
    tmp = out.path(final)
    try:
        os.link(image, tmp)
    except OSError:
        shutil.copyfile(image, tmp)


def _write_spots(out, folder, spots, genes):
    """cnts.tsv.gz (gzip without a time stamp: reruns are byte-identical) and locs-raw.tsv of some spots."""
    X = sparse.csr_matrix(spots.X).astype(np.int64)
    write_counts_tsv_gz(out.path(folder / "cnts.tsv.gz"), list(spots.ids), list(genes), X)
    pd.DataFrame({"spot": spots.ids, "x": spots.xy[:, 0], "y": spots.xy[:, 1]}).to_csv(
        out.path(folder / "locs-raw.tsv"), sep="\t", index=False)


def _write(dst, kind, src, source, train, held):
    """The protocol folder's files, inside the stage runner (lock, sweep, disk, one commit)."""
    with Stage("protocols", dst, manifest=False, create=True) as st:
        _refuse_foreign(dst)   # after the lock and the sweep: a killed make's leftovers are not "other files"
        st.require_space(source.image.stat().st_size + 8 * (train.X.size + held.X.size), source.image.name)
        _place_image(st.out, source.image, dst)
        st.out.write_text(dst / L.RAW_PIXEL_SIZE, f"{source.pixel_size:.8g}\n")
        st.out.write_text(dst / L.RAW_RADIUS, f"{train.radius:.6f}\n")
        _write_spots(st.out, dst, train, source.genes)
        _write_spots(st.out, dst / L.HELDOUT_DIR, held, source.genes)
        st.out.write_json(dst / "protocol.json", {
            "protocol": kind, "source": str(src), "train_spots": int(len(train.ids)),
            "heldout_spots": int(len(held.ids)), "radius_raw_px": held.radius, "train_radius_raw_px": train.radius})


def main(argv=None):
    p = Parser(prog="python -m utils.protocols", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a protocol folder from a raw-layout folder", formatter_class=HelpFormatter)
    m.add_argument("protocol", choices=PROTOCOLS,
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
        scored = pearson_by_folder(a.runs, a.n_genes)
        for folder, proto, genes, results in scored:
            print(f"protocol {proto['protocol']}{f' ({folder})' if len(scored) > 1 else ''}: Pearson r per gene "
                  f"({len(genes)} genes) across {proto['heldout_spots']} held-out spots")
            for k, v in summary(results).items():
                print(f"  {k:24s} median {v['median']:.4f}  mean {v['mean']:.4f}")
    return 0

