"""The output directory and the raw layout written into it (counts, locations, radius, pixel size, section.json)."""
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ..core.chunks import row_chunks
from ..core.errors import InputError
from ..core.layout import SECTION
from ..core.raw_io import COUNTS_NAMES, IMAGE_NAMES, LOCS_NAMES
from .constants import TSV_LIMIT
from .he_image import place_image
from .tables import check_plain_names


def prepare_directory(directory, image_name, counts_name, writes_truth, source):
    """Check DIR (it may not exist yet: the converter's Stage(create=True) makes it); refuse when it already
    holds raw-layout files of another data set that ours would not replace. Those of an earlier conversion
    of the same `source` are fine: write_raw_layout removes them on commit."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: exists and is not a directory; pass a folder for --directory")
    if directory.is_dir():
        others = [] if _converted_from(directory, source) else _earlier_raw_files(directory, image_name, counts_name)
        if not writes_truth and (directory / "truth" / "super.h5ad").exists():   # nothing of ours replaces it
            others.append("truth/super.h5ad")
        if others:
            raise InputError(f"{directory}: already holds {', '.join(others)} of another data set, which would sit "
                             f"beside the converted files; remove them or pass an empty or new folder for --directory")
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing}: no write permission; make it writable or pass another --directory")
    return directory


def _earlier_raw_files(directory, image_name, counts_name) -> list:
    """Raw-layout image, count and location files in DIR under other names than this conversion writes."""
    ours = {image_name, counts_name, "locs-raw.tsv"}
    return [n for n in (*IMAGE_NAMES, *COUNTS_NAMES, *LOCS_NAMES) if n not in ours and (Path(directory) / n).exists()]


def _converted_from(directory, source) -> bool:
    """Whether DIR's section.json records a conversion of `source` (an unreadable one: no)."""
    try:
        section = json.loads((Path(directory) / SECTION).read_text())
        return section["conversion"]["source"] == str(Path(source).resolve())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def counts_name_for(fmt, n_spots, n_genes):
    if fmt == "auto":
        fmt = "tsv" if n_spots * n_genes <= TSV_LIMIT else "h5ad"
    return "cnts.tsv.gz" if fmt == "tsv" else "cnts.h5ad"


def write_counts_tsv_gz(path, ids, genes, X, rows_per_chunk=2000):
    """Dense TSV (spot, gene columns) gzipped with mtime 0 (byte-identical reruns), written in chunks."""
    X = sparse.csr_matrix(X)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(("spot\t" + "\t".join(genes) + "\n").encode())
        for rows in row_chunks(X.shape[0], len(genes), rows_per_chunk):
            block = pd.DataFrame(X[rows].toarray(), index=pd.Index(list(ids[rows])), columns=list(genes))
            gz.write(block.to_csv(sep="\t", header=False).encode())


def _write_counts_h5ad(path, ids, genes, X, gene_ids=None):
    import anndata
    var = pd.DataFrame(index=pd.Index(list(genes)))
    if gene_ids is not None:
        var["gene_ids"] = [str(g) for g in gene_ids]
    ad = anndata.AnnData(X=sparse.csr_matrix(X, dtype=np.int32), obs=pd.DataFrame(index=pd.Index(list(ids))), var=var)
    ad.write_h5ad(path)


def write_raw_layout(out, directory, *, source, image, image_name, image_mode, pixel_size, ids, genes, X, x, y,
                     radius_raw, section, counts_name, gene_ids=None):
    """Write the raw layout into DIR through StagedOutputs `out` (`source`: the converted input, for messages)."""
    directory = Path(directory)
    ids = [str(i) for i in ids]
    genes = [str(g) for g in genes]
    check_plain_names(genes, source, "gene name")
    check_plain_names(ids, source, "spot id")
    place_image(out, image, directory / image_name, image_mode)
    for name in _earlier_raw_files(directory, image_name, counts_name):   # prepare_directory found them ours
        if not (image_mode == "symlink" and os.path.samefile(directory / name, image)):   # the link's target
            out.discard(directory / name)
    out.write_text(directory / "pixel-size-raw.txt", f"{pixel_size:.8g}\n")
    out.write_text(directory / "radius-raw.txt", f"{radius_raw:.6f}\n")
    if counts_name.endswith(".h5ad"):
        _write_counts_h5ad(out.path(directory / counts_name), ids, genes, X, gene_ids)
    else:
        write_counts_tsv_gz(out.path(directory / counts_name), ids, genes, X)
    locs = pd.DataFrame({"spot": ids, "x": np.asarray(x, np.float64), "y": np.asarray(y, np.float64)})
    locs.to_csv(out.path(directory / "locs-raw.tsv"), sep="\t", index=False, float_format="%.4f")
    out.write_text(directory / "section.json", json.dumps(section) + "\n")
