"""Stage 5 (HISTEX.py): train TriHRGE (or a baseline) on the spots, predict every tissue super-pixel,
map predictions back to counts, write the outputs and, when truth exists, the scores.

    run_histex(directory, HistexConfig(...))   # -> (output directory, metrics or None)

Steps, each a function below: read and check the inputs (_SpotInputs), super-resolve (a trained
model's median over states, or the image-free interpolation), spot consistency, write the outputs.

Under torchrun (utils.core.distributed) every rank reads the inputs, trains its share of the states
and predicts its share of the super-pixels (superres/predict.py); rank 0 holds the DIR lock and does everything
after (out-of-fold accuracy, consistency, fusion, writing). The maps equal a one-process run's."""
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np

from ..core import geometry as geo
from ..core import layout as L
from ..core.atomic import npy_memmap
from ..core.casts import cast_into
from ..core.chunks import row_chunks
from ..core.device import available_cpus, resolve_device
from ..core.distributed import current
from ..core.errors import InputError
from ..core.malloc import keep_freed_memory
from ..core.raw_io import unknown_names
from ..core.stage import rank_stage
from ..report import write_report
from ..scverse.keys import File, Key
from ..scverse.spatial import tissue_images
from ..spots.genes import scale_counts
from ..superres.config import HistexConfig, precision_of
from ..superres.consistency import (
    apply_spot_consistency,
    global_rescale_factors,
    interpolation_chunks,
    spot_sums,
    superpixel_kernel,
    tissue_footprints,
    tissue_index,
)
from ..superres.crossval import (
    gene_accuracy,
    leave_one_out_interpolation,
    max_folds,
    out_of_fold_scaled,
    spot_folds,
)
from ..superres.crossval import summary as cv_summary
from ..superres.fusion import (
    Detail,
    blend_maps,
    blend_weights,
    blended_oof,
    choose_consistency_sigma,
    consistent_oof,
)
from ..superres.inputs import spot_arrays, training_data
from ..superres.outputs import (
    complete_h5ad,
    h5ad_x_memmap,
    spot_spatial,
    superpixel_obs,
    superpixel_spatial,
    write_gene_maps,
    write_h5ad_streamed,
    write_loss_plot,
)
from ..superres.predict import predict_tissue
from ..superres.stacking import between_maps, mix_by_proximity, proximity, stack_weights, stacked_oof
from ..superres.states import trained_states

log = logging.getLogger("trihrge")
STAGE = "HISTEX"


@dataclass
class _SpotInputs:
    """The checked inputs of one run: spots, HR spots, the tissue super-pixels and the footprints."""
    calib: dict
    spots: anndata.AnnData
    hr: anndata.AnnData
    mask: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    footprints: object      # sparse (spots, tissue super-pixels) footprint matrix
    footprint_size: np.ndarray
    plot_genes: list

    @functools.cached_property
    def counts(self):
        """(spots, genes) float32 measured counts, converted once."""
        return np.asarray(self.spots.X, dtype=np.float32)

    @property
    def mean_footprint(self) -> float:
        """Tissue super-pixels under a spot, on average: the interpolation's counts-to-super-pixel scale."""
        return float(np.mean(self.footprint_size))

    @functools.cached_property
    def per_superpixel(self):
        """(spots, genes) float32 counts / mean_footprint: what the interpolation spreads to super-pixels."""
        return self.counts / np.float32(self.mean_footprint)

    @property
    def xy(self):
        return self.spots.obs[["x", "y"]].to_numpy(np.float64)

    @property
    def genes(self):
        return list(self.spots.var_names)

    @property
    def spacing_px(self) -> float:
        return float(self.spots.uns["lattice"]["spacing_px"])

    def sigma_px(self, config) -> float:
        """The Gaussian kernel width of the interpolation (and its reference) in pixels: --sigma spacings."""
        return config.sigma * self.spacing_px


