"""`obsm['spatial']` and `uns['spatial']` in scanpy's Visium layout.

The images are the calibrated H&E (he.tif, 0.5 um/px) without its padding, downscaled by whole
factors in row strips (the full image is never read at once): `hires` at most HIRES_MAX_PX on its
long side, `lowres` at most LOWRES_MAX_PX. Scale factors map he-raw pixels (the frame of
obsm['spatial'] and obs x/y) to image pixels, as Space Ranger's `scalefactors_json.json` does."""
import math
import os
import re
from pathlib import Path

import numpy as np

from ..core import layout as L
from .keys import Key

HIRES_MAX_PX = 2000
LOWRES_MAX_PX = 600
_STRIP_ROWS = 64           # output rows per strip of the block mean


def _block_mean(img, k: int) -> np.ndarray:
    """Mean over k x k blocks of an (H, W, 3) uint8 array (memmap), read strip by strip."""
    # integer sums (uint16 over the k rows of a block, then uint32) instead of a float32 copy of each
    # strip: the same image (exact sums, one rounding) 10-30 x faster on her2st C2 (17 s -> 1 s for
    # both images); strips of 64 block rows stay in cache
    H, W = (img.shape[0] // k) * k, (img.shape[1] // k) * k
    out = np.empty((H // k, W // k, 3), np.uint8)
    step = _STRIP_ROWS * k
    rows_dtype = np.uint16 if k <= 257 else np.uint32          # 255 k fits in 16 bits up to k = 257
    for r0 in range(0, H, step):
        block = np.asarray(img[r0:min(H, r0 + step), :W])
        h = block.shape[0] // k
        sums = block.reshape(h, k, W // k, k, 3).sum(axis=1, dtype=rows_dtype).sum(axis=2, dtype=np.uint32)
        out[r0 // k:r0 // k + h] = np.rint(sums / np.float32(k * k))
    return out


def tissue_images(directory, calibration: dict) -> dict:
    """{'images': {hires, lowres}, 'scalefactors': {hires/lowres scalef}} from DIR/he.tif."""
    img = L.open_calibrated_image(directory, calibration)
    h, w = (int(v) for v in calibration["scaled_shape"][:2])   # he-raw extent; the rest is padding
    img = img[:h, :w]
    scale = float(calibration["scale"])                           # he-raw px -> calibrated px
    images, factors = {}, {}
    for key, fkey, limit in ((Key.HIRES, Key.HIRES_SCALEF, HIRES_MAX_PX), (Key.LOWRES, Key.LOWRES_SCALEF, LOWRES_MAX_PX)):
        k = max(1, math.ceil(max(h, w) / limit))
        images[key] = _block_mean(img, k)
        factors[fkey] = scale / k
    return {Key.IMAGES: images, Key.SCALEFACTORS: factors}


LIBRARY_ID_MAX = 100    # characters
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def library_id_problem(text: str) -> str | None:
    """Why `text` cannot be a library id (a key of uns['spatial'], an HDF5 group name), or None."""
    if not text.strip():
        return "is empty"
    if "/" in text:
        return "holds '/' (h5ad would store it as nested groups)"
    if text == ".":   # HDF5 reads the group '.' as its parent: uns['spatial'] lost its library level
        return "names the HDF5 group itself: h5ad would lose uns['spatial']'s library level"
    if _CONTROL.search(text):
        return "holds a control character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(text) > LIBRARY_ID_MAX:
        return f"is longer than {LIBRARY_ID_MAX} characters"
    return None


def storable_library_id(name: str) -> str:
    """A folder name made a library id: bytes that are not UTF-8 and control characters replaced,
    cut to LIBRARY_ID_MAX characters."""
    name = os.fsencode(name).decode("utf-8", errors="replace")
    return _CONTROL.sub("_", name)[:LIBRARY_ID_MAX]


def folder_library_id(directory) -> str:
    """The default library id: the data directory's name (the section), made storable."""
    return storable_library_id(Path(directory).resolve().name or "section")


def spatial_uns(library_id: str, images: dict, spot_diameter_raw: float, source: str) -> dict:
    """uns['spatial'] for one library: the images, their scale factors, the spot (or super-pixel) size."""
    factors = {**images[Key.SCALEFACTORS], Key.SPOT_DIAMETER: float(spot_diameter_raw)}
    return {library_id: {Key.IMAGES: dict(images[Key.IMAGES]), Key.SCALEFACTORS: factors,
                         Key.METADATA: {"source": source}}}


def spatial_obsm(obs, x: str = "x", y: str = "y") -> dict:
    """obsm['spatial']: (x, y) of each observation in he-raw pixels (float64)."""
    return {Key.SPATIAL: obs[[x, y]].to_numpy(np.float64)}


def libraries(adata) -> list:
    """The library ids of uns['spatial'] (none, one per section, several after anndata.concat)."""
    return list(adata.uns.get(Key.SPATIAL, {}) or {})


def library_of(adata) -> str:
    """The one library id of uns['spatial'] (KeyError-free: None when there is none)."""
    libs = libraries(adata)
    return libs[0] if len(libs) == 1 else None
