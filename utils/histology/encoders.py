"""One encoder interface for every backbone of Histology_Extractor (stain filters or a tile network).

    enc = build_encoder(backbone, weights=..., device="auto", ...)   # weights resolved, model built
    enc.prepare(img, small)           # per-slide set-up (the stain encoder estimates its stain vectors)
    enc.dims                          # {"micro": C, "meso": C, "macro": C}
    n_tiles = enc.extract(img, arrays, progress=bar)   # fills arrays[scale] (R, C, dims[scale]) float16
                                      # (world=: under torchrun only this rank's rows; returns its tiles)
    enc.describe()                    # what goes into features.json (never the token)

The stage code never asks which backbone it has; backbones.py builds the networks and finds weights."""
import logging

import numpy as np

from ..core import geometry as geo
from ..core.device import resolve_device
from ..core.distributed import World
from ..core.errors import InputError

log = logging.getLogger("trihrge")

DTYPE = np.float16
SUPERPIXELS_PER_TILE = geo.TILE_PX // geo.SUPER_PIXEL_PX


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


class StainEncoder:
    """Weights-free hematoxylin/eosin and texture channels (histology/stain_features.py); no tiles."""

    kind = "stain"
    device, precision, shifts = "cpu", "fp32", 1

    def __init__(self, *, band_rows: int = 32, nuclei: bool = False):
        from . import stain_features as fs
        self.fs = fs
        self.band_rows = band_rows
        self.nuclei = nuclei
        context = len(fs.context_channels(nuclei))
        self.dims = {"micro": len(fs.micro_channels(nuclei)), "meso": context, "macro": context}
        self.stains = self.thresholds = self.extractor = None

    def prepare(self, img, small) -> None:
        fs = self.fs
        px = fs.sample_tissue_pixels(img, small, release=release_rows)
        self.stains = fs.estimate_stains(px)
        if self.stains.get("reason"):
            log.info("stain vectors: Ruifrok-Johnston defaults (%s)", self.stains["reason"])
        else:
            log.info("stain vectors estimated from the slide (Macenko), H %s, E %s",
                     np.round(self.stains["h"], 3).tolist(), np.round(self.stains["e"], 3).tolist())
        self.thresholds = fs.choose_thresholds(px, self.stains)
        self.extractor = fs.StainExtractor(self.stains, self.thresholds, nuclei=self.nuclei)
        self.dims["micro"] = self.extractor.dim

    def extract(self, img, arrays, *, progress, world: World = World()) -> float:
        """micro in bands with a halo, then meso/macro as Gaussian context of micro; tile equivalents.
        Under torchrun the bands are dealt out to the ranks in turn, in both passes; the context pass
        reads micro rows of other ranks, so it starts after a barrier."""
        fs, R = self.fs, arrays["micro"].shape[0]
        done = 0
        for r0 in world.strided(range(0, R, self.band_rows)):
            r1 = min(R, r0 + self.band_rows)
            arrays["micro"][r0:r1] = np.clip(self.extractor.micro_band(img, r0, r1), -65504, 65504).astype(DTYPE)
            release_rows(img, 0, max(0, r1 - fs.HALO_SP) * geo.SUPER_PIXEL_PX)
            release_rows(arrays["micro"], 0, r1)
            progress.update(r1 - r0)
            done += r1 - r0
        arrays["micro"].flush()
        world.sync()
        rows = max(self.band_rows, 64)
        for r0 in world.strided(range(0, R, rows)):
            r1 = min(R, r0 + rows)
            for s in ("meso", "macro"):
                arrays[s][r0:r1] = fs.context_band(arrays["micro"], r0, r1, fs.CONTEXT_SIGMA_SP[s]).astype(DTYPE)
                release_rows(arrays[s], 0, r1)
            release_rows(arrays["micro"], 0, r1)
            progress.update(r1 - r0)
        return done * arrays["micro"].shape[1] / SUPERPIXELS_PER_TILE ** 2

    def progress_total(self, grid) -> int:
        return 2 * grid[0]

    def context_px(self) -> dict:
        return {"meso": geo.TILE_PX, "macro": int(round(4 * self.fs.CONTEXT_SIGMA_SP["macro"] * geo.SUPER_PIXEL_PX))}

    def describe(self) -> dict:
        fs, stains = self.fs, self.stains
        macenko = ", concentrations scaled to Macenko's reference maxima" if stains["method"] == "macenko" else ""
        return {
            "architecture": f"stain v{fs.VERSION} (weights-free colour deconvolution + texture statistics"
                            + (" + nuclear morphology)" if self.nuclei else ")"),
            "weights": "none",
            "tile_px": geo.TILE_PX, "input_px": None, "superpixels_per_tile": SUPERPIXELS_PER_TILE,
            "normalisation": (f"optical density -ln(I/255) split into hematoxylin/eosin by colour deconvolution "
                              f"({stains['method']} stain vectors{macenko}); analysis at 1 um/px; no learned model"),
            "stain_vectors": stains, "thresholds": self.thresholds,
            "channels": {"micro": fs.micro_channels(self.nuclei), "meso": fs.context_channels(self.nuclei),
                         "macro": fs.context_channels(self.nuclei)},
            "context_sigma_superpixels": dict(fs.CONTEXT_SIGMA_SP),
            "band_rows": self.band_rows,
            "shifts": {"passes": 1, "offsets_px": [[0, 0]],
                       "note": "no tiles: filters run over bands with a halo, seamless by construction"},
        }