def _read_inputs(directory, config) -> _SpotInputs:
    calib = L.load_calibration(directory)
    spots = L.read_spots(directory)
    hr = L.read_hr_spots(directory, spots)
    genes = list(spots.var_names)
    plot_genes = list(dict.fromkeys(config.plot_genes or genes[:4]))   # a gene named twice is drawn once
    unknown = [g for g in plot_genes if g not in genes]
    if unknown:
        raise InputError(f"--plot-genes: {unknown_names(unknown, genes)} not among the {len(genes)} selected genes "
                         f"(see {L.GENES.path(directory)})")
    mask = L.load_mask(directory, calib)
    rows, cols = tissue_index(mask)
    if len(rows) == 0:
        raise L.MASK.damaged(directory, "no tissue in the mask (perhaps rerun it with a lower --threshold)")
    fp, fp_size = tissue_footprints(spots.obs[["x", "y"]].to_numpy(np.float64), float(spots.uns["radius_px"]), mask)
    _warn_thin_footprints(directory, fp, fp_size)
    if fp.nnz == 0:
        raise InputError(f"{L.MASK.path(directory)}: no spot footprint overlaps the tissue mask; check the mask "
                         f"({L.MASK_OVERLAY.name}) and the spot coordinates")
    return _SpotInputs(calib, spots, hr, mask, rows, cols, fp, fp_size, plot_genes)


def _interpolate(st, out_dir, inp, config, kernel):
    """The image-free baseline: Gaussian-kernel interpolation of the spot counts, by row chunks into
    a scratch memmap as the trained maps (one product of the whole kernel made a float64 map of all
    super-pixels: her2st C2 14.0 -> 11.5 s, peak 2.20 -> 1.84 GB). Its out-of-fold prediction is the
    reference itself: None here, see _fuse_and_measure."""
    sr = _prediction_map(st, out_dir, (len(inp.rows), len(inp.genes)), maps=1, what="the interpolated map",
                         compress=config.compress)
    for s, interp in interpolation_chunks(kernel(), inp.per_superpixel):
        sr[s] = interp
    return sr, {"model": config.model, "sigma_spacings": config.sigma}, [], None


def _cpus(config) -> int:
    """--threads, else this process's share of the CPUs (the ranks of a node under torchrun split them)."""
    return config.threads or current().cpus(available_cpus())


def _predict_trained(st, directory, out_dir, config, inp, device, progress, kernel):
    """Median over the trained states, mapped back to counts per super-pixel, in a scratch memmap;
    and the out-of-fold spot counts of cross-fitting (None without folds). Under torchrun rank 0
    gets them, the other ranks (which train and predict their shares) None. With --residual the
    states predict a correction to the interpolation: trained against each spot's leave-one-out
    interpolation, added to the interpolated map (kernel()) and clipped at 0."""
    world = current()
    shape = (len(inp.rows), len(inp.genes))
    # stack: the image model's own map as well (only where the fusion is applied: with folds)
    maps = 4 if config.fusion == "stack" and config.cv_folds else 3
    if world.leader:   # before training: a disk too small for the maps is said before the states take minutes
        st.require_space(maps * shape[0] * shape[1] * 4, "the super-resolution maps", where=out_dir)
    _, _, lo, hi, _ = spot_arrays(inp.spots)
    loo = _reference_oof(inp, config) if config.residual else None
    td = training_data(directory, config, inp.spots, inp.hr, inp.mask.shape,
                       base=None if loo is None else scale_counts(loo, lo, hi))
    folds = spot_folds(inp.spots.n_obs, config.cv_folds, config.seed)
    if config.cv_folds and folds is None:
        most = max_folds(inp.spots.n_obs)
        log.warning("too few spots (%d) for %d-fold cross-fitting: no accuracy estimate and no fusion (%s)",
                    inp.spots.n_obs, config.cv_folds, f"--n-states {most} or fewer makes folds of these spots" if most
                    else "no number of states makes folds of this few spots")
    models, histories = trained_states(td.cfg, td, out_dir=out_dir, n_states=config.n_states, seed=config.seed,
                                       retrain=config.retrain, device=device, progress=progress, folds=folds,
                                       workers=_cpus(config), world=world)
    oof = None if folds is None or not world.leader else \
        (lo if loo is None else loo) + out_of_fold_scaled(models, folds, td.data, device,
                                                             precision=precision_of(td.cfg)) * (hi - lo)
    t_pred = time.time()
    sr = None
    if world.leader:
        sr = _prediction_map(st, out_dir, shape, maps=maps, what="the super-resolution maps", compress=config.compress)
    predict_tissue(models, td.cfg, td.maps, td.tokens, inp.rows, inp.cols, device, batch=config.batch_windows,
                   progress=progress, out=sr, world=world, scaling=td.scaling)
    if not world.leader:
        return None
    log.info("predicted %d super-pixels with %d state(s) in %.0f s", shape[0], len(models), time.time() - t_pred)
    # counts per super-pixel: a spot's footprint mean maps to its count / footprint size (iStar)
    n_fp, span = inp.mean_footprint, hi - lo
    for s in row_chunks(*sr.shape):   # in place: (lo + v (hi - lo)) / n_fp, the same float32 steps
        block = sr[s]
        block *= span
        block += lo
        block /= n_fp
    if loo is not None:
        _add_interpolation(sr, kernel(), inp.per_superpixel, lo / n_fp)
        oof = np.maximum(oof, 0) if oof is not None else None
    return sr, td.cfg, histories, oof


