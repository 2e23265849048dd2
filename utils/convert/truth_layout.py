"""8 um truth and pseudo-Visium spots from super-pixel aggregated bins or cells."""
import numpy as np
from scipy import sparse

from ..core.errors import InputError
from ..core.geometry import SUPER_PIXEL_UM
from ..core.stage import Stage
from ..evaluation.truth import pseudo_visium_spots, write_truth_h5ad
from .raw_layout import write_raw_layout


def superpixel_of(x_raw, y_raw, pixel_size):
    """(row, col) of the super-pixel holding raw-pixel point (x, y): [8 row, 8 row + 8) um from the top-left."""
    f = pixel_size / SUPER_PIXEL_UM
    return (np.floor(np.asarray(y_raw, np.float64) * f).astype(np.int64),
            np.floor(np.asarray(x_raw, np.float64) * f).astype(np.int64))


def aggregate_to_superpixels(keys, X, grid_shape):
    """Sum rows of X (n x G) into super-pixels given linear keys (row * cols + col); keys < 0 are dropped.

    Returns (rows, cols, truth CSR) in row-major super-pixel order (the order of np.nonzero(mask))."""
    keys = np.asarray(keys, dtype=np.int64)
    ok = keys >= 0
    uk, inv = np.unique(keys[ok], return_inverse=True)
    S = sparse.csr_matrix((np.ones(int(ok.sum()), np.int64), (inv, np.flatnonzero(ok))), shape=(len(uk), X.shape[0]))
    T = (S @ sparse.csr_matrix(X)).tocsr()
    T.sum_duplicates()
    return uk // grid_shape[1], uk % grid_shape[1], T


def make_pseudo_spots(truth, rows, cols, grid_shape, image_hw, pixel_size, seed):
    """Pseudo-Visium spots (55 um, 100 um hexagonal lattice) summed from the 8 um truth, as utils/simulate.py does
    (utils.truth.pseudo_visium_spots, footprint radius as the pipeline derives it from radius-raw.txt); at least 3.

    Returns dict(ids, x, y (raw px, rounded as written), counts CSR, array_col, array_row, radius_raw)."""
    spots = pseudo_visium_spots(truth, rows, cols, grid_shape, image_hw, pixel_size, seed)
    if len(spots["ids"]) < 3:
        raise InputError(f"only {len(spots['ids'])} pseudo-Visium spot(s) of 55 um fit on the measured tissue inside "
                         f"the image; at least 3 are needed (is the image the one that covers the measured region?)")
    return spots


def write_truth(out, directory, truth, rows, cols, genes, pixel_size, image_hw, source, uns=None, gene_ids=None):
    """truth/super.h5ad (one observation per super-pixel: obs row, col, x, y = centre in raw px; X counts as int32
    CSR; var gene_ids when given; uns source, then `uns`) and truth/mask.png (255 = super-pixels holding truth),
    in the layout utils/simulate.py writes (utils.truth.write_truth_h5ad)."""
    var = {"gene_ids": [str(g) for g in gene_ids]} if gene_ids is not None else None
    return write_truth_h5ad(out, directory, sparse.csr_matrix(truth, dtype=np.int32), rows, cols, genes, pixel_size,
                            image_hw, uns={"source": source, **(uns or {})}, var=var)


def write_with_truth(args, directory, *, image, image_name, counts_name, pixel_size, spots, matrix, section, truth,
                     rows, cols, image_hw, source, uns, also=None):
    """The raw layout of the pseudo-Visium spots and truth/ (the 8 um truth they were summed from)
    in one commit of DIR; also(out): more files of the same commit (Xenium's cells)."""
    with Stage("convert", directory, manifest=False, create=True) as st:
        write_raw_layout(st.out, directory, source=args.source, image=image, image_name=image_name,
                         image_mode=args.image_mode, pixel_size=pixel_size, ids=spots["ids"], genes=matrix.genes,
                         X=spots["counts"], x=spots["x"], y=spots["y"], radius_raw=spots["radius_raw"],
                         section=section, counts_name=counts_name, gene_ids=matrix.gene_ids)
        write_truth(st.out, directory, truth, rows, cols, matrix.genes, pixel_size, image_hw, source,
                    gene_ids=matrix.gene_ids, uns=uns)
        if also is not None:
            also(st.out)


def section_record(source, technology, tissue, ids, genes, array_x, array_y, conversion):
    return {"source": source, "technology": technology, "tissue": tissue, "spots": int(len(ids)),
            "genes": int(len(genes)), "array_x": [int(v) for v in array_x], "array_y": [int(v) for v in array_y],
            "conversion": conversion}
