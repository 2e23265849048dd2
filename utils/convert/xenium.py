"""Xenium (Xenium Onboard Analysis 1.x-2.x outputs) + a post-Xenium H&E -> the raw layout with 8 um truth.

Frames. Xenium positions (cells.parquet centroids, cell_boundaries.parquet vertices) are in microns of the
Xenium frame, whose morphology image (morphology_focus / morphology.ome.tif) has `pixel_size` um per pixel
(experiment.xenium; 0.2125). The alignment matrix that Xenium Explorer exports after aligning an H&E
("Download transformation matrix", e.g. `*_imagealignment.csv`, three lines of three numbers) maps H&E
image pixels to Xenium *morphology-image pixels* (10x Genomics knowledge base, "How can I convert
coordinates between H&E image and Xenium data"):

    [x_xenium_px, y_xenium_px, 1]^T = M [x_he_px, y_he_px, 1]^T,   microns = pixel_size * xenium px

so a Xenium position in um goes to H&E pixels by inverse(M) applied to um / pixel_size, and the H&E pixel
size is pixel_size * sqrt(|det M[:2, :2]|) um/px. `--invert-alignment` takes a matrix stored the other way
(Xenium -> H&E), `--alignment-units microns` one whose Xenium side is in microns. A keypoints CSV
(columns fixedX, fixedY, alignmentX, alignmentY: Xenium side, H&E side, the points the matrix is computed
from; the Xenium side in morphology pixels as well) is fitted by least squares instead.
The converter checks that the cells land on the image and, when they do not, names the reading of the
alignment under which they do.

Truth. Each cell's counts are split over the 8 um super-pixels its boundary polygon overlaps: polygons are
rasterised (cv2.fillPoly) on a sub-grid of --raster-um (0.5 um: 16 x 16 sub-pixels per super-pixel) and the
counts split multinomially by overlap (per-cell totals kept exactly, seeded), as utils/simulate.py does. Cells
without a boundary (or with --assign centroids) go wholly to the super-pixel under their centroid.
"""
import json
import logging
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import sparse

from ..core.errors import InputError
from ..core.geometry import SUPER_PIXEL_UM, superpixel_grid_shape
from .affine import affine_scale, collinear, fit_affine
from .he_image import check_pixel_size, open_target_image
from .raw_layout import counts_name_for, prepare_directory
from .tables import check_plain_names, decode, numeric, read_table, require_columns
from .tenx_matrix import find_matrix, read_10x_matrix
from .truth_layout import make_pseudo_spots, section_record, write_with_truth

log = logging.getLogger("trihrge")

XENIUM_PIXEL_SIZE_UM = 0.2125
CELLS_NAMES = ("cells.parquet", "cells.csv.gz", "cells.csv")
BOUNDARY_NAMES = ("cell_boundaries.parquet", "cell_boundaries.csv.gz", "cell_boundaries.csv")
MATRIX_NAMES = ("cell_feature_matrix.h5", "cell_feature_matrix")
KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")
MIN_INSIDE = 0.5          # fraction of cells that must land on the image
MIN_BOUNDARY_MATCH = 0.5  # fraction of those cells that must have a boundary in the boundary file


# ----------------------------------------------------------------------------------------------------
# alignment