def _add_interpolation(sr, kernel, per_sp, offset):
    """--residual: sr (super-pixels, G) counts of the correction (with its lo / n_fp offset) plus the
    interpolated counts, clipped at 0; in place, by row chunks."""
    for s, interp in interpolation_chunks(kernel, per_sp):
        sr[s] = np.maximum(sr[s] + interp - offset, 0)


THIN_FOOTPRINT = 0.25   # share of a spot's footprint on the mask below which its count crowds into few super-pixels


def _warn_thin_footprints(directory, fp, fp_size) -> None:
    """A mask that misses most of the spots' footprints puts each spot's whole count on its few
    tissue super-pixels (the maps run many times too high there): say so, as masking does."""
    on_tissue = np.diff(fp.indptr) / np.maximum(np.asarray(fp_size), 1)
    thin = int((on_tissue < THIN_FOOTPRINT).sum())
    if thin > len(on_tissue) / 2 and current().leader:   # once per run under torchrun
        log.warning("%d of %d spots have under %d%% of their footprint on the tissue mask: each spot's count goes "
                    "to those few super-pixels, so the maps run high there; look at %s and rerun "
                    "masking_non_tissue.py with a lower --threshold if the mask misses tissue", thin, len(on_tissue),
                    100 * THIN_FOOTPRINT, L.MASK_OVERLAY.path(directory))


def _reference_oof(inp, config):
    return leave_one_out_interpolation(inp.counts, inp.xy, inp.sigma_px(config))


def _image_map(st, out_dir, inp, config, sr, oof, before):
    """--fusion stack: a scratch copy of the model's map with one scale per gene (the global
    consistency), taken before the local consistency changes sr; None otherwise."""
    if config.fusion != "stack" or oof is None or not config.model_class.trainable:
        return None
    # float16: the map is only mixed into the float32 one; half of the 0.5 GB it added on the large demo.
    # Its largest value is 65504: a map or spot counts beyond a quarter of that (a spot of a million
    # counts) take float32, or the stack's map would hold inf and then NaN
    scale = global_rescale_factors(inp.counts, before)
    peak = max(float(np.max(np.max([sr[s].max(axis=0) for s in row_chunks(*sr.shape)], axis=0) * scale)),
               float(inp.counts.max()))   # the stack's map mixes in the interpolation: a spot's count bounds it
    dtype = np.float16 if peak < float(np.finfo(np.float16).max) / 4 else np.float32
    image = _scratch_memmap(st.scratch(out_dir / "image-map.npy"), sr.shape, dtype)
    for s in row_chunks(*sr.shape):
        cast_into(image[s], sr[s] * scale)
    return image


