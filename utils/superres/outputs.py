"""Writing the super-resolution results: super-res.h5ad streamed from a memory-mapped array (so the
slide-sized matrix never has to sit in memory twice), spot-level predictions, and gene maps."""
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import anndata
import h5py
import numpy as np
import pandas as pd

from ..core import geometry as geo
from ..core.layout import GENE_MAP_INDEX
from ..scverse.keys import Key
from ..scverse.spatial import spatial_obsm, spatial_uns


def write_h5ad_streamed(path, obs, var, X, uns=None, obsm=None, chunk_rows=4096, threads=None, compress=False):
    """An .h5ad whose dense float32 X is copied in row chunks of `chunk_rows` from X (array or memmap),
    so the slide-sized matrix is never in memory twice. Uncompressed by default, as anndata writes
    it: gzip saved only a quarter of her2st C2's 468 MB, cost 6.7 CPU seconds (5 s of a run on 2
    cores) and made reading one gene's column 16 x slower (0.8 against 0.05 s). compress: HDF5's
    shuffle + gzip level 1, each chunk byte-shuffled and deflated by `threads` threads (default: the
    CPUs available). Either way the chunks are written as stored (write_direct_chunk): HDF5's chunk
    cache would meet a full disk only when the dataset closes, and then crash the interpreter at exit."""
    from ..core.device import available_cpus
    _write_without_x(path, obs, var, uns, obsm)
    n, g = X.shape
    rows = max(1, min(n, chunk_rows))
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        # byte shuffle before gzip: her2st C2's 117k x 1000 maps 403 -> 362 MB and 15% faster to write
        gzip = {"compression": "gzip", "compression_opts": 1, "shuffle": bool(n)} if compress else {}
        d = f.create_dataset("X", shape=(n, g), dtype="f4", chunks=(rows, g) if n else None, **gzip)
        d.attrs["encoding-type"] = "array"
        d.attrs["encoding-version"] = "0.2.0"
        workers = (threads or available_cpus()) if compress else 1
        with ThreadPoolExecutor(workers) as pool:
            pending = deque()
            for s in range(0, n, rows):
                pending.append((s, pool.submit(_stored_chunk, X, s, rows, compress)))
                if len(pending) > 2 * workers:                   # bounded: a few chunks in memory
                    at, done = pending.popleft()
                    d.id.write_direct_chunk((at, 0), done.result())
            for at, done in pending:
                d.id.write_direct_chunk((at, 0), done.result())


def h5ad_x_memmap(path, shape) -> np.memmap:
    """A new .h5ad at path holding only X: a contiguous (n, genes) float32 dataset encoded as anndata
    writes a dense X, its disk blocks reserved (core.atomic.reserve), returned as a writable memory
    map. The map is computed in place, then complete_h5ad adds the rest: super-res.h5ad's X is never
    copied (her2st C2: 468 MB, 1.4-2.9 s of the run)."""
    from ..core.atomic import reserve
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)   # an address now, so it can be mapped
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)     # no zeros written: every value is computed
        dcpl.set_obj_track_times(False)                  # no creation time: reruns give the same bytes
        dsid = h5py.h5d.create(f.id, b"X", h5py.h5t.IEEE_F32LE, h5py.h5s.create_simple(tuple(shape)), dcpl=dcpl)
        offset = dsid.get_offset()
        X = h5py.Dataset(dsid)
        X.attrs["encoding-type"] = "array"
        X.attrs["encoding-version"] = "0.2.0"
    reserve(path)
    if offset is None:   # no values (zero rows or genes): nothing to map
        return np.zeros(shape, np.float32)
    return np.memmap(path, np.float32, "r+", offset=offset, shape=tuple(shape))


def complete_h5ad(path, obs, var, uns=None, obsm=None):
    """Adds obs, var, uns and obsm to the .h5ad of h5ad_x_memmap, as anndata writes them (an X-less
    AnnData written next to it, then copied in, root attributes included)."""
    from ..core.atomic import remove, tmp_path_for
    skeleton = tmp_path_for(path, "skeleton-")
    try:
        _write_without_x(skeleton, obs, var, uns, obsm)
        with h5py.File(skeleton, "r") as src, h5py.File(path, "a") as dst:
            for name in src:
                if name != "X":
                    src.copy(src[name], dst, name)
            dst.attrs.update(src.attrs)
    finally:
        remove(skeleton)


def _write_without_x(path, obs, var, uns, obsm):
    """An .h5ad of everything but X, as anndata writes it (X is added by the callers)."""
    anndata.AnnData(obs=obs, var=var, uns=uns or {}, obsm=obsm).write_h5ad(path, compression="gzip")


