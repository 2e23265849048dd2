"""Stage Histology_Extractor: multi-scale histology features per 8 um super-pixel.

Artifacts in DIR/features/ (the same layout whatever the backbone; the model reads only these):
  micro.npy   float16 (grid_rows, grid_cols, C_micro)  the super-pixel's own token / statistics
  meso.npy    float16 (grid_rows, grid_cols, C_meso)   summary of the 224 px (112 um) context
  macro.npy   float16 (grid_rows, grid_cols, C_macro)  summary of the ~896 px (448 um) context
  extra.npy   float16 (grid_rows, grid_cols, 5)        mean R, G, B in [0, 1]; row / grid_rows, col / grid_cols
  features.json  backbone, weights (never a token), dims, scales, tile size, normalisation, shifts,
                 grid shape, dtype, channel names (stain), wall time, tiles and super-pixels per second
The .npy files are plain NumPy arrays: np.load(path, mmap_mode="r") memory-maps them (load_features).

Under torchrun (utils.core.distributed) rank 0 holds the DIR lock, creates the staged arrays and
shares their paths; every rank fills its share of the rows (stain: bands of super-pixel rows dealt
out in turn; tile backbones: a contiguous block of tile rows each) in the same files, and rank 0
commits them with the manifest. The arrays equal a one-process run's, byte for byte.
"""
import logging
import time
from pathlib import Path

import numpy as np

from ..core import geometry as geo
from ..core import layout as L
from ..core.distributed import current
from ..core.errors import InputError
from ..core.stage import rank_stage
from ..histology.encoders import DTYPE, build_encoder

log = logging.getLogger("trihrge")

STAGE = "Histology_Extractor"
EXTRA_CHANNELS = ["mean_r", "mean_g", "mean_b", "row_frac", "col_frac"]
FORMAT_VERSION = 1


def extra_features(small_rgb):
    """(R, C, 5): mean RGB in [0, 1] (from he-small.png) and the normalised position (row/R, col/C)."""
    R, C = small_rgb.shape[:2]
    out = np.empty((R, C, 5), np.float32)
    out[..., :3] = small_rgb.astype(np.float32) / 255.0
    out[..., 3] = (np.arange(R, dtype=np.float32) / R)[:, None]
    out[..., 4] = (np.arange(C, dtype=np.float32) / C)[None, :]
    return out.astype(DTYPE)


def _progress(total, unit, quiet):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, disable=quiet, dynamic_ncols=True, mininterval=1.0,
                desc="Histology_Extractor", leave=False)


def _resolve_weights(backbone, weights, token, random_init):
    """Where the weights come from, settled before torch is imported (fail fast); None for stain."""
    from ..histology.backbones import parse_backbone, resolve_weights
    kind = "timm" if backbone.startswith("timm:") and backbone != "timm:" else parse_backbone(backbone)[0]
    if kind == "stain":
        if weights is not None or random_init:
            raise InputError("--backbone stain uses no weights; drop --weights, or choose --backbone uni / uni2-h / "
                             "timm:NAME")
        return None
    return resolve_weights(kind, weights, token, random_init)


def extract_features(directory, *, backbone=None, weights=None, token=None, shifts=None, batch_size=None,
                     device="auto", precision="auto", band_rows=32, timm_kwargs=None, random_init=False,
                     force=False, quiet=False, seed=0):
    """Run stage 3 on a calibrated directory; returns the features.json dict.

    backbone None -> 'uni' when weights or a token (argument) is given, else 'stain'. The token is
    only handed to the hub client; it is never stored or logged."""
    from ..core.cli import POSITIVE_INT
    d = Path(directory)
    t_start = time.perf_counter()
    if backbone is None:
        backbone = "uni" if (weights is not None or token) else "stain"
    for option, v in (("--shifts", shifts), ("--batch-size", batch_size), ("--band-rows", band_rows)):
        if v is not None:
            POSITIVE_INT.check(option, v)
    wsrc = _resolve_weights(backbone, weights, token, random_init)
    leader = current().leader
    with rank_stage(STAGE, d, force=force) as st:
        cal = L.load_calibration(d)
        img = L.open_calibrated_image(d, cal)
        small = L.read_preview(d, cal)
        enc = build_encoder(backbone, weights_source=wsrc, device=device, precision=precision, shifts=shifts,
                            batch_size=batch_size, band_rows=band_rows, timm_kwargs=timm_kwargs, seed=seed)
        inputs = [L.CALIBRATED_IMAGE.path(d), L.PREVIEW.path(d), L.CALIBRATION.path(d)]
        if wsrc is not None and wsrc.path is not None and wsrc.kind == "file":
            inputs.append(wsrc.path)
        if leader:
            st.record(inputs=inputs, parameters={
                "backbone": backbone, "weights": wsrc.description if wsrc else "none", "token_given": _yes(token),
                "shifts": enc.shifts, "device": enc.device, "precision": enc.precision,
                "timm_kwargs": timm_kwargs or {}})
        meta = _extract(st, d, enc, img, small, L.grid_of(cal), backbone, quiet or not leader)
        if not leader:  # a rank > 0 under torchrun: its rows are written
            return meta
        meta["token_given"] = _yes(token)
        meta["wall_time_s"] = round(time.perf_counter() - t_start, 3)
        st.out.write_json(L.FEATURES_META.path(d), meta)
    log.info("wrote %s/{micro,meso,macro,extra}.npy (%d x %d super-pixels; dims %d/%d/%d) in %.1f s "
             "(%.0f super-pixels/s, %.2f tiles/s)", L.FEATURES_DIR, *meta["grid_shape"], meta["dims"]["micro"],
             meta["dims"]["meso"], meta["dims"]["macro"], meta["wall_time_s"], meta["superpixels_per_second"],
             meta["tiles_per_second"])
    return meta