def _stack_between(inp, image, sr, model_oof, oof, before, ref, kernel):
    """(weights (G, 3), run.json record, stacked out-of-fold counts), Nones without an image map:
    the stacking of stacking.py fitted on the out-of-fold spots (the image model scaled as its map,
    the consistent prediction oof, the reference ref), its map written into image."""
    if image is None:
        return None, None, None
    image_oof = consistent_oof(model_oof, inp.counts, before, inp.xy, 0.0, "global")
    c, record = stack_weights(inp.counts, [image_oof, oof], ref)
    between_maps(image, c, sr, kernel(), inp.per_superpixel)
    return c, record, stacked_oof(c, [image_oof, oof], ref)


def _fuse_and_measure(inp, config, sr, oof, before, sigma_c, kernel, image=None):
    """With an out-of-fold prediction (the interpolation's is its leave-one-out reference): the
    per-gene blend of the consistent map with the interpolation (--fusion blend, applied to sr in
    place; fusion.py), with --fusion stack mixed by proximity with the stacking between spots
    (stacking.py; image: the image model's scratch map), and the cross-validated accuracy of the
    maps that are written, logged in one line. before: the maps' spot sums before consistency;
    sigma_c: the local consistency's width.
    Returns (genes-accuracy table, run.json summary, fusion record, the out-of-fold spot counts of
    the maps written (n_spots, G), NaN for spots in no fold), Nones without one."""
    trainable = config.model_class.trainable
    if oof is None and trainable:
        if config.fusion != "none":
            # a warning when asked for, a note when it is only the default
            (log.warning if config.fusion != HistexConfig.fusion else log.info)(
                "--fusion %s: not applied, the model's map is written as it is (the fusion is chosen on the "
                "out-of-fold predictions of cross-fitting, which this run has not: --no-cross-fit, --val-fraction "
                "0, one state or too few spots)", config.fusion)
        return None, None, None, None
    ref = _reference_oof(inp, config)
    if oof is None:
        oof = ref
    model_oof, fusion, a = oof, None, None
    if trainable:  # measure the maps that are written: through the consistency, from the other spots
        oof = consistent_oof(oof, inp.counts, before, inp.xy, sigma_c * inp.spacing_px, config.consistency)
    # --fusion stack: the between-spot map first, while sr is the consistent map
    c, stacking, stacked = _stack_between(inp, image, sr, model_oof, oof, before, ref, kernel)
    if config.fusion != "none" and trainable:  # blend, blend-linear, and stack near the spots
        a, fusion = blend_weights(inp.counts, oof, ref)
        # the within-spot detail kept: a Gaussian of half the spot radius separates it from the level
        detail = Detail(inp.rows, inp.cols, inp.mask.shape, float(inp.spots.uns["radius_px"]) / geo.SUPER_PIXEL_PX / 2,
                        threads=_cpus(config)) \
            if config.fusion != "blend-linear" else None
        blend_maps(sr, a, kernel(), inp.per_superpixel, detail=detail)
        oof = blended_oof(a, oof, ref)
        log.info("fusion: per-gene blend with the interpolation, median weight of the model %.2f (pooled %.2f)",
                 fusion["median_weight"], fusion["pooled_weight"])
    if stacked is not None:  # the out-of-fold spots stand where no spot is measured: the stacked map's estimate
        mix_by_proximity(sr, image, proximity(inp.rows, inp.cols, inp.xy, float(inp.spots.uns["radius_px"])))
        fusion, oof = {"blend": fusion, "stack": stacking}, stacked
        log.info("fusion: between spots, image model %.2f, consistent map %.2f, interpolation %.2f (median weights)",
                 *stacking["median_weights"].values())
    table = gene_accuracy(inp.counts, oof, ref, inp.genes, model=model_oof if fusion else None, weights=a, stack=c)
    cv = cv_summary(table)
    log.info("cross-validated accuracy (out-of-fold, spot level, %d most variable genes, %d spots): median "
             "Pearson r %.3f; interpolation reference %.3f", cv["n_genes"], cv["n_spots"], cv["pearson_median"],
             cv["reference_pearson_median"])
    return table, cv, fusion, oof