def read_alignment(path):
    """(3x3 matrix as stored, kind 'matrix' | 'keypoints'). A keypoints file is fitted to an affine H&E -> Xenium."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found; pass with --alignment the transformation matrix CSV that Xenium "
                         f"Explorer exports after aligning the H&E (or its keypoints CSV)")
    text = path.read_text(encoding="utf-8-sig", errors="replace")   # a byte-order mark is not a number
    first = text.strip().splitlines()[0] if text.strip() else ""
    if all(k.lower() in first.lower() for k in KEYPOINT_COLUMNS):
        df = read_table(path, "alignment keypoints")
        cols = {c.strip().lower(): c for c in df.columns}
        fx, fy, ax, ay = (numeric(df, cols[k.lower()], path) for k in KEYPOINT_COLUMNS)
        if len(fx) < 3 or collinear(np.column_stack([ax, ay])) or collinear(np.column_stack([fx, fy])):
            line = ", all on one line" if len(fx) >= 3 else ""
            raise InputError(f"{path}: {len(fx)} keypoint(s){line}; at least 3 keypoints not on one line are needed "
                             f"to fit the alignment: add keypoints spread over the tissue in Xenium Explorer")
        A, t, rms = fit_affine(np.column_stack([ax, ay]), np.column_stack([fx, fy]))
        log.info("%s: affine fitted to %d keypoints (rms residual %.3g)", path.name, len(fx), rms)
        M = np.eye(3)
        M[:2, :2], M[:2, 2] = A, t
        return M, "keypoints"
    nums = [v for v in re.split(r"[,;\s]+", text.strip()) if v]
    try:
        vals = np.array([float(v) for v in nums], dtype=np.float64)
    except ValueError:
        raise InputError(f"{path}: expected 3 lines of 3 numbers (the 3 x 3 affine matrix exported by Xenium "
                         f"Explorer) or a keypoints CSV with columns {', '.join(KEYPOINT_COLUMNS)}; found "
                         f"{first[:60]!r}") from None
    if vals.size == 6:
        vals = np.concatenate([vals, [0.0, 0.0, 1.0]])
    if vals.size != 9 or not np.isfinite(vals).all():
        n_bad = int((~np.isfinite(vals)).sum())
        found = f"{vals.size}" + (f", {n_bad} not finite" if n_bad else "")
        raise InputError(f"{path}: expected a 3 x 3 matrix (9 finite numbers), found {found}; give the "
                         f"transformation matrix CSV exported by Xenium Explorer")
    M = vals.reshape(3, 3)
    if not np.allclose(M[2], [0, 0, 1], atol=1e-6):
        if abs(M[2, 2]) > 0 and np.allclose(M[2, :2], 0, atol=1e-9):
            M = M / M[2, 2]
        else:
            raise InputError(f"{path}: the last row is {M[2].tolist()}, not 0, 0, 1: a projective transform; only "
                             f"affine alignments (Xenium Explorer's export) are supported")
    if abs(np.linalg.det(M[:2, :2])) < 1e-12:
        raise InputError(f"{path}: the matrix is singular; give the alignment matrix exported by Xenium Explorer")
    return M, "matrix"


def he_to_um(M, invert, units, xenium_px):
    """3x3 affine: H&E pixels -> Xenium microns, for one reading of the stored matrix."""
    A = np.linalg.inv(M) if invert else M
    if units == "pixels":
        A = np.diag([xenium_px, xenium_px, 1.0]) @ A
    return A


def apply(A, x, y):
    return A[0, 0] * x + A[0, 1] * y + A[0, 2], A[1, 0] * x + A[1, 1] * y + A[1, 2]


def _fraction_inside(A_um_to_px, x_um, y_um, hw):
    px, py = apply(A_um_to_px, x_um, y_um)
    return float(np.mean((px >= 0) & (py >= 0) & (px < hw[1]) & (py < hw[0])))


def resolve_alignment(path, M, kind, invert, units, xenium_px, x_um, y_um, hw, image):
    """(um -> px affine, H&E pixel size, description); error with the reading that fits when cells miss the image."""
    A = he_to_um(M, invert, units, xenium_px)
    inv = np.linalg.inv(A)
    frac = _fraction_inside(inv, x_um, y_um, hw)
    if frac < MIN_INSIDE:
        best = None
        for inv_ in (False, True):
            for units_ in ("pixels", "microns"):
                if (inv_, units_) == (invert, units):
                    continue
                f = _fraction_inside(np.linalg.inv(he_to_um(M, inv_, units_, xenium_px)), x_um, y_um, hw)
                if best is None or f > best[0]:
                    best = (f, inv_, units_)
        hint = ""
        if best and best[0] >= 0.9:
            flags = " ".join(f for f in (("--invert-alignment" if best[1] else ""),
                                         (f"--alignment-units {best[2]}" if best[2] != "pixels" else "")) if f)
            what = ", ".join(w for w in (("mapping Xenium -> H&E" if best[1] else ""),
                                         ("with its Xenium side in microns" if best[2] == "microns" else "")) if w)
            what = what or "mapping H&E -> Xenium with its Xenium side in morphology pixels"
            hint = f"; read as {what}, {best[0]:.0%} of them do: rerun with {flags or '--alignment-units pixels'}"
        else:
            hint = ("; no reading of the file (inverted or not, Xenium pixels or microns) puts them on it: check that "
                    "--alignment was made for this H&E image and this Xenium run")
        raise InputError(f"{path}: with this alignment ({'inverted, ' if invert else ''}Xenium side in {units}) only "
                         f"{frac:.0%} of the cell centroids fall on the {hw[1]} x {hw[0]} px image {Path(image).name}"
                         f"{hint}")
    scale, aniso = affine_scale(A[:2, :2])
    if aniso > 1.03:
        log.warning("%s: the alignment stretches the axes differently by %.1f%%; the pixel size is their geometric "
                    "mean", Path(path).name, 100 * (aniso - 1))
    rot = math.degrees(math.atan2(A[1, 0], A[0, 0]))
    desc = (f"{Path(path).name} ({kind}; H&E px -> Xenium {units}{', inverted' if invert else ''}; rotation "
            f"{rot:.1f} deg) x Xenium pixel size {xenium_px:g} um")
    return inv, scale, desc, frac


# ----------------------------------------------------------------------------------------------------
# cells -> super-pixels


def rasterise_cells(vx, vy, starts, ends, grid_shape, sub):
    """Overlap of polygons with super-pixels. vx, vy: vertices in sub-pixel units of the image frame (sub-pixel i
    covers [i, i+1); a super-pixel is sub x sub of them). Polygon j = vertices starts[j]:ends[j].

    Returns (polygon index, super-pixel key = row * cols + col, number of covered sub-pixels), and the indices of
    polygons that cover no sub-pixel centre inside the grid."""
    R, C = grid_shape
    Hs, Ws = R * sub, C * sub
    out_p, out_k, out_n, empty = [], [], [], []
    for j in range(len(starts)):
        a, b = starts[j], ends[j]
        px, py = vx[a:b], vy[a:b]
        x0, y0 = int(math.floor(px.min())) - 1, int(math.floor(py.min())) - 1
        x1, y1 = int(math.ceil(px.max())) + 1, int(math.ceil(py.max())) + 1
        if b - a < 3 or x1 <= 0 or y1 <= 0 or x0 >= Ws or y0 >= Hs:
            empty.append(j)
            continue
        patch = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
        pts = np.empty((b - a, 2), np.int32)
        # cv2 puts pixel centres at integers: continuous coordinate u -> u - 0.5, fixed point with 8 fractional bits
        pts[:, 0] = np.round((px - x0 - 0.5) * 256)
        pts[:, 1] = np.round((py - y0 - 0.5) * 256)
        cv2.fillPoly(patch, [pts], 1, cv2.LINE_8, 8)
        ys, xs = np.nonzero(patch)
        ys += y0
        xs += x0
        ok = (ys >= 0) & (xs >= 0) & (ys < Hs) & (xs < Ws)
        if not ok.any():
            empty.append(j)
            continue
        keys = (ys[ok] // sub) * C + xs[ok] // sub
        uk, n = np.unique(keys, return_counts=True)
        out_p.append(np.full(uk.size, j, np.int64))
        out_k.append(uk)
        out_n.append(n)
    if out_p:
        return np.concatenate(out_p), np.concatenate(out_k), np.concatenate(out_n).astype(np.float64), np.array(empty, np.int64)
    z = np.zeros(0, np.int64)
    return z, z, z.astype(np.float64), np.array(empty, np.int64)


def split_counts(X, piece_cell, piece_key, piece_frac, seed, chunk=50_000):
    """Split each cell's counts multinomially over its pieces (super-pixels).

    X: CSR cells x genes, integer. Pieces sorted by cell (piece_frac sums to 1 per cell; every cell has one).
    Returns (sorted unique keys, CSR keys x genes) with per-cell totals preserved exactly."""
    rng = np.random.default_rng([int(seed), 11])
    n_cells, G = X.shape
    uk, key_pos = np.unique(piece_key, return_inverse=True)
    start = np.searchsorted(piece_cell, np.arange(n_cells), side="left")
    k = np.searchsorted(piece_cell, np.arange(n_cells), side="right") - start
    if (k == 0).any():
        raise RuntimeError("internal error: a cell without super-pixels reached split_counts")
    total = sparse.csr_matrix((len(uk), G), dtype=np.int64)
    for c0 in range(0, n_cells, chunk):
        sub = X[c0:c0 + chunk].tocoo()
        cell = sub.row.astype(np.int64) + c0
        gene = sub.col.astype(np.int64)
        remaining = sub.data.astype(np.int64)
        used = np.zeros(len(cell), np.float64)
        kc = k[cell]
        rk, rg, rn = [], [], []
        for t in range(int(kc.max()) if len(kc) else 0):
            act = np.flatnonzero((kc > t) & (remaining > 0))
            if act.size == 0:
                break
            idx = start[cell[act]] + t
            p = piece_frac[idx]
            last = kc[act] == t + 1
            q = np.where(last, 1.0, np.clip(p / np.maximum(1.0 - used[act], 1e-12), 0.0, 1.0))
            n = rng.binomial(remaining[act], q)
            nz = n > 0
            rk.append(key_pos[idx[nz]])
            rg.append(gene[act][nz])
            rn.append(n[nz])
            remaining[act] -= n
            used[act] += p
        if rk:
            part = sparse.csr_matrix((np.concatenate(rn), (np.concatenate(rk), np.concatenate(rg))),
                                     shape=(len(uk), G), dtype=np.int64)
            total = total + part
    total.sum_duplicates()
    return uk, total.tocsr()


def _read_cells(source):
    for n in CELLS_NAMES:
        p = Path(source) / n
        if p.is_file():
            df = read_table(p, "cell table", dtype={"cell_id": str}, keep_default_na=False)
            require_columns(df, ["cell_id", "x_centroid", "y_centroid"], p, "cell table")
            out = pd.DataFrame({"x": numeric(df, "x_centroid", p), "y": numeric(df, "y_centroid", p)},
                               index=pd.Index(decode(df["cell_id"].to_numpy()), name="cell_id"))
            if out.index.duplicated().any():
                raise InputError(f"{p}: duplicated cell ids; give the file written by Xenium Onboard Analysis")
            return out, p
    raise InputError(f"{source}/{CELLS_NAMES[0]}: no cell table (looked for {', '.join(CELLS_NAMES)}); point SOURCE at "
                     f"the Xenium output folder (the one holding experiment.xenium)")


def _read_boundaries(source, override):
    path = Path(override) if override else None
    if path is None:
        for n in BOUNDARY_NAMES:
            if (Path(source) / n).is_file():
                path = Path(source) / n
                break
    if path is None:
        return None, None
    df = read_table(path, "cell boundaries", dtype={"cell_id": str}, keep_default_na=False)
    require_columns(df, ["cell_id", "vertex_x", "vertex_y"], path, "cell boundaries")
    ids = decode(df["cell_id"].to_numpy())
    codes, uniq = pd.factorize(ids)
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    vx = numeric(df, "vertex_x", path)[order]
    vy = numeric(df, "vertex_y", path)[order]
    cuts = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], cuts]).astype(np.int64)
    ends = np.concatenate([cuts, [len(codes)]]).astype(np.int64)
    return {"ids": pd.Index(uniq[codes[starts]]), "x": vx, "y": vy, "starts": starts, "ends": ends}, path


def _xenium_pixel_size(source, override):
    if override:
        return float(override), "given with --xenium-pixel-size"
    p = Path(source) / "experiment.xenium"
    if p.is_file():
        try:
            v = float(json.loads(p.read_text(encoding="utf-8-sig")).get("pixel_size"))
            if np.isfinite(v) and 0.01 < v < 10:
                return v, f"pixel_size of {p.name}"
        except (ValueError, TypeError, AttributeError):
            log.warning("%s: no readable pixel_size; using %g um", p, XENIUM_PIXEL_SIZE_UM)
    return XENIUM_PIXEL_SIZE_UM, "Xenium default"


# ----------------------------------------------------------------------------------------------------
# the converter


def convert_xenium(args):
    source = Path(args.source)
    if not source.is_dir():
        raise InputError(f"{source}: not a directory; give the Xenium output folder (holding cells.parquet, "
                         f"cell_feature_matrix.h5, cell_boundaries.parquet, experiment.xenium)")
    if args.image is None or args.alignment is None:
        raise InputError("xenium needs --image (the post-Xenium H&E) and --alignment (the matrix CSV Xenium Explorer "
                         "exports after aligning that H&E); see python -m utils.convert xenium --help")
    sub = _raster_steps(args.raster_um)
    image, image_name, hw = open_target_image(args.image)
    xpx, xpx_how = _xenium_pixel_size(source, args.xenium_pixel_size)
    cells, Mx = _cells_of_matrix(source, args.matrix)
    M, kind = read_alignment(args.alignment)
    um_to_px, ps, how, frac = resolve_alignment(args.alignment, M, kind, args.invert_alignment, args.alignment_units,
                                                xpx, cells.x.to_numpy(), cells.y.to_numpy(), hw, image)
    if args.pixel_size:
        log.info("H&E pixel size from the alignment: %.5g um/px; using --pixel-size %g instead", ps, args.pixel_size)
        ps, how = float(args.pixel_size), "given with --pixel-size"
    ps = check_pixel_size(ps, image, how)
    log.info("H&E pixel size %.6g um/px (%s; Xenium pixel size from %s)", ps, how, xpx_how)

    cell_ids, cx, cy, X, n_off = _cells_on_image(cells, Mx, um_to_px, hw, frac)
    check_plain_names(cell_ids.astype(str), args.source, "cell id")
    grid_shape = superpixel_grid_shape(hw, ps)
    assigned = _cell_pieces(args, source, cell_ids, cx, cy, um_to_px, ps, grid_shape, sub)
    uk, truth = split_counts(X, *assigned["pieces"], args.seed)
    rows, cols = uk // grid_shape[1], uk % grid_shape[1]
    log.info("truth: %d super-pixels x %d genes, %d counts (cells on the image: %d)", len(uk), truth.shape[1],
             int(truth.sum()), int(X.sum()))

    spots = make_pseudo_spots(truth, rows, cols, grid_shape, hw, ps, args.seed)
    counts_name = counts_name_for(args.counts_format, len(spots["ids"]), len(Mx.genes))
    directory = prepare_directory(args.directory, image_name, counts_name, writes_truth=True, source=args.source)
    conversion = {"converter": "python -m utils.convert xenium", "source": str(source.resolve()),
                  "image": str(image.resolve()), "alignment": str(Path(args.alignment).resolve()),
                  "alignment_kind": kind, "alignment_matrix": M.tolist(), "invert_alignment": bool(args.invert_alignment),
                  "alignment_units": args.alignment_units, "xenium_pixel_size_um": xpx,
                  "um_to_image_px": um_to_px.tolist(), "pixel_size_um": ps, "pixel_size_from": how,
                  "cells": int(len(cell_ids)), "cells_off_image": n_off,
                  "assign": assigned["assign"], "raster_um": args.raster_um,
                  "cells_by_centroid": assigned["by_centroid"], "seed": int(args.seed)}
    section = section_record("10x Xenium (Xenium Onboard Analysis)",
                             "pseudo-Visium: 55 um spots on a 100 um hexagonal lattice, summed from 8 um truth built "
                             "from Xenium cells", args.tissue, spots["ids"], Mx.genes, spots["array_col"],
                             spots["array_row"], conversion)
    cells_out = pd.DataFrame({"cell_id": cell_ids.astype(str), "x": np.round(cx, 3), "y": np.round(cy, 3),
                              "total_counts": np.asarray(X.sum(1)).ravel()})
    write_with_truth(args, directory, image=image, image_name=image_name, counts_name=counts_name, pixel_size=ps,
                     spots=spots, matrix=Mx, section=section, truth=truth, rows=rows, cols=cols, image_hw=hw,
                     source="10x Xenium", uns={"xenium_pixel_size_um": xpx},
                     also=lambda out: cells_out.to_csv(out.path(directory / "truth" / "cells.tsv.gz"), sep="\t",
                                                       index=False))
    log.info("wrote %s: %d pseudo-spots, truth %d super-pixels x %d genes from %d cells", directory,
             len(spots["ids"]), len(uk), len(Mx.genes), len(cell_ids))
    return {"directory": str(directory), "spots": len(spots["ids"]), "superpixels": len(uk), "pixel_size": ps,
            "cells": len(cell_ids)}


def _cells_on_image(cells, Mx, um_to_px, hw, frac):
    """(cell ids, x, y in H&E px, counts, cells dropped) of the cells whose centroid falls on the H&E."""
    cx, cy = apply(um_to_px, cells.x.to_numpy(), cells.y.to_numpy())
    on_image = (cx >= 0) & (cy >= 0) & (cx < hw[1]) & (cy < hw[0])
    if not on_image.all():
        log.warning("%d of %d cells (%.1f%%) fall outside the H&E and are dropped", int((~on_image).sum()), len(cx),
                    100 * (1 - frac))
    keep = np.flatnonzero(on_image)
    return cells.index[keep], cx[keep], cy[keep], Mx.X[keep], int((~on_image).sum())


def _raster_steps(raster_um: float) -> int:
    """Sub-pixels per super-pixel side of the boundary raster; --raster-um must divide 8 um."""
    sub = int(round(SUPER_PIXEL_UM / raster_um))
    if sub < 1 or abs(sub * raster_um - SUPER_PIXEL_UM) > 1e-6:
        raise InputError(f"--raster-um {raster_um}: must divide 8 um (e.g. 0.25, 0.5, 1, 2)")
    return sub


def _cells_of_matrix(source, matrix):
    """The cell-feature matrix and its cells' centroids (a DataFrame in the matrix's cell order)."""
    cells, cells_path = _read_cells(source)
    Mx = read_10x_matrix(find_matrix(source, MATRIX_NAMES, matrix, "cell-feature matrix"))
    missing = Mx.barcodes[~Mx.barcodes.isin(cells.index)]
    if len(missing):
        raise InputError(f"{Mx.path}: {len(missing)} cells have no centroid in {cells_path.name} "
                         f"({', '.join(missing[:3])}); give the matrix and cell table of the same run")
    return cells.loc[Mx.barcodes], Mx


def _check_boundaries_match(path, n_have, n_cells):
    """Xenium writes a boundary for every cell: a file that outlines few of them is another run's."""
    if n_have < MIN_BOUNDARY_MATCH * n_cells:
        raise InputError(f"{path}: holds a boundary for only {n_have} of the {n_cells} cells on the image "
                         f"({n_have / n_cells:.0%} of the cell ids match): it is from another run; give the "
                         f"cell_boundaries.parquet of the same Xenium output (--boundaries), or --assign centroids")


