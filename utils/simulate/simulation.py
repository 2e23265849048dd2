"""The whole simulation: world, cells, expression, spots, image and truth written atomically into DIR (see the package docstring for the model)."""
import gzip
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ..core import layout as L
from ..core.errors import InputError
from ..core.geometry import SUPER_PIXEL_UM, TARGET_PIXEL_SIZE_UM, superpixel_grid_shape
from ..core.image_io import available_memory, write_png
from ..core.raw_io import COUNTS_NAMES, IMAGE_NAMES, LOCS_NAMES, examples
from ..core.stage import Stage, user_entries
from ..evaluation.truth import SPOT_DIAMETER_UM, SPOT_SPACING_UM, pseudo_visium_spots, write_truth_h5ad
from .cells import adipocyte_geometry, cell_pieces, make_cells
from .constants import (
    BG,
    CELL_TYPES,
    CELLS_PER_CHUNK,
    DEFAULT_N_GENES,
    DEFAULT_PIXEL_SIZE_UM,
    DENSE_LIMIT,
    LIBRARY_SIZE,
    MAX_GENES,
    MIN_GENES,
    NB_DISPERSION,
    PIXEL_SIZE_RANGE_UM,
    PROGRAMMES,
    REGION_COLOURS,
    REGION_NAMES,
    SIZES_MM,
    STAIN_E,
    STAIN_H,
    TYPE_PREFIX,
)
from .expression import make_genes, programme_fields, simulate_expression
from .render import Renderer, make_fibres, render_image
from .world import World

log = logging.getLogger("trihrge")


def _write_gz_tsv(path, df, float_format=None):
    data = df.to_csv(sep="\t", index=False, float_format=float_format).encode()
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(data)


def _check_options(size, seed, pixel_size, n_genes, extent_mm):
    """The field of view in mm; InputError for any option out of range."""
    if size not in SIZES_MM:
        raise InputError(f"--size {size!r}: unknown size; choose one of {', '.join(SIZES_MM)} "
                         f"(1.5, 3 or 6.5 mm square)")
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise InputError(f"--seed {seed}: the seed must be a non-negative integer")
    lo, hi = PIXEL_SIZE_RANGE_UM
    if not (np.isfinite(pixel_size) and lo <= pixel_size <= hi):
        raise InputError(f"--pixel-size {pixel_size}: must be between {lo} and {hi} um/px (0.25-0.5 is typical of a "
                         f"20x/40x scan)")
    if not MIN_GENES <= n_genes <= MAX_GENES:
        raise InputError(f"--n-genes {n_genes}: must be between {MIN_GENES} and {MAX_GENES}")
    extent_mm = float(extent_mm) if extent_mm is not None else SIZES_MM[size]
    if not (0.3 <= extent_mm <= 10.0):
        raise InputError(f"--extent-mm {extent_mm}: must be between 0.3 and 10 mm")
    return extent_mm