def _consistency_sigma(inp, config, oof, before):
    """(kernel width of the local consistency in lattice spacings, run.json record): --consistency-sigma
    (0: --sigma), or with --choose-consistency-sigma chosen by the out-of-fold spots
    (fusion.choose_consistency_sigma; the fixed width without them). before: the maps' spot sums."""
    if config.consistency != "local":
        return config.sigma, None
    fixed = config.consistency_sigma or config.sigma
    if not config.choose_consistency_sigma or oof is None:
        return fixed, {"sigma_spacings": fixed, "chosen_by": "--consistency-sigma" if config.consistency_sigma else "--sigma"}
    s, record = choose_consistency_sigma(inp.counts, oof, before, inp.xy, inp.spacing_px, fixed)
    log.info("local consistency: kernel width %.2f spacings, chosen by the out-of-fold spots (median r %s)", s,
             ", ".join(f"{k:g}: {v:.3f}" for k, v in record["median_pearson_by_sigma"].items()))
    return s, record


def _prediction_map(st, out_dir, shape, *, maps: int, what: str, compress: bool):
    """The float32 (super-pixels, genes) memmap a run's map is written into, once the disk is known
    to hold `maps` maps of that size (the map and the copies the steps after it make): the X of the
    staged super-res.h5ad itself (outputs.h5ad_x_memmap, never copied), or with --compress (a chunked,
    deflated X) a scratch map that _write_outputs copies."""
    st.require_space(maps * shape[0] * shape[1] * 4, what, where=out_dir)
    if compress:
        return _scratch_memmap(st.scratch(out_dir / "pred-scaled.npy"), shape)
    return h5ad_x_memmap(st.out.path(out_dir / L.SUPER_RES), shape)


