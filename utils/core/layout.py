"""Every artifact of a data directory DIR, named once, with the loader that reads it.

Raw inputs are the data contract (README, "Inputs"); each later artifact is written by one stage
(its key in utils.core.manifest.STAGES). A loader checks what it reads and turns any damage
(missing, a directory instead of a file, truncated, of another kind, made for another image) into
one InputError that names the file and the command that rewrites it."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .manifest import MANIFEST_DIR, rerun_hint
from .text_io import object_problem, positive_number

# --- raw inputs: the data contract (iStar's layout and its variants) ----------------------------
RAW_IMAGES = ("he-raw.jpg", "he-raw.jpeg", "he-raw.png", "he-raw.tif", "he-raw.tiff",
              "he-raw.ome.tif", "he-raw.ome.tiff")
RAW_COUNTS = ("cnts.tsv", "cnts.tsv.gz", "cnts.csv", "cnts.csv.gz", "cnts.h5ad")
RAW_LOCS = ("locs-raw.tsv", "locs-raw.tsv.gz", "locs-raw.csv", "locs-raw.csv.gz")
RAW_PIXEL_SIZE = "pixel-size-raw.txt"
RAW_RADIUS = "radius-raw.txt"
SECTION = "section.json"          # converters: array coordinates and provenance


@dataclass(frozen=True)
class Artifact:
    """A file in DIR written by `stage` (None: written by the simulator or a converter)."""
    name: str
    stage: str = None

    def path(self, directory) -> Path:
        return Path(directory) / self.name

    def fix(self, directory) -> str:
        if self.stage is None:
            return "write it again (python -m utils.convert or utils.simulate)"
        return f"rerun {rerun_hint(self.stage, directory)}"

    def damaged(self, directory, problem: str) -> InputError:
        return InputError(f"{self.path(directory)}: {problem}; {self.fix(directory)}")

    def existing(self, directory) -> Path:
        """The path, which must be a file."""
        p = self.path(directory)
        if p.is_file():
            return p
        if p.exists():
            raise self.damaged(directory, "is not a file")
        if self.stage is None:
            raise InputError(f"{p}: not found")
        raise InputError(f"{p}: not found; run {rerun_hint(self.stage, directory)} first")


# --- stage 1: image_calibration.py ----------------------------------------------------------------
CALIBRATED_IMAGE = Artifact("he.tif", "image_calibration")   # uncompressed, memory-mappable RGB
PREVIEW = Artifact("he-small.png", "image_calibration")      # one pixel per super-pixel: mean RGB
LOCS = Artifact("locs.tsv", "image_calibration")
RADIUS = Artifact("radius.txt", "image_calibration")
PIXEL_SIZE = Artifact("pixel-size.txt", "image_calibration")
CALIBRATION = Artifact("calibration.json", "image_calibration")
# --- stage 2: get_HR.py -------------------------------------------------------------------------------
SPOTS = Artifact("spots.h5ad", "get_HR")
HR_SPOTS = Artifact("hr-spots.h5ad", "get_HR")
GENES = Artifact("genes.tsv", "get_HR")
LATTICE = Artifact("lattice.json", "get_HR")
HR_PLOT = Artifact("hr-spots.png", "get_HR")
# --- stage 3: Histology_Extractor.py ------------------------------------------------------------------
FEATURES_DIR = "features"
FEATURE_SCALES = ("micro", "meso", "macro")
FEATURE_MAPS = {s: Artifact(f"{FEATURES_DIR}/{s}.npy", "Histology_Extractor") for s in FEATURE_SCALES + ("extra",)}
FEATURES_META = Artifact(f"{FEATURES_DIR}/features.json", "Histology_Extractor")
# --- stage 4: masking_non_tissue.py -------------------------------------------------------------------
MASK = Artifact("mask.png", "masking_non_tissue")           # uint8 255/0 on the super-pixel grid
MASK_OVERLAY = Artifact("mask-overlay.png", "masking_non_tissue")
MASK_JSON = Artifact("mask.json", "masking_non_tissue")
# --- stage 5: HISTEX.py, inside DIR/results/<run>/ (or --out) --------------------------------------------
RESULTS_DIR = "results"
SUPER_RES = "super-res.h5ad"
SPOTS_PRED = "spots-pred.h5ad"
GENE_MAPS = "maps"
GENE_MAP_INDEX = "index.tsv"        # inside maps/: gene -> file name of its map
LOSS_PLOT = "loss.png"
STATES_DIR = "states"
RUN_JSON = "run.json"
METRICS = "metrics.json"
GENES_ACCURACY = "genes-accuracy.tsv"   # cross-fitted per-gene accuracy (utils/superres/crossval.py)
# --- truth (simulator, Visium HD and Xenium converters) --------------------------------------------------
TRUTH_DIR = "truth"
TRUTH = Artifact(f"{TRUTH_DIR}/super.h5ad")
TRUTH_MASK = Artifact(f"{TRUTH_DIR}/mask.png")
TRUTH_SIMULATION = Artifact(f"{TRUTH_DIR}/simulation.json")
HELDOUT_DIR = "heldout"             # a protocol folder's scored spots (utils/evaluation/protocols.py)
# the folders of DIR that hold other artifacts than runs: no run is written inside them (HISTEX --out)
ARTIFACT_FOLDERS = (FEATURES_DIR, MANIFEST_DIR, TRUTH_DIR, HELDOUT_DIR)


# --- loaders ------------------------------------------------------------------------------------------

def data_directory_of(run_dir) -> Path | None:
    """The data directory of a run folder DIR/results/<run>; None for a run written elsewhere (--out)."""
    d = Path(run_dir).resolve().parent.parent
    return d if CALIBRATION.path(d).is_file() else None


def read_json(artifact: Artifact, directory, keys=()) -> dict:
    """A JSON object artifact holding at least `keys`."""
    p = artifact.existing(directory)
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise artifact.damaged(directory, f"damaged, not valid JSON ({type(e).__name__})") from None
    obj, problem = object_problem(text, keys)
    if problem:
        raise artifact.damaged(directory, f"damaged: {problem}")
    return obj


_CALIBRATION_KEYS = ("raw_image", "raw_pixel_size_um", "pixel_size_um", "scale", "raw_shape", "scaled_shape",
                     "padded_shape", "superpixel_px", "superpixel_grid", "radius_px", "radius_raw_px")


_CALIBRATION_NUMBERS = ("raw_pixel_size_um", "pixel_size_um", "scale", "superpixel_px", "radius_px", "radius_raw_px")


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v)) and v > 0


def load_calibration(directory) -> dict:
    cal = read_json(CALIBRATION, directory, _CALIBRATION_KEYS)
    bad = [k for k in _CALIBRATION_NUMBERS if not _positive_number(cal[k])]
    grid = cal["superpixel_grid"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
        bad.append("superpixel_grid")
    if bad:
        raise CALIBRATION.damaged(directory, f"damaged: {', '.join(bad)} not valid")
    return cal


def grid_of(calibration: dict) -> tuple:
    return tuple(int(v) for v in calibration["superpixel_grid"])


def check_grid(artifact: Artifact, directory, shape, calibration: dict) -> None:
    """Refuse an artifact made on another super-pixel grid than he.tif's (calibration.json)."""
    grid = grid_of(calibration)
    if tuple(shape[:2]) != grid:
        raise artifact.damaged(directory, f"made for a {shape[1]} x {shape[0]} super-pixel grid, but he.tif's grid "
                                          f"(calibration.json) is {grid[1]} x {grid[0]}")