class TileEncoder:
    """A tile network (UNI, UNI2-h, any timm model): tokens per super-pixel, tile and context summaries."""

    kind = "tile"

    def __init__(self, backbone: str, weights_source, *, device: str, precision: str, shifts: int = None,
                 batch_size: int = None, timm_kwargs: dict = None, seed: int = 0):
        from .backbones import build_tile_model, pick_precision
        self.device = resolve_device(device)
        self.precision = pick_precision(precision, self.device)
        # a GPU runs the 2 x 2 half-tile offsets in about a minute for UNI on a 6.5 mm slide; a ViT-L on the
        # CPU does ~1-2 tiles/s, so one pass there (meso/macro are interpolated anyway)
        self.shifts = shifts or (4 if self.device == "cuda" else 1)
        self.batch_size = batch_size or (64 if self.device == "cuda" else 16)
        self.weights = weights_source
        self.tm = tm = build_tile_model(backbone, weights_source, device=self.device, precision=self.precision,
                                        timm_kwargs=timm_kwargs, seed=seed)
        self.dims = {"micro": tm.dim, "meso": tm.summary_dim, "macro": tm.summary_dim}
        self.stats = {}
        log.info("%s on %s (%s): tiles of %d px -> %d px input, %d x %d tokens per tile, %d-d tokens, %d-d summary",
                 tm.arch, self.device, self.precision, tm.tile_px, tm.input_px, tm.grid, tm.grid, tm.dim, tm.summary_dim)

    def prepare(self, img, small) -> None:
        pass

    def progress_total(self, grid):
        return None

    def extract(self, img, arrays, *, progress, world: World = World()) -> float:
        """Tile rows streamed over the slide; under torchrun each rank takes a contiguous block of them
        (a block needs the tile rows around it, so dealing them out in turn would compute most twice)."""
        from .tile_features import extract_tiles
        grid = arrays["micro"].shape[:2]
        self.stats = extract_tiles(img, grid, self.tm, arrays["micro"], arrays["meso"], arrays["macro"],
                                   shifts=self.shifts, batch_size=self.batch_size, progress=progress,
                                   release=release_rows, share=world.block)
        return self.stats["n_tiles"]

    def context_px(self) -> dict:
        from .tile_features import MACRO_FACTOR
        return {"meso": self.tm.tile_px, "macro": MACRO_FACTOR * self.tm.tile_px}

    def describe(self) -> dict:
        tm = self.tm
        offs = [[dy * geo.SUPER_PIXEL_PX, dx * geo.SUPER_PIXEL_PX]
                for dy, dx in self.stats.get("shift_offsets_superpixels", [])]
        return {
            "architecture": tm.arch, "weights": self.weights.description,
            "tile_px": tm.tile_px, "input_px": tm.input_px, "superpixels_per_tile": tm.grid,
            "num_prefix_tokens": tm.num_prefix_tokens, "token_source": "patch tokens" if tm.is_vit else
            "final feature map resampled bilinearly to one cell per super-pixel",
            "normalisation": f"RGB/255, mean {list(tm.mean)}, std {list(tm.std)} (ImageNet)",
            "channels": None, "device": self.device, "precision": self.precision, "batch_size": self.batch_size,
            "shifts": {"passes": len(offs), "offsets_px": offs,
                       "note": "offsets [dy, dx] of each pass's tile grid; micro: mean of a super-pixel's tokens "
                               "over the passes, weighted by a tent that favours tile centres over tile borders; "
                               "meso: tile summaries interpolated bilinearly between tile centres and averaged "
                               "over the passes; macro: window summaries interpolated bilinearly"},
            "macro_context_px": self.context_px()["macro"],
            "model_seconds": round(self.stats.get("model_seconds", 0.0), 3),
        }


def build_encoder(backbone: str, *, weights_source=None, device: str = "auto", precision: str = "auto",
                  shifts: int = None, batch_size: int = None, band_rows: int = 32, timm_kwargs: dict = None,
                  seed: int = 0):
    """The encoder for `backbone` ('stain', 'stain-nuclei', 'uni', 'uni2-h', 'timm:NAME'); weights_source from
    backbones.resolve_weights (None for stain)."""
    from .backbones import parse_backbone
    kind, _ = parse_backbone(backbone)
    if kind == "stain":
        unused = [f"{o} {v}" for o, v in (("--shifts", shifts), ("--batch-size", batch_size)) if v is not None] + \
            ([f"--precision {precision}"] if precision != "auto" else [])
        if unused:   # the tile backbones' options: said, not dropped without a word
            log.warning("%s: not used by the %s backbone, which has no tiles and no network (seamless banded "
                        "NumPy/OpenCV filters); --band-rows sets its memory", ", ".join(unused), backbone)
        if device not in ("auto", "cpu"):
            log.warning("--device %s: the stain backbone runs on the CPU (NumPy/OpenCV filters); using cpu", device)
        if timm_kwargs:   # they would go into the manifest as if they had shaped the features
            raise InputError(f"--timm-kwargs: the {backbone} backbone has no network; leave it out, or give a tile "
                             f"backbone (--backbone timm:NAME, uni, uni2-h)")
        return StainEncoder(band_rows=band_rows, nuclei=backbone.strip() == "stain-nuclei")
    if weights_source is None:
        raise InputError(f"--backbone {backbone}: needs weights (--weights PATH or --login TOKEN)")
    return TileEncoder(backbone, weights_source, device=device, precision=precision, shifts=shifts,
                       batch_size=batch_size, timm_kwargs=timm_kwargs, seed=seed)