def _check_directory(directory):
    """DIR is new, empty or a previous simulation (whose files are replaced), so that no one's data set is
    overwritten, and no other raw-layout file would sit beside the simulated ones."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: exists and is not a directory; pass a folder for --directory")
    if not directory.is_dir():
        return
    if not L.TRUTH_SIMULATION.path(directory).is_file():   # only a killed simulation's lock and temporaries are ours
        others = user_entries(directory)
        if others:
            raise InputError(f"{directory}: holds {examples(others)} and no earlier simulation "
                             f"({L.TRUTH_SIMULATION.name}), so it may be someone's data set; pass an empty or new "
                             f"folder for --directory")
        return
    ours = {"he-raw.tif", "cnts.tsv", "locs-raw.tsv"}
    others = [n for n in (*IMAGE_NAMES, *COUNTS_NAMES, *LOCS_NAMES) if n not in ours and (directory / n).exists()]
    if others:
        raise InputError(f"{directory}: already holds {', '.join(others)} of another data set, which would sit "
                         f"beside the simulated files; pass an empty or new folder for --directory")


# peak memory (fitted to the peak RSS of seed 0 at 300-12000 genes: small, medium, large at 300; within
# -10%..+25%): per gene the dense truth (tissue super-pixels x genes, float32; the tissue covers 64-66% of the
# super-pixel grid) and one chunk's (cells x genes) float64 array; plus the cells, the world and the libraries
TISSUE_FRACTION_MAX = 0.7
MEMORY_BASE = 400 * 2 ** 20
MEMORY_PER_MM2 = 22 * 2 ** 20


def memory_needed(extent_mm, pixel_size, n_genes):
    """(bytes at the peak, bytes per gene) of a simulation."""
    side = int(round(extent_mm * 1000.0 / pixel_size))
    grid_rows, grid_cols = superpixel_grid_shape((side, side), pixel_size)
    per_gene = 4 * TISSUE_FRACTION_MAX * grid_rows * grid_cols + 8 * CELLS_PER_CHUNK
    return MEMORY_BASE + MEMORY_PER_MM2 * extent_mm ** 2 + n_genes * per_gene, per_gene


def _check_memory(size_label, extent_mm, pixel_size, n_genes):
    """Refuse up front a simulation that would not fit in memory (it would be killed after minutes)."""
    need, per_gene = memory_needed(extent_mm, pixel_size, n_genes)
    free = available_memory()
    if need <= free:
        return
    fit = int((free - (need - n_genes * per_gene)) // per_gene)
    fix = f"pass --n-genes {fit} or fewer" if fit >= MIN_GENES else "free memory"
    raise InputError(f"--n-genes {n_genes}: a {size_label} section with {n_genes} genes needs about "
                     f"{need / 2 ** 30:.1f} GiB of memory and only {free / 2 ** 30:.1f} GiB is available; {fix}, or "
                     f"simulate a smaller --size")


def _make_world(seed, extent):
    t = time.time()
    world = World(seed, extent)
    cells = make_cells(world, seed)
    membranes, adipo_points = adipocyte_geometry(world, cells, seed)
    fibres = make_fibres(world, seed)
    log.info("world: %d cells, %d ducts/acini, %d immune aggregates, %d fibres (%.1f s)", len(cells),
             len(world.ducts), world.n_aggregates, len(fibres[0]), time.time() - t)
    return world, cells, membranes, adipo_points, fibres


def _tissue(world, cells, adipo_points, grid_shape):
    """Region label per super-pixel, the cells' pieces on the grid, and the tissue mask (a region or a cell)."""
    R, C = grid_shape
    rr, cc = np.mgrid[0:R, 0:C]
    regions = world.labels((cc + 0.5) * SUPER_PIXEL_UM, (rr + 0.5) * SUPER_PIXEL_UM).astype(np.uint8)
    pieces = cell_pieces(cells, adipo_points, grid_shape)
    covered = np.zeros(R * C, bool)
    covered[pieces[1]] = True
    mask = ((regions.ravel() != BG) | covered).reshape(R, C)
    return regions, pieces, mask


def _expression(cells, pieces, mask, n_genes, seed, extent, progress):
    """(genes: names, groups, programme info; truth (tissue super-pixels x genes); per-cell and per-gene totals)."""
    t = time.time()
    tissue_index = np.full(mask.shape, -1, np.int64)
    tissue_index[mask] = np.arange(int(mask.sum()))
    names, groups, prof, loadings, prog_info = make_genes(n_genes, seed)
    prog_fields, prog_scales = programme_fields(seed, extent)
    for (name, _, _), s in zip(PROGRAMMES, prog_scales):
        prog_info[name]["field_scale_um"] = round(float(s), 2)
    truth, cell_totals, gene_totals = simulate_expression(cells, pieces, prof, loadings, prog_fields,
                                                          tissue_index, seed, progress)
    log.info("expression: %d tissue super-pixels, %.0f counts (%.1f s)", truth.shape[0], float(gene_totals.sum()),
             time.time() - t)
    return (names, groups, prog_info), truth, cell_totals, gene_totals


