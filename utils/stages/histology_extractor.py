"""Stage Histology_Extractor: multi-scale histology features per 8 um super-pixel.

Artifacts in DIR/features/ (the same layout whatever the backbone; the model reads only these):
  micro.npy   float16 (grid_rows, grid_cols, C_micro)  the super-pixel's own token / statistics
  meso.npy    float16 (grid_rows, grid_cols, C_meso)   summary of the 224 px (112 um) context
  macro.npy   float16 (grid_rows, grid_cols, C_macro)  summary of the ~896 px (448 um) context
  extra.npy   float16 (grid_rows, grid_cols, 5)        mean R, G, B in [0, 1]; row / grid_rows, col / grid_cols
  features.json  backbone, weights (never a token), dims, scales, tile size, normalisation, shifts,
                 grid shape, dtype, channel names (stain), wall time, tiles and super-pixels per second
The .npy files are plain NumPy arrays: np.load(path, mmap_mode="r") memory-maps them (load_features).
"""
import json
import logging
import time
from pathlib import Path

import numpy as np

from ..core import geometry as geo
from ..core.atomic import StagedOutputs, remove_stale_temporaries
from ..core.errors import InputError

log = logging.getLogger("trihrge")

STAGE = "Histology_Extractor"
FEATURES_DIR = "features"
SCALES = ("micro", "meso", "macro")
FILES = {"micro": "micro.npy", "meso": "meso.npy", "macro": "macro.npy", "extra": "extra.npy"}
META = "features.json"
EXTRA_CHANNELS = ["mean_r", "mean_g", "mean_b", "row_frac", "col_frac"]
DTYPE = np.float16
FORMAT_VERSION = 1


def default_shifts(kind, device):
    """Passes of shifted tiling when --shifts is not given: none for stain (it has no tiles); on a GPU 4
    (the 2 x 2 half-tile offsets: every super-pixel gets a token from near a tile centre; 5 tile
    forwards per 14 x 14 block with the macro windows, about a minute for UNI on a 6.5 mm slide);
    on the CPU 1 (ViT-L runs ~1-2 tiles/s there; meso/macro are interpolated anyway)."""
    if kind == "stain":
        return 1
    return 4 if device == "cuda" else 1


def default_batch_size(device):
    return 64 if device == "cuda" else 16


def extra_features(small_rgb):
    """(R, C, 5): mean RGB in [0, 1] (from he-small.png) and the normalised position (row/R, col/C)."""
    R, C = small_rgb.shape[:2]
    out = np.empty((R, C, 5), np.float32)
    out[..., :3] = small_rgb.astype(np.float32) / 255.0
    out[..., 3] = (np.arange(R, dtype=np.float32) / R)[:, None]
    out[..., 4] = (np.arange(C, dtype=np.float32) / C)[None, :]
    return out.astype(DTYPE)


def check_disk_space(directory, grid_shape, dims):
    """The .npy outputs are memory-mapped; running out of disk while writing them would kill the process
    with SIGBUS and no message, so check first (new files are written beside the old ones)."""
    import shutil
    R, C = grid_shape
    need = R * C * (sum(dims.values()) + 5) * np.dtype(DTYPE).itemsize
    free = shutil.disk_usage(directory).free
    if need > 0.98 * free:
        raise InputError(f"{directory}: the features need {need / 2**30:.1f} GiB of disk and only {free / 2**30:.1f} GiB "
                         f"is free; free some space (old features are replaced only after the new ones are complete)")
    return need


def release_rows(arr, r0, r1):
    """Tell the kernel this process is done with rows [r0, r1) of a memory-mapped array (input image or
    output): the pages leave our resident set (shared file mappings keep their data in the page cache
    and on disk), so resident memory stays at a few bands whatever the slide size. Best effort."""
    import mmap
    mm = getattr(arr, "_mmap", None)
    if mm is None or r1 <= r0 or not hasattr(mm, "madvise"):
        return
    try:
        row = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
        base = arr.offset % mmap.ALLOCATIONGRANULARITY    # where the array starts inside the mapping
        a = base + int(r0) * row
        b = min(len(mm), base + int(r1) * row)
        a -= a % mmap.PAGESIZE
        if b > a:
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)
    except (ValueError, OSError, AttributeError):
        pass


def _progress(total, unit, quiet):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, disable=quiet, dynamic_ncols=True, mininterval=1.0,
                desc="Histology_Extractor", leave=False)