def _cell_pieces(args, source, cell_ids, cx, cy, um_to_px, ps, grid_shape, sub) -> dict:
    """Each cell's share of the super-pixels it covers: pieces = (cell, super-pixel key, fraction),
    sorted by cell and key; by boundary overlap where --assign and the boundaries allow, else the
    super-pixel under the centroid. Also how the cells were assigned, for section.json."""
    n, C = len(cell_ids), grid_shape[1]
    centroid_cells = np.arange(n)
    pieces = []
    boundaries = None
    if args.assign != "centroids":
        boundaries, b_path = _read_boundaries(source, args.boundaries)
        if boundaries is None and args.assign == "boundaries":
            raise InputError(f"{source}/{BOUNDARY_NAMES[0]}: not found, but --assign boundaries asks for it; give the "
                             f"cell boundaries or use --assign centroids")
    if boundaries is not None:
        pos = boundaries["ids"].get_indexer(cell_ids)
        have = np.flatnonzero(pos >= 0)
        _check_boundaries_match(b_path, len(have), n)
        sel = pos[have]
        # vertices of the selected cells: Xenium um -> H&E px -> image um -> sub-pixels
        vx_px, vy_px = apply(um_to_px, boundaries["x"], boundaries["y"])
        f = ps / args.raster_um
        p_idx, p_key, p_n, _ = rasterise_cells(vx_px * f, vy_px * f, boundaries["starts"][sel],
                                               boundaries["ends"][sel], grid_shape, sub)
        pieces.append((have[p_idx], p_key, p_n))
        has_piece = np.zeros(n, bool)
        has_piece[have[p_idx]] = True
        centroid_cells = np.flatnonzero(~has_piece)
        log.info("%s: %d cells split over super-pixels by boundary overlap (%.2f super-pixels per cell); %d by "
                 "centroid (no boundary or no area)", b_path.name, int(has_piece.sum()),
                 len(p_idx) / max(1, int(has_piece.sum())), len(centroid_cells))
    else:
        log.info("assigning all %d cells by centroid", n)
    if len(centroid_cells):
        r = np.floor(cy[centroid_cells] * ps / SUPER_PIXEL_UM).astype(np.int64)
        c = np.floor(cx[centroid_cells] * ps / SUPER_PIXEL_UM).astype(np.int64)
        pieces.append((centroid_cells, r * C + c, np.ones(len(centroid_cells))))
    p_cell, p_key, p_n = (np.concatenate([p[k] for p in pieces]) for k in range(3))
    order = np.lexsort((p_key, p_cell))
    p_cell, p_key, p_n = p_cell[order], p_key[order], p_n[order]
    per_cell = np.bincount(p_cell, weights=p_n, minlength=n)
    return {"pieces": (p_cell, p_key, p_n / per_cell[p_cell]), "by_centroid": int(len(centroid_cells)),
            "assign": "boundaries" if boundaries is not None else "centroids"}