def simulate(directory, size="small", seed=0, pixel_size=DEFAULT_PIXEL_SIZE_UM, n_genes=DEFAULT_N_GENES,
             extent_mm=None, progress=True):
    """Simulate one section into `directory` (raw layout + truth/). Returns a summary dict. An extent_mm other
    than the size's is recorded as size "custom" (it is another tissue)."""
    t_start = time.time()
    extent_mm = _check_options(size, seed, pixel_size, n_genes, extent_mm)
    size = size if extent_mm == SIZES_MM[size] else "custom"
    _check_memory(size, extent_mm, pixel_size, n_genes)
    directory = Path(directory)
    _check_directory(directory)
    px = float(pixel_size)
    W = H = int(round(extent_mm * 1000.0 / px))
    extent = W * px
    grid_shape = superpixel_grid_shape((H, W), px)
    log.info("simulating a %s section (%.2f x %.2f mm, %d x %d px at %g um/px, seed %d, %d genes)",
             size, extent / 1000, extent / 1000, W, H, px, seed, n_genes)
    world, cells, membranes, adipo_points, fibres = _make_world(seed, extent)
    regions, pieces, mask = _tissue(world, cells, adipo_points, grid_shape)
    genes, truth, cell_totals, gene_totals = _expression(cells, pieces, mask, n_genes, seed, extent, progress)
    # spots (the lattice covers the square image exactly: make_spots over W * px = extent)
    rows_idx, cols_idx = np.nonzero(mask)
    radius_cal = (SPOT_DIAMETER_UM / 2) / TARGET_PIXEL_SIZE_UM
    spots = pseudo_visium_spots(truth, rows_idx, cols_idx, grid_shape, (H, W), px, seed,
                                radius_calibrated_px=radius_cal)
    if len(spots["ids"]) == 0:
        raise InputError(f"--extent-mm {extent_mm}: the field is too small to hold any spot; use a larger size")
    log.info("spots: %d pseudo-Visium spots over tissue, median %d counts", len(spots["ids"]),
             int(np.median(spots["counts"].sum(1))))

    t = time.time()
    renderer = Renderer(world, cells, fibres, membranes, px, (H, W), seed)
    with Stage("simulate", directory, manifest=False, create=True) as st:
        render_image(st.out.path(directory / "he-raw.tif"), renderer, progress)
        _write_raw(st.out, directory, px, spots, genes[0], n_genes)
        _write_truth(st.out, directory, truth, rows_idx, cols_idx, genes[0], genes[1], px, seed, size, (H, W),
                     regions, cells, cell_totals)
        sim = _record(seed, size, extent, px, (H, W), n_genes, world, cells, regions, mask, len(spots["ids"]),
                      radius_cal, genes, renderer, gene_totals)
        st.out.write_json(directory / "truth" / "simulation.json", sim)
    log.info("wrote %s (%.1f s writing, %.1f s in all)", directory, time.time() - t, time.time() - t_start)
    return {"directory": str(directory), "image_shape": (H, W, 3), "grid_shape": grid_shape,
            "n_cells": len(cells), "n_spots": len(spots["ids"]), "n_tissue_superpixels": int(mask.sum()),
            "tissue_fraction": sim["tissue_fraction"], "seconds": time.time() - t_start}


def _write_raw(out, directory, px, spots, names, n_genes):
    """The raw layout: pixel size, radius, cnts.tsv, locs-raw.tsv, section.json (the image is rendered apart)."""
    out.write_text(directory / "pixel-size-raw.txt", f"{px:g}\n")
    out.write_text(directory / "radius-raw.txt", f"{SPOT_DIAMETER_UM / 2 / px:.6f}\n")
    cnts = pd.DataFrame(spots["counts"], columns=names)
    cnts.insert(0, "spot", spots["ids"])
    cnts.to_csv(out.path(directory / "cnts.tsv"), sep="\t", index=False)
    locs = pd.DataFrame({"spot": spots["ids"], "x": spots["x"], "y": spots["y"]})
    locs.to_csv(out.path(directory / "locs-raw.tsv"), sep="\t", index=False, float_format="%.4f")
    section = {
        "source": "TriHRGE simulator",
        "technology": "pseudo-Visium: 55 um spots on a 100 um hexagonal lattice, summed from 8 um truth",
        "tissue": "simulated breast cancer section",
        "spots": len(spots["ids"]), "genes": int(n_genes),
        "array_x": spots["array_col"], "array_y": spots["array_row"]}
    out.write_text(directory / "section.json", json.dumps(section) + "\n")