def open_calibrated_image(directory, calibration: dict, mode: str = "r"):
    """Memory-map DIR/he.tif (uint8, H x W x 3, 0.5 um/px), checked against the super-pixel grid."""
    import tifffile
    p = CALIBRATED_IMAGE.existing(directory)
    try:
        img = tifffile.memmap(p, mode=mode)
    except Exception as e:  # tifffile raises many types for damaged files
        raise CALIBRATED_IMAGE.damaged(directory, f"cannot be memory-mapped ({type(e).__name__})") from None
    sp = int(calibration["superpixel_px"])
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] % sp or img.shape[1] % sp:
        raise CALIBRATED_IMAGE.damaged(directory, f"shape {img.shape} is not an RGB image on the {sp} px grid")
    check_grid(CALIBRATED_IMAGE, directory, (img.shape[0] // sp, img.shape[1] // sp), calibration)
    return img


def read_preview(directory, calibration: dict) -> np.ndarray:
    """he-small.png: the mean RGB of every super-pixel, (rows, cols, 3) uint8."""
    from .image_io import read_png
    rgb = read_png(PREVIEW.existing(directory), fix=PREVIEW.fix(directory))
    check_grid(PREVIEW, directory, rgb.shape, calibration)
    return rgb


def load_calibrated_spots(directory):
    """Calibrated spot locations (DataFrame indexed by spot id as text: x, y) and the radius (px)."""
    import pandas as pd
    p = LOCS.existing(directory)
    try:
        locs = pd.read_csv(p, sep="\t", index_col=0, dtype={0: str}, keep_default_na=False)
        locs = locs[["x", "y"]].astype(np.float64)
    except Exception as e:
        raise LOCS.damaged(directory, f"cannot be read as spot, x, y ({type(e).__name__})") from None
    locs.index = locs.index.astype(str)
    if len(locs) == 0 or not np.isfinite(locs.to_numpy()).all():   # stage 1 writes every spot, all finite
        raise LOCS.damaged(directory, "no spots, or x / y that are not finite numbers")
    text = RADIUS.existing(directory).read_text(errors="replace").strip()
    try:
        radius = float(text)
    except ValueError:
        radius = float("nan")
    if not np.isfinite(radius) or radius <= 0:
        raise RADIUS.damaged(directory, f"holds {text[:30]!r}, not a positive radius")
    return locs, radius


def read_h5ad(artifact: Artifact, directory):
    from .h5ad_io import read_anndata
    return read_anndata(artifact.existing(directory), artifact.fix(directory))


def _check_values(artifact: Artifact, directory, ad) -> None:
    """Centres obs x, y and the matrix X: finite numbers, X not negative (counts), one observation per
    id. A sparse X (a file rewritten by scanpy) is made dense here, as the stage reads it."""
    import pandas as pd
    if ad.obs_names.duplicated().any():
        raise artifact.damaged(directory, "damaged: duplicated spot ids (obs names)")
    for c in ("x", "y"):
        v = ad.obs[c]
        if not pd.api.types.is_numeric_dtype(v) or not np.isfinite(v.to_numpy(np.float64)).all():
            raise artifact.damaged(directory, f"damaged: obs '{c}' holds values that are not finite numbers")
    X = ad.X = np.asarray(ad.X.toarray() if hasattr(ad.X, "toarray") else ad.X)
    if not np.issubdtype(X.dtype, np.number) or not np.isfinite(X).all() or (X < 0).any():
        raise artifact.damaged(directory, "damaged: X holds values that are not finite non-negative numbers")


MIN_SPOTS = 3   # stage 2 keeps at least these; fewer cannot train or validate anything


def read_spots(directory):
    """spots.h5ad, checked for what stage 5 uses."""
    ad = read_h5ad(SPOTS, directory)
    need = [k for k in ("x", "y") if k not in ad.obs] + [k for k in ("scale_min", "scale_max") if k not in ad.var]
    need += [k for k in ("radius_px", "lattice") if k not in ad.uns]
    if need or ad.n_obs == 0 or ad.n_vars == 0 or ad.X is None:
        raise SPOTS.damaged(directory, f"damaged: {'no ' + ', '.join(need) if need else 'no spots, genes or X'}")
    _check_values(SPOTS, directory, ad)
    problem = _spot_problem(ad)
    if problem:
        raise SPOTS.damaged(directory, f"damaged: {problem}")
    return ad


def _spot_problem(ad) -> str | None:
    """What in spots.h5ad no run of get_HR.py writes: too few spots, no count, scaling bounds other
    than the genes' ranges (get_HR: spots.genes.minmax_scaling), a radius that is not a positive number."""
    lo, hi = (ad.var[k].to_numpy(np.float64) for k in ("scale_min", "scale_max"))
    radius = ad.uns["radius_px"]
    if ad.n_obs < MIN_SPOTS:
        return f"{ad.n_obs} spot(s), at least {MIN_SPOTS} are needed"
    if not ad.X.any():
        return "every count is zero"
    if not (np.allclose(lo, ad.X.min(axis=0), rtol=1e-6) and np.allclose(hi, ad.X.max(axis=0), rtol=1e-6)):
        return "var scale_min / scale_max are not the genes' count ranges over the spots"
    if not (hi > lo).any():
        return "no gene's count varies over the spots"
    if not positive_number(radius):
        return f"uns radius_px {radius!r} is not a positive number"
    return None


def read_hr_spots(directory, spots):
    ad = read_h5ad(HR_SPOTS, directory)
    if ("sources" not in ad.obsm or list(ad.var_names) != list(spots.var_names) or "x" not in ad.obs
            or "y" not in ad.obs or ad.X is None):
        raise HR_SPOTS.damaged(directory, "damaged, or made with other genes than spots.h5ad")
    _check_values(HR_SPOTS, directory, ad)
    return ad


def load_features(directory, calibration: dict, scales=FEATURE_SCALES + ("extra",)):
    """(maps, meta): {scale: memory-mapped float16 (rows, cols, channels)} and features.json."""
    meta = read_json(FEATURES_META, directory, ("grid_shape", "dims"))
    grid, dims = meta["grid_shape"], meta["dims"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)
            and isinstance(dims, dict) and all(isinstance(dims.get(s), int) and dims[s] > 0 for s in scales)):
        raise FEATURES_META.damaged(directory, "damaged: grid_shape / dims are not valid")
    check_grid(FEATURES_META, directory, tuple(grid), calibration)
    maps = {}
    for s in scales:
        a = FEATURE_MAPS[s]
        try:
            arr = np.load(a.existing(directory), mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise a.damaged(directory, f"cannot be read as a NumPy array ({type(e).__name__})") from None
        want = (*meta["grid_shape"], meta["dims"].get(s))
        if arr.shape != tuple(want):
            raise a.damaged(directory, f"shape {arr.shape}, features.json says {tuple(want)}")
        maps[s] = arr
    return maps, meta


def load_mask(directory, calibration: dict = None) -> np.ndarray:
    """The tissue mask as a bool array on the super-pixel grid (True = tissue)."""
    from .image_io import read_png
    p = MASK.existing(directory)
    calibration = calibration or load_calibration(directory)
    m = read_png(p, grey=True, fix=MASK.fix(directory))
    check_grid(MASK, directory, m.shape, calibration)
    return m > 127