def _yes(token):
    return "yes" if token else "no"


def _extract(st, d, enc, img, small, grid, backbone, quiet):
    """Fill the staged feature memmaps with the encoder (under torchrun: this rank's rows); the
    features.json dict (without the stage's wall time; its tile count is every rank's)."""
    world = current()
    enc.prepare(img, small)
    dims = {**enc.dims, "extra": len(EXTRA_CHANNELS)}
    t_loop = time.perf_counter()
    arrays = _feature_arrays(st, d, dims, grid, small)
    bar = _progress(enc.progress_total(grid), "row" if enc.kind == "stain" else "tile", quiet)
    try:
        tiles = enc.extract(img, arrays, progress=bar, world=world)
    finally:
        bar.close()
    for a in arrays.values():
        a.flush()
    del arrays
    tiles = sum(world.gather(tiles))  # also: every rank's rows are in the files
    loop = time.perf_counter() - t_loop
    return _meta(backbone, enc, dims, grid, tiles, loop)


def _feature_arrays(st, d, dims, grid, small):
    """{scale: writable (R, C, D) memmap} of the staged feature files: rank 0 (the only one with a
    Stage) creates them and writes extra.npy; under torchrun the other ranks open the same files."""
    world = current()
    paths = None
    if world.leader:
        st.require_space(grid[0] * grid[1] * sum(dims.values()) * np.dtype(DTYPE).itemsize, "the feature maps")
        arrays = {s: st.out.memmap(L.FEATURE_MAPS[s].path(d), DTYPE, (*grid, dims[s])) for s in dims}
        arrays["extra"][:] = extra_features(small)
        arrays["extra"].flush()
        paths = {s: a.filename for s, a in arrays.items()}
    paths = world.share(paths)
    if world.leader:
        return arrays
    return {s: np.load(p, mmap_mode="r+") for s, p in paths.items()}


def _meta(backbone, enc, dims, grid, tiles, loop):
    um = geo.TARGET_PIXEL_SIZE_UM
    ctx = {"micro": geo.SUPER_PIXEL_PX, **enc.context_px()}
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        **enc.describe(),
        "dims": dims,
        "files": {s: a.name.split("/")[-1] for s, a in L.FEATURE_MAPS.items()},
        "scales": {s: {"context_px": px, "context_um": px * um} for s, px in ctx.items()},
        "extra_channels": list(EXTRA_CHANNELS),
        "grid_shape": list(grid),
        "superpixel_px": geo.SUPER_PIXEL_PX,
        "pixel_size_um": um,
        "dtype": "float16",
        "extraction_time_s": round(loop, 3),
        "tiles": int(round(tiles)),
        "tiles_per_second": round(tiles / max(loop, 1e-9), 3),
        "superpixels_per_second": round(grid[0] * grid[1] / max(loop, 1e-9), 1),
    }


def load_features(directory, scales=L.FEATURE_SCALES + ("extra",)):
    """(arrays, meta): {scale: memory-mapped float16 (R, C, D)} and the features.json dict, checked
    against he.tif's super-pixel grid."""
    return L.load_features(directory, L.load_calibration(directory), scales)