def _scratch_memmap(path, shape, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    return npy_memmap(path, dtype, shape)  # reserved: a full disk is ENOSPC here, not SIGBUS later


def run_histex(directory, config: HistexConfig, *, force: bool = False, progress: bool = True):
    """Run stage 5 on DIR; returns (output directory, metrics dict or None). Under torchrun the
    ranks other than 0 return (output directory, None) once their share is done."""
    directory = Path(directory)
    config = config.validated()
    t_start = time.time()
    out_dir = Path(config.out) if config.out else directory / L.RESULTS_DIR / config.run_name
    _refuse_artifact_folder(directory, out_dir)
    leader = current().leader
    progress = progress and leader
    # the run folder is locked too: another DIR's run (--out) or an analysis may name the same folder
    own = () if out_dir.resolve() == Path(directory).resolve() else (out_dir,)
    with rank_stage(STAGE, directory, force=force, sweep=(out_dir,), lock_also=own,
                    views=(File.REPORT, L.METRICS)) as st:   # rewritten by the analysis and score --write
        inp = _read_inputs(directory, config)
        device = resolve_device(config.device)   # refused before the log says what it would recompute
        if leader:
            st.record(inputs=_artifacts_read(directory, config), parameters=config.applied_parameters())
        elif not config.model_class.trainable:
            return out_dir, None  # nothing to share out: rank 0 interpolates alone
        import torch
        torch.set_num_threads(_cpus(config))  # inference; training: one per state
        keep_freed_memory()  # each step's temporaries stay mapped (utils/core/malloc.py)
        _log_settings(config, inp, device)
        # super-pixel x spot kernel weights per width, built once when needed (interp, blend, local consistency)
        kernel_at = functools.cache(lambda s: superpixel_kernel(inp.rows, inp.cols, inp.xy, s * inp.spacing_px))

        def kernel():
            return kernel_at(config.sigma)
        if config.model_class.trainable:
            trained = _predict_trained(st, directory, out_dir, config, inp, device, progress, kernel)
            if trained is None:  # a rank > 0 under torchrun: its share is done
                return out_dir, None
            sr, cfg, histories, oof = trained
        else:
            sr, cfg, histories, oof = _interpolate(st, out_dir, inp, config, kernel)
        before = spot_sums(sr, inp.footprints)  # the maps' spot sums before consistency
        sigma_c, sigma_record = _consistency_sigma(inp, config, oof, before)
        image = _image_map(st, out_dir, inp, config, sr, oof, before)
        predicted = apply_spot_consistency(sr, config.consistency, inp.counts, inp.footprints,
                                           lambda: kernel_at(sigma_c), predicted=before)
        accuracy, cv, fusion, oof = _fuse_and_measure(inp, config, sr, oof, before, sigma_c, kernel, image)
        if fusion:
            predicted = spot_sums(sr, inp.footprints)
        log.info("spot consistency: %s; predicted/measured spot total %.3f", config.consistency,
                 predicted.sum() / max(1.0, inp.counts.sum()))
        run = {"model": config.run_name, "config": cfg, "args": {k: str(v) for k, v in config.as_parameters().items()},
               "args_unread": config.unread,   # given, but left unread by the other options (the report says so)
               "device": str(device), "spot_consistency": config.consistency, "n_tissue_superpixels": int(len(inp.rows)),
               "cross_validation": cv, "fusion": fusion, "consistency_kernel": sigma_record,
               "library_id": config.library(directory)}     # run.json, and what _write_outputs writes from
        metrics = _write_outputs(st.out, directory, out_dir, inp, sr, predicted, histories, run, t_start, accuracy,
                                 out_of_fold=oof, compress=config.compress, threads=_cpus(config))
    log.info("wrote %s (%d super-pixels x %d genes) in %.0f s", out_dir / L.SUPER_RES, len(inp.rows), len(inp.genes),
             time.time() - t_start)
    if metrics:
        s = metrics["summary"]
        log.info("scores vs truth: median Pearson r %.3f, SSIM %.3f, RMSE %.3f",
                 s["pearson"]["median"], s["ssim"]["median"], s["rmse"]["median"])
    return out_dir, metrics


def _refuse_artifact_folder(directory, out_dir) -> None:
    """A run inside DIR/features (or manifests, truth, heldout) would sit among other artifacts, which
    a rerun of their stage replaces whole."""
    for sub in L.ARTIFACT_FOLDERS:
        folder = (directory / sub).resolve()
        if out_dir.resolve().is_relative_to(folder):   # the folder itself or inside it
            raise InputError(f"--out {out_dir}: inside {folder}, which holds the artifacts of another stage; "
                             f"write the run elsewhere (default {directory / L.RESULTS_DIR}/<model>)")


def _artifacts_read(directory, config) -> list:
    """The artifacts a run reads (its manifest's inputs): a model without weights reads no features."""
    inputs = [a.path(directory) for a in (L.SPOTS, L.HR_SPOTS, L.MASK, L.CALIBRATION)]
    if config.model_class.trainable:
        inputs += [L.FEATURE_MAPS[s].path(directory) for s in config.scales + ["extra"]]
    return inputs


def _log_settings(config, inp, device) -> None:
    """The run's line, and a warning for options that change nothing or a batch of all the spots."""
    log.info("%d spots, %d genes, %d tissue super-pixels, footprint %.1f super-pixels, model %s on %s",
             inp.spots.n_obs, len(inp.genes), len(inp.rows), inp.mean_footprint, config.run_name, device)
    if config.ignored_options:
        log.warning("--model %s ignores %s: the run is the same without", config.model,
                    " ".join(config.ignored_options))
    if config.threads > (cpus := available_cpus()):
        log.warning("--threads %d is more than the %d CPUs this process may use: the threads share them (slower, "
                    "not faster; 0 chooses)", config.threads, cpus)
    for why, options in config.unused_settings.items():
        log.warning("%s: not used by this run (%s)", " ".join(options), why)
    if config.model_class.trainable and config.batch_size >= inp.spots.n_obs:
        log.warning("--batch-size %d is not below the %d spots: every epoch is one batch of all a state's "
                    "training spots (0: n / 16, at most 32)", config.batch_size, inp.spots.n_obs)


def _spots_pred(inp, predicted, name, library, images, out_of_fold=None):
    """spots-pred.h5ad: the predicted spot sums, the measured counts in layers['measured'], with
    cross-fitting each spot's out-of-fold counts (those genes-accuracy.tsv scores; NaN for a spot in
    no fold) in layers['out_of_fold']; obsm/uns 'spatial' in scanpy's Visium layout."""
    obs = inp.spots.obs[["x", "y", "x_raw", "y_raw"]].copy()
    obs["footprint_superpixels"] = inp.footprint_size
    obsm, spatial = spot_spatial(library, inp.calib, images, obs)
    return anndata.AnnData(X=predicted.astype(np.float32), obs=obs, var=inp.spots.var[[]].copy(), obsm=obsm,
                           layers={Key.MEASURED: inp.counts,
                                   **({Key.OUT_OF_FOLD: out_of_fold.astype(np.float32)} if out_of_fold is not None else {})},
                           uns={"model": name, **spatial})


def _write_outputs(out, directory, out_dir, inp, sr, predicted, histories, run, t_start, accuracy=None, *,
                   out_of_fold=None, compress=False, threads=None):
    """super-res.h5ad, spots-pred.h5ad, maps/, loss.png, genes-accuracy.tsv (with cross-fitting),
    metrics.json (with truth), run.json and report.html, staged in `out`; returns the metrics (None
    without truth). Both h5ad files carry obsm/uns 'spatial' (scanpy's Visium layout); compress:
    super-res.h5ad's X gzip'd (--compress); threads: the CPUs its compression and the scores use."""
    uns = {"model": run["model"], "config": json.dumps(run["config"], sort_keys=True),
           "spot_consistency": run["spot_consistency"], "pixel_size_um": inp.calib["pixel_size_um"],
           "raw_pixel_size_um": inp.calib["raw_pixel_size_um"], "superpixel_um": geo.SUPER_PIXEL_UM,
           "units": "counts per 8 um super-pixel"}
    var = inp.spots.var[["scale_min", "scale_max"]].copy()
    if accuracy is not None:
        by_gene = accuracy.set_index("gene")
        var[["cv_pearson", "cv_pearson_reference"]] = by_gene.loc[var.index, ["cv_pearson", "cv_pearson_reference"]]
        accuracy.to_csv(out.path(out_dir / L.GENES_ACCURACY), sep="\t", index=False, float_format="%.4f")
    images = tissue_images(directory, inp.calib)     # uns['spatial'] of both h5ad files
    obs = superpixel_obs(inp.rows, inp.cols, inp.calib["scale"])
    obsm, spatial = superpixel_spatial(run["library_id"], inp.calib, images, obs)
    in_place = out.staged(out_dir / L.SUPER_RES)   # the map was computed in its X (_prediction_map)
    if in_place:
        complete_h5ad(in_place, obs, var, {**uns, **spatial}, obsm=obsm)
    else:
        write_h5ad_streamed(out.path(out_dir / L.SUPER_RES), obs, var, sr, {**uns, **spatial}, obsm=obsm,
                            compress=compress, threads=threads)
    _spots_pred(inp, predicted, run["model"], run["library_id"], images, out_of_fold).write_h5ad(out.path(out_dir / L.SPOTS_PRED))
    write_gene_maps(out.path(out_dir / L.GENE_MAPS), L.read_preview(directory, inp.calib), inp.rows, inp.cols, sr,
                    inp.plot_genes, inp.genes)
    if histories:
        write_loss_plot(out.path(out_dir / L.LOSS_PLOT), histories)
    metrics = None
    if L.TRUTH.path(directory).is_file():   # a truth it cannot use is a warning: the run is kept
        from ..evaluation.score import score_data_directory_truth
        metrics = score_data_directory_truth(inp.rows, inp.cols, sr, inp.genes, L.TRUTH.path(directory), threads=threads)
    if metrics:
        metrics["model"] = run["model"]
        out.write_json(out_dir / L.METRICS, metrics)
    for optional in (L.GENES_ACCURACY, L.LOSS_PLOT, L.METRICS):   # an earlier run's, not of these maps
        if not out.staged(out_dir / optional):
            out.discard(out_dir / optional)
    out.write_json(out_dir / L.RUN_JSON, {**run, "seconds": time.time() - t_start})
    write_report(out, out_dir, directory=directory)
    return metrics