def _inputs(directory):
    from .image_calibration import CALIBRATION, PREVIEW, load_calibration
    from ..core.image_io import CALIBRATED_IMAGE, open_calibrated, read_png
    d = Path(directory)
    cal = load_calibration(d)
    img = open_calibrated(d)
    R, C = (int(x) for x in cal["superpixel_grid"])
    if tuple(img.shape[:2]) != (R * geo.SUPER_PIXEL_PX, C * geo.SUPER_PIXEL_PX) or img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"{d / CALIBRATED_IMAGE}: shape {img.shape} does not match the super-pixel grid {R} x {C} of "
                         f"{CALIBRATION}; rerun `python image_calibration.py --directory {d}`")
    small = read_png(d / PREVIEW)
    if small.shape[:2] != (R, C):
        raise InputError(f"{d / PREVIEW}: {small.shape[1]} x {small.shape[0]} px, expected {C} x {R} (one pixel per "
                         f"super-pixel); rerun `python image_calibration.py --directory {d}`")
    return cal, img, small, [d / CALIBRATED_IMAGE, d / PREVIEW, d / CALIBRATION]


def extract_features(directory, backbone=None, weights=None, token=None, shifts=None, batch_size=None,
                     device="auto", precision="auto", band_rows=32, timm_kwargs=None, random_init=False,
                     force=False, quiet=False, seed=0):
    """Run the stage on a calibrated directory; returns the features.json dict.

    backbone None -> 'uni' when weights or a token (argument) is given, else 'stain'."""
    from ..histology.backbones import parse_backbone, resolve_weights
    from ..core.manifest import changed_since_last_run, check_upstream, write_manifest
    d = Path(directory)
    t_start = time.perf_counter()
    if backbone is None:
        backbone = "uni" if (weights is not None or token) else "stain"
    if shifts is not None and int(shifts) < 1:
        raise InputError(f"--shifts {shifts}: must be 1 (no shifted passes) or more")
    if batch_size is not None and int(batch_size) < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if band_rows < 1:
        raise InputError(f"--band-rows {band_rows}: must be at least 1")
    kind, arch = parse_backbone(backbone) if not backbone.startswith("timm:") else ("timm", backbone[5:])
    if kind == "stain" and (weights is not None or random_init):
        raise InputError("--backbone stain uses no weights; drop --weights, or choose --backbone uni / uni2-h / timm:NAME")
    # fail fast: where the weights come from is settled before torch is even imported
    wsrc = None if kind == "stain" else resolve_weights(kind, weights, token, random_init)
    if kind == "timm":
        parse_backbone(backbone)  # checks the timm name (imports timm)
    remove_stale_temporaries(d)
    check_upstream(d, STAGE, force=force, log=log)
    cal, img, small, inputs = _inputs(d)
    R, C = (int(x) for x in cal["superpixel_grid"])
    if wsrc is not None and wsrc.path is not None and wsrc.kind == "file":
        inputs.append(wsrc.path)

    if kind == "stain":
        dev, prec = "cpu", "fp32"
    else:
        from ..histology.backbones import pick_device, pick_precision
        dev = pick_device(device)
        prec = pick_precision(precision, dev)
    n_shifts = int(shifts) if shifts is not None else default_shifts(kind, dev)
    if kind == "stain" and n_shifts != 1:
        log.info("--shifts %d: the stain backbone has no tiles (seamless banded filters), so there is nothing to shift", n_shifts)
        n_shifts = 1
    bs = int(batch_size) if batch_size is not None else default_batch_size(dev)

    token_given = "yes" if token else "no"   # the token itself is never stored or logged
    params = {"backbone": backbone, "weights": wsrc.description if wsrc else "none", "token_given": token_given,
              "shifts": n_shifts, "device": dev, "precision": prec, "timm_kwargs": timm_kwargs or {}}
    reasons = changed_since_last_run(d, STAGE, inputs, params)
    if reasons:
        log.info("recomputing: %s", "; ".join(reasons))

    if kind == "stain":
        from ..histology import stain_features as fs
        px = fs.sample_tissue_pixels(img, small, release=release_rows)
        stains = fs.estimate_stains(px)
        if stains.get("reason"):
            log.info("stain vectors: Ruifrok-Johnston defaults (%s)", stains["reason"])
        else:
            log.info("stain vectors estimated from the slide (Macenko), H %s, E %s",
                     np.round(stains["h"], 3).tolist(), np.round(stains["e"], 3).tolist())
        thresholds = fs.choose_thresholds(px, stains)
        extractor = fs.StainExtractor(stains, thresholds)
        dims = {"micro": extractor.dim, "meso": len(fs.context_channels()), "macro": len(fs.context_channels())}
    else:
        from ..histology.backbones import build_tile_model
        tm = build_tile_model(backbone, wsrc, device=dev, precision=prec, timm_kwargs=timm_kwargs, seed=seed)
        dims = {"micro": tm.dim, "meso": tm.summary_dim, "macro": tm.summary_dim}
        log.info("%s on %s (%s): tiles of %d px -> %d px input, %d x %d tokens per tile, %d-d tokens, %d-d summary",
                 tm.arch, dev, prec, tm.tile_px, tm.input_px, tm.grid, tm.grid, tm.dim, tm.summary_dim)

    fdir = d / FEATURES_DIR
    check_disk_space(d, (R, C), dims)
    t_loop = time.perf_counter()
    with StagedOutputs() as out:
        from numpy.lib.format import open_memmap
        arrays = {s: open_memmap(out.path(fdir / FILES[s]), mode="w+", dtype=DTYPE, shape=(R, C, dims[s]))
                  for s in SCALES}
        extra = open_memmap(out.path(fdir / FILES["extra"]), mode="w+", dtype=DTYPE, shape=(R, C, 5))
        extra[:] = extra_features(small)
        if kind == "stain":
            stats = _run_stain(img, (R, C), extractor, arrays, band_rows, quiet)
            meta_backbone = {
                "architecture": f"stain v{fs.VERSION} (weights-free colour deconvolution + texture statistics)",
                "weights": "none", "token_given": token_given,
                "tile_px": geo.TILE_PX, "input_px": None, "superpixels_per_tile": geo.TILE_PX // geo.SUPER_PIXEL_PX,
                "normalisation": (f"optical density -ln(I/255) split into hematoxylin/eosin by colour deconvolution "
                                  f"({stains['method']} stain vectors"
                                  + (f", concentrations scaled to Macenko's reference maxima" if stains['method'] == 'macenko' else "")
                                  + "); analysis at 1 um/px; no learned model"),
                "stain_vectors": stains, "thresholds": thresholds,
                "channels": {"micro": list(fs.MICRO_CHANNELS), "meso": fs.context_channels(),
                             "macro": fs.context_channels()},
                "context_sigma_superpixels": dict(fs.CONTEXT_SIGMA_SP),
                "band_rows": band_rows,
                "shifts": {"passes": 1, "offsets_px": [[0, 0]],
                           "note": "no tiles: filters run over bands with a halo, seamless by construction"},
            }
            tiles_equiv = (R * C) / (geo.TILE_PX // geo.SUPER_PIXEL_PX) ** 2
        else:
            from ..histology.tile_features import MACRO_FACTOR, extract_tiles
            bar = _progress(None, "tile", quiet)
            try:
                stats = extract_tiles(img, (R, C), tm, arrays["micro"], arrays["meso"], arrays["macro"],
                                      shifts=n_shifts, batch_size=bs, progress=bar, release=release_rows)
            finally:
                bar.close()
            offs = [[dy * geo.SUPER_PIXEL_PX, dx * geo.SUPER_PIXEL_PX] for dy, dx in stats["shift_offsets_superpixels"]]
            meta_backbone = {
                "architecture": tm.arch, "weights": wsrc.description,
                "token_given": token_given,
                "tile_px": tm.tile_px, "input_px": tm.input_px, "superpixels_per_tile": tm.grid,
                "num_prefix_tokens": tm.num_prefix_tokens, "token_source": "patch tokens" if tm.is_vit else
                "final feature map resampled bilinearly to one cell per super-pixel",
                "normalisation": f"RGB/255, mean {list(tm.mean)}, std {list(tm.std)} (ImageNet)",
                "channels": None, "device": dev, "precision": prec, "batch_size": bs,
                "shifts": {"passes": len(offs), "offsets_px": offs,
                           "note": "offsets [dy, dx] of each pass's tile grid; micro: mean of a super-pixel's tokens "
                                   "over the passes, weighted by a tent that favours tile centres over tile borders; "
                                   "meso: tile summaries interpolated bilinearly between tile centres and averaged "
                                   "over the passes; macro: window summaries interpolated bilinearly"},
                "macro_context_px": MACRO_FACTOR * tm.tile_px,
                "model_seconds": round(stats["model_seconds"], 3),
            }
            tiles_equiv = stats["n_tiles"]
        for a in list(arrays.values()) + [extra]:
            a.flush()
        del arrays, extra
        loop = time.perf_counter() - t_loop
        wall = time.perf_counter() - t_start
        if kind == "stain":
            macro_px = int(round(4 * fs.CONTEXT_SIGMA_SP["macro"] * geo.SUPER_PIXEL_PX))
            meso_px = geo.TILE_PX
        else:
            macro_px, meso_px = meta_backbone["macro_context_px"], tm.tile_px
        um = geo.TARGET_PIXEL_SIZE_UM
        meta = {
            "format_version": FORMAT_VERSION,
            "backbone": backbone,
            **meta_backbone,
            "dims": {**dims, "extra": 5},
            "files": dict(FILES),
            "scales": {
                "micro": {"context_px": geo.SUPER_PIXEL_PX, "context_um": geo.SUPER_PIXEL_PX * um},
                "meso": {"context_px": meso_px, "context_um": meso_px * um},
                "macro": {"context_px": macro_px, "context_um": macro_px * um},
            },
            "extra_channels": list(EXTRA_CHANNELS),
            "grid_shape": [R, C],
            "superpixel_px": geo.SUPER_PIXEL_PX,
            "pixel_size_um": um,
            "dtype": "float16",
            "wall_time_s": round(wall, 3),
            "extraction_time_s": round(loop, 3),
            "tiles": int(round(tiles_equiv)),
            "tiles_per_second": round(tiles_equiv / max(loop, 1e-9), 3),
            "superpixels_per_second": round(R * C / max(loop, 1e-9), 1),
        }
        out.write_json(fdir / META, meta)
        outputs = out.finals
    write_manifest(d, STAGE, params, inputs, outputs)
    log.info("wrote %s/{micro,meso,macro,extra}.npy (%d x %d super-pixels; dims %d/%d/%d) in %.1f s "
             "(%.0f super-pixels/s, %.2f tiles/s)", FEATURES_DIR, R, C, dims["micro"], dims["meso"], dims["macro"],
             wall, meta["superpixels_per_second"], meta["tiles_per_second"])
    return meta


def _run_stain(img, grid_shape, extractor, arrays, band_rows, quiet):
    from ..histology import stain_features as fs
    R, C = grid_shape
    bar = _progress(R * 2, "row", quiet)
    try:
        for r0 in range(0, R, band_rows):
            r1 = min(R, r0 + band_rows)
            arrays["micro"][r0:r1] = np.clip(extractor.micro_band(img, r0, r1), -65504, 65504).astype(DTYPE)
            release_rows(img, 0, max(0, r1 - fs.HALO_SP) * geo.SUPER_PIXEL_PX)
            release_rows(arrays["micro"], 0, r1)
            bar.update(r1 - r0)
        arrays["micro"].flush()
        rows = max(band_rows, 64)
        for r0 in range(0, R, rows):
            r1 = min(R, r0 + rows)
            for s in ("meso", "macro"):
                arrays[s][r0:r1] = fs.context_band(arrays["micro"], r0, r1, fs.CONTEXT_SIGMA_SP[s]).astype(DTYPE)
                release_rows(arrays[s], 0, r1)
            release_rows(arrays["micro"], 0, r1)
            bar.update(r1 - r0)
    finally:
        bar.close()
    return {}


def load_features(directory, scales=SCALES + ("extra",), mmap=True):
    """(arrays, meta): {scale: memory-mapped float16 (R, C, D)} and the features.json dict."""
    d = Path(directory) / FEATURES_DIR
    mp = d / META
    if not mp.is_file():
        raise InputError(f"{mp}: not found; run `python Histology_Extractor.py --directory {directory}` first")
    meta = json.loads(mp.read_text())
    arrays = {}
    for s in scales:
        p = d / FILES[s]
        try:
            a = np.load(p, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as e:
            raise InputError(f"{p}: cannot be read ({type(e).__name__}); rerun Histology_Extractor.py") from None
        want = (*meta["grid_shape"], meta["dims"][s])
        if a.shape != tuple(want):
            raise InputError(f"{p}: shape {a.shape}, features.json says {tuple(want)}; rerun Histology_Extractor.py")
        arrays[s] = a
    return arrays, meta