def _record(seed, size, extent, px, image_hw, n_genes, world, cells, regions, mask, n_spots, radius_cal, genes,
            renderer, gene_totals):
    """truth/simulation.json: every parameter and count of the simulated section."""
    names, groups, prog_info = genes
    H, W = image_hw
    return {
        "source": "TriHRGE simulator", "seed": int(seed), "size": size, "extent_mm": round(extent / 1000, 6),
        "raw_pixel_size_um": px, "image_shape": [H, W, 3], "super_pixel_um": SUPER_PIXEL_UM,
        "grid_shape": list(mask.shape), "n_genes": int(n_genes), "n_cells": int(len(cells)),
        "n_spots": n_spots, "n_tissue_superpixels": int(mask.sum()),
        "tissue_fraction": round(float(mask[:int(extent // 8), :int(extent // 8)].mean()), 4),
        "spot": {"diameter_um": SPOT_DIAMETER_UM, "spacing_um": SPOT_SPACING_UM, "lattice": "hexagonal",
                 "radius_calibrated_px": radius_cal},
        "cell_types": CELL_TYPES,
        "cells_per_type": {CELL_TYPES[k]: int((cells.type == k).sum()) for k in range(len(CELL_TYPES))},
        "regions": {str(i): n for i, n in enumerate(REGION_NAMES)},
        "region_colours": {REGION_NAMES[i]: list(c) for i, c in enumerate(REGION_COLOURS)},
        "region_fractions_of_tissue": {REGION_NAMES[i]: round(float((regions[mask] == i).mean()), 4)
                                       for i in range(1, len(REGION_NAMES))},
        "structures": {"ducts": int(world.n_ducts), "lobules": int(world.n_lobules),
                       "ducts_and_acini": int(len(world.ducts)), "immune_aggregates": int(world.n_aggregates)},
        "gene_groups": {g: [n for n, gg in zip(names, groups) if gg == g] for g in dict.fromkeys(groups)},
        "marker_genes": {CELL_TYPES[t]: [n for n, gg in zip(names, groups) if gg == TYPE_PREFIX[t]]
                         for t in range(len(CELL_TYPES))},
        "programmes": prog_info,
        "expression": {"library_size_per_type": dict(zip(CELL_TYPES, LIBRARY_SIZE)),
                       "nb_dispersion": NB_DISPERSION,
                       "library_scales_with": "cell area / mean area of its type",
                       "truth_split": "multinomial over super-pixels by cell-area overlap"},
        "stains": {"hematoxylin_od": STAIN_H.tolist(), "eosin_od": STAIN_E.tolist(),
                   "blur_sigma_px": renderer.sigma},
        "total_counts": int(gene_totals.sum()),
        "gene_totals": {n: int(v) for n, v in zip(names, gene_totals)},
    }


def _write_truth(out, directory, truth, rows_idx, cols_idx, names, groups, px, seed, size, image_hw, regions, cells,
                 cell_totals):
    """truth/super.h5ad (with obs region, var group) and mask.png via utils.truth, then the simulator's own
    regions.png, regions-colour.png and cells.tsv.gz."""
    X = truth
    if truth.size > DENSE_LIMIT:     # block-wise, so the conversion never holds index arrays of the whole matrix
        X = sparse.vstack([sparse.csr_matrix(truth[i:i + 32768]) for i in range(0, truth.shape[0], 32768)],
                          format="csr")
    region = pd.Categorical.from_codes(regions[rows_idx, cols_idx].astype(np.int64), categories=REGION_NAMES)
    write_truth_h5ad(out, directory, X, rows_idx, cols_idx, names, px, image_hw,
                     uns={"seed": int(seed), "size": size, "source": "TriHRGE simulator"},
                     obs={"region": region}, var={"group": pd.Categorical(groups)})
    tdir = Path(directory) / "truth"
    write_png(out.path(tdir / "regions.png"), regions)
    write_png(out.path(tdir / "regions-colour.png"), np.array(REGION_COLOURS, np.uint8)[regions])
    cdf = pd.DataFrame({"cell": np.arange(len(cells)), "x": cells.x / px, "y": cells.y / px,
                        "type": np.array(CELL_TYPES)[cells.type],
                        "radius_um": np.sqrt(cells.ca * cells.cb), "total_counts": cell_totals})
    _write_gz_tsv(out.path(tdir / "cells.tsv.gz"), cdf, float_format="%.3f")