def _stored_chunk(X, start, rows, compress):
    """Rows start.. of X as one stored HDF5 chunk: zero-padded to `rows`; with compress HDF5's byte
    shuffle (the i-th bytes of all values together), then zlib level 1 (HDF5's deflate filter)."""
    block = np.ascontiguousarray(X[start:start + rows], dtype=np.float32)
    if len(block) < rows:                                 # the last chunk
        block = np.concatenate([block, np.zeros((rows - len(block), block.shape[1]), np.float32)])
    if not compress:
        return block.tobytes()
    return zlib.compress(np.ascontiguousarray(block.view(np.uint8).reshape(-1, 4).T), 1)


def superpixel_obs(rows, cols, scale):
    """obs of the super-resolution output: grid row/col and the centre in raw image pixels."""
    from ..core.geometry import superpixel_centres
    cx, cy = superpixel_centres(rows, cols)
    return pd.DataFrame({"row": rows.astype(np.int32), "col": cols.astype(np.int32),
                         "x": cx / scale, "y": cy / scale},
                        index=pd.Index([f"{r}_{c}" for r, c in zip(rows, cols)], name="superpixel"))


def superpixel_spatial(library: str, calibration: dict, images: dict, obs) -> tuple:
    """(obsm, uns) of super-res.h5ad in scanpy's Visium layout under uns['spatial'][library]; the
    'spot' is one 8 um super-pixel."""
    side = geo.SUPER_PIXEL_PX / float(calibration["scale"])        # super-pixel side in he-raw px
    uns = spatial_uns(library, images, side, "TriHRGE super-pixels (8 um squares)")
    return spatial_obsm(obs), {Key.SPATIAL: uns}


def spot_spatial(library: str, calibration: dict, images: dict, obs) -> tuple:
    """(obsm, uns) of spots-pred.h5ad: spot centres (obs x_raw, y_raw) and the spot diameter."""
    diameter = 2 * float(calibration["radius_raw_px"])
    uns = spatial_uns(library, images, diameter, "measured spots")
    return spatial_obsm(obs, "x_raw", "y_raw"), {Key.SPATIAL: uns}


def write_gene_maps(out_dir, he_small, rows, cols, X, genes, gene_names):
    """One PNG per gene: the H&E (super-pixel preview) next to the predicted map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pos = {g: i for i, g in enumerate(gene_names)}
    files = map_file_names(genes)
    written = []
    for g in genes:
        m = np.full((r1 - r0, c1 - c0), np.nan, dtype=np.float32)
        m[rows - r0, cols - c0] = np.asarray(X[:, pos[g]])
        fig, ax = plt.subplots(1, 2, figsize=(10, 5 * (r1 - r0) / max(1, c1 - c0) + 0.6), dpi=110)
        ax[0].imshow(he_small[r0:r1, c0:c1])
        ax[0].set_title("H&E")
        im = ax[1].imshow(m, cmap="magma", vmin=0, vmax=np.nanpercentile(m, 99.5) or None)
        ax[1].set_title(f"{g} (counts per 8 um super-pixel)")
        fig.colorbar(im, ax=ax[1], fraction=0.046, pad=0.02)
        for a in ax:
            a.set_axis_off()
        fig.tight_layout()
        p = out_dir / files[g]
        fig.savefig(p)
        plt.close(fig)
        written.append(p)
    index = pd.DataFrame({"gene": list(genes), "file": [files[g] for g in genes]})
    index.to_csv(out_dir / GENE_MAP_INDEX, sep="\t", index=False)
    return written


MAP_NAME_BYTES = 120


def map_file_names(genes) -> dict:
    """A distinct, portable PNG name per gene. A name that is unsafe for file systems (HLA/A, HLA?A) or
    that would collide with another, also ignoring case (macOS, Windows), gets a short hash of the
    gene name appended, so that HLA/A, HLA_A and HLA?A never overwrite each other. A name is cut to
    MAP_NAME_BYTES (file names end at 255 bytes; 90 CJK characters are 270) and then hashed too."""
    import hashlib
    safe = {g: "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(g)).strip(".") or "gene"
            for g in genes}
    safe = {g: v.encode()[:MAP_NAME_BYTES].decode(errors="ignore") for g, v in safe.items()}
    folded = pd.Series([v.lower() for v in safe.values()])
    clash = set(folded[folded.duplicated(keep=False)])
    out = {}
    for g, v in safe.items():
        if v != g or v.lower() in clash:
            v = f"{v}-{hashlib.sha1(str(g).encode()).hexdigest()[:8]}"
        out[g] = f"{v}.png"
    return out


def write_loss_plot(path, histories):
    """Training (solid) and held-out spot (dashed) footprint loss per state."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, (h, v) in enumerate(histories):
        dot = "." if len(h) == 1 else None   # one epoch is a point, which a line alone does not draw
        line, = ax.plot(np.arange(1, len(h) + 1), h, marker=dot, label=f"state {i} training")
        if len(v):
            ax.plot(np.arange(1, len(v) + 1), v, "--", marker=dot, color=line.get_color(),
                    label=f"state {i} held-out spots")
            best = int(np.argmin(v))
            ax.plot([best + 1], [v[best]], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("epoch")
    ax.set_ylabel("footprint loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
