"""Stage 5 logic (HISTEX.py): train TriHRGE (or a baseline) on the spots, predict every tissue
super-pixel, map predictions back to counts, write the outputs and, when truth exists, the scores."""
import hashlib
import json
import logging
import time
from pathlib import Path

import anndata
import numpy as np
import torch

from ..core import geometry as geo
from ..core.atomic import StagedOutputs, remove_stale_temporaries
from .image_calibration import load_calibration
from ..core.errors import InputError
from ..spots.genes import scale_counts
from ..core.image_io import read_png
from ..superres.consistency import global_rescale_factors, kernel_weights, local_rescale_factors, spot_sums
from ..core.manifest import check_upstream, write_manifest
from ..superres.inputs import GeneTokens, gather_windows, load_feature_maps, spot_windows
from ..superres.predict import predict_tissue
from ..superres.outputs import superpixel_obs, write_gene_maps, write_h5ad_streamed, write_loss_plot
from ..superres.train import load_state, resolve_device, train_state

log = logging.getLogger("trihrge")
STAGE = "HISTEX"
DEFAULT_CONSISTENCY = {"trihrge": "local", "mlp": "global", "interp": "none"}


def run_name(a):
    name = a["model"]
    for flag, tag in (("no_macro", "nomacro"), ("no_multiscale", "micro"), ("no_gene_tokens", "notokens"),
                      ("no_linear_head", "nohead")):
        if a.get(flag):
            name += f"-{tag}"
    return name


def _config(a, dims, n_genes, half):
    opts = {}
    if a["model"] == "trihrge":
        opts = {"d": a["d_model"], "heads": a["heads"], "depth": a["depth"], "dropout": a["dropout"],
                "head_hidden": a["head_hidden"],
                "use_gene_tokens": not a["no_gene_tokens"], "use_linear_head": not a["no_linear_head"]}
    return {"model": a["model"], "dims": dims, "n_genes": n_genes, "half": half, "stride": a["stride"] or auto_stride(a["model"], half),
            "model_opts": opts, "lr": a["lr"], "weight_decay": a["weight_decay"], "batch_size": a["batch_size"],
            "epochs": a["epochs"], "val_fraction": a["val_fraction"], "patience": a["patience"], "loss": a["loss"], "token_mask": a["token_mask"], "k_tokens": a["k_tokens"]}


def auto_stride(model, half):
    """Inference window spacing: the MLP sees one super-pixel at a time, so windows need not
    overlap (same values, ~5x less work); TriHRGE's overlapping windows hide window borders."""
    return 2 * half + 1 if model == "mlp" else max(3, half)


def _fingerprint(cfg, data_fp):
    """Identity of a trained state: training settings and data (inference-only settings excluded)."""
    train_cfg = {k: v for k, v in cfg.items() if k != "stride"}
    blob = json.dumps({"cfg": train_cfg, "data": data_fp}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _tissue_index(mask):
    rows, cols = np.nonzero(mask)
    return rows.astype(np.int64), cols.astype(np.int64)


def _footprint_pairs(xy, radius, mask):
    """Flat (spot, tissue super-pixel) pairs of every spot footprint, and footprint sizes."""
    lookup = np.full(mask.shape, -1, dtype=np.int64)
    rows, cols = _tissue_index(mask)
    lookup[rows, cols] = np.arange(len(rows))
    si, rr, cc = geo.footprints(xy[:, 0], xy[:, 1], radius, mask.shape)
    full_size = np.bincount(si, minlength=len(xy))
    tj = lookup[rr, cc]
    keep = tj >= 0
    return si[keep], tj[keep], full_size


def spot_arrays(spots):
    """From spots.h5ad: counts, centres (x, y), the genes' min-max scaling bounds and the scaled
    training target."""
    counts = np.asarray(spots.X, dtype=np.float32)
    lo = spots.var["scale_min"].to_numpy(np.float32)
    hi = spots.var["scale_max"].to_numpy(np.float32)
    return counts, spots.obs[["x", "y"]].to_numpy(np.float64), lo, hi, scale_counts(counts, lo, hi)


def training_data(directory, a, spots, hr, grid_shape):
    """Everything a network trains on: the feature windows around each spot, its footprint in the
    window, its scaled target and its gene tokens (with and without its own HR spots)."""
    _, xy, lo, hi, target = spot_arrays(spots)
    radius, lattice = float(spots.uns["radius_px"]), spots.uns["lattice"]
    scales = ["micro"] if a["no_multiscale"] else [s for s in ("micro", "meso", "macro") if not (a["no_macro"] and s == "macro")]
    maps = load_feature_maps(directory, scales + ["extra"])
    feat_inputs = [directory / "features" / f"{s}.npy" for s in scales + ["extra"]]
    dims = {k: int(m.shape[-1]) for k, m in maps.items()}
    wr, wc, half, fp = spot_windows(xy, radius, grid_shape)
    cfg = _config(a, dims, target.shape[1], half)
    hist, _ = gather_windows(maps, wr, wc, half)
    hr_scaled = np.clip(scale_counts(np.asarray(hr.X, dtype=np.float32), lo, hi), 0, None)
    tokens = GeneTokens(hr.obs[["x", "y"]].to_numpy(), hr_scaled, hr.obsm["sources"], lattice["spacing_px"], a["k_tokens"])
    cx, cy = geo.superpixel_centres(wr, wc)
    centres = np.stack([cx, cy], 1)
    tf, of, hf = tokens.query(centres)
    tl, ol, hl = tokens.query(centres, exclude_spot=np.arange(len(xy)))
    data = {"hist": hist, "fp": fp.astype(np.float32), "target": target, "hr_expr": tokens.expr,
            "tok_full": tf, "offs_full": of, "hid_full": hf, "tok_lso": tl, "offs_lso": ol, "hid_lso": hl}
    data_fp = {"spots": hashlib.sha256(target.tobytes()).hexdigest()[:16],
               "features": hashlib.sha256(b"".join(np.ascontiguousarray(v[:64]).tobytes() for v in hist.values())).hexdigest()[:16]}
    return cfg, data, maps, tokens, data_fp, feat_inputs


def run_histex(directory, a, progress=True):
    directory = Path(directory)
    t_start = time.time()
    remove_stale_temporaries(directory)
    check_upstream(directory, STAGE, force=a["force"], log=log)
    from ..histology.tissue_mask import load_mask
    calib = load_calibration(directory)
    spots = anndata.read_h5ad(directory / "spots.h5ad")
    hr = anndata.read_h5ad(directory / "hr-spots.h5ad")
    lattice = spots.uns["lattice"]
    radius = float(spots.uns["radius_px"])
    mask = load_mask(directory)
    genes = list(spots.var_names)
    counts, xy, lo, hi, _ = spot_arrays(spots)
    plot_genes = a["plot_genes"] or genes[:4]
    unknown = [g for g in plot_genes if g not in genes]
    if unknown:
        raise InputError(f"--plot-genes: {', '.join(unknown[:3])} not among the {len(genes)} selected genes "
                         f"(see {directory / 'genes.tsv'})")
    if mask.shape != tuple(calib["superpixel_grid"]):
        raise InputError(f"{directory / 'mask.png'}: grid {mask.shape} does not match he.tif's super-pixel grid "
                         f"{tuple(calib['superpixel_grid'])}; rerun masking_non_tissue.py")
    rows, cols = _tissue_index(mask)
    if len(rows) == 0:
        raise InputError(f"{directory / 'mask.png'}: no tissue in the mask; rerun masking_non_tissue.py "
                         f"(perhaps with a lower --threshold)")
    si, tj, fp_size = _footprint_pairs(xy, radius, mask)
    if len(si) == 0:
        raise InputError(f"{directory / 'mask.png'}: no spot footprint overlaps the tissue mask; check the mask "
                         f"(mask-overlay.png) and the spot coordinates")
    n_fp = float(np.mean(fp_size))
    out_dir = Path(a["out"]) if a["out"] else directory / "results" / run_name(a)  # made once inputs pass
    states_dir = out_dir / "states"
    device = resolve_device(a["device"])
    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    log.info("%d spots, %d genes, %d tissue super-pixels, footprint %.1f super-pixels, model %s on %s",
             len(xy), len(genes), len(rows), n_fp, run_name(a), device)

    inputs = [directory / n for n in ("spots.h5ad", "hr-spots.h5ad", "mask.png", "calibration.json")]
    histories = []
    if a["model"] == "interp":
        # image-free baseline: Gaussian-kernel interpolation of spot counts per super-pixel
        cx, cy = geo.superpixel_centres(rows, cols)
        W = kernel_weights(np.stack([cx, cy], 1), xy, a["sigma"] * lattice["spacing_px"])
        sr = np.asarray(W @ (counts / n_fp), dtype=np.float32)
        cfg = {"model": "interp", "sigma_spacings": a["sigma"]}
    else:
        cfg, data, maps, tokens, data_fp, feat_inputs = training_data(directory, a, spots, hr, mask.shape)
        inputs += feat_inputs
        fp_id = _fingerprint(cfg, data_fp)
        models = []
        for s in range(a["n_states"]):
            seed = a["seed"] * 1000 + s
            pt, meta_p = states_dir / f"state-{s:02d}.pt", states_dir / f"state-{s:02d}.json"
            meta = json.loads(meta_p.read_text()) if meta_p.is_file() else None
            if meta and meta.get("fingerprint") == fp_id and pt.is_file() and not a["retrain"]:
                log.info("state %d/%d: already trained with these inputs and settings, reusing it", s + 1, a["n_states"])
            else:
                t0 = time.time()
                state, info = train_state(cfg, data, seed, device, progress, desc=f"state {s + 1}/{a['n_states']}")
                dt = time.time() - t0
                with StagedOutputs() as out:
                    torch.save(state, out.path(pt))
                    out.write_json(meta_p, {"fingerprint": fp_id, "seed": seed, "epochs": cfg["epochs"], **info,
                                            "seconds": dt,
                                            "spot_epochs_per_second": info["train_spots"] * info["epochs_run"] / max(1e-9, dt)})
                meta = json.loads(meta_p.read_text())
                stop = (f"stopped after {info['epochs_run']} epochs, best held-out loss at epoch {info['best_epoch']}"
                        if info["epochs_run"] < cfg["epochs"] else f"{info['epochs_run']} epochs")
                log.info("state %d/%d: %s, final loss %.5f, in %.0f s", s + 1, a["n_states"], stop,
                         info["loss_history"][-1], dt)
            histories.append((meta["loss_history"], meta.get("val_history", [])))
            models.append(load_state(cfg, pt, device))
        t_pred = time.time()
        out_dir.mkdir(parents=True, exist_ok=True)
        pred_scaled = np.lib.format.open_memmap(out_dir / ".tmp-pred-scaled.npy", mode="w+", dtype=np.float32,
                                                shape=(len(rows), len(genes)))
        predict_tissue(models, cfg, maps, tokens, rows, cols, device, batch=a["batch_windows"], progress=progress,
                       out=pred_scaled)
        log.info("predicted %d super-pixels with %d state(s) in %.0f s", len(rows), len(models), time.time() - t_pred)
        # counts per super-pixel: a spot's footprint mean maps to its count / footprint size (iStar)
        sr = pred_scaled
        for s0 in range(0, len(rows), 65536):
            sr[s0:s0 + 65536] = (lo + pred_scaled[s0:s0 + 65536] * (hi - lo)) / n_fp

    consistency = a["spot_consistency"] if a["spot_consistency"] != "auto" else DEFAULT_CONSISTENCY[a["model"]]
    predicted_spots = spot_sums(sr, si, tj, len(xy))
    if consistency == "global":
        sr *= global_rescale_factors(counts, predicted_spots)
    elif consistency == "local":
        cx, cy = geo.superpixel_centres(rows, cols)
        W = kernel_weights(np.stack([cx, cy], 1), xy, a["sigma"] * lattice["spacing_px"])
        for s0 in range(0, len(rows), 16384):  # chunks bound the dense (chunk x genes) factors
            sr[s0:s0 + 16384] *= local_rescale_factors(counts, predicted_spots, W[s0:s0 + 16384])
    predicted_spots = spot_sums(sr, si, tj, len(xy))
    log.info("spot consistency: %s; predicted/measured spot total %.3f", consistency,
             predicted_spots.sum() / max(1.0, counts.sum()))

    # outputs
    scale = calib["scale"]
    uns = {"model": run_name(a), "config": json.dumps(cfg, sort_keys=True), "spot_consistency": consistency,
           "pixel_size_um": calib["pixel_size_um"], "raw_pixel_size_um": calib["raw_pixel_size_um"],
           "superpixel_um": geo.SUPER_PIXEL_UM, "units": "counts per 8 um super-pixel"}
    metrics = None
    with StagedOutputs() as out:
        write_h5ad_streamed(out.path(out_dir / "super-res.h5ad"), superpixel_obs(rows, cols, scale),
                            spots.var[["scale_min", "scale_max"]].copy(), sr, uns)
        sp_obs = spots.obs[["x", "y", "x_raw", "y_raw"]].copy()
        sp_obs["footprint_superpixels"] = fp_size
        sp_ad = anndata.AnnData(X=predicted_spots.astype(np.float32), obs=sp_obs, var=spots.var[[]].copy(),
                                layers={"measured": counts}, uns={"model": run_name(a)})
        sp_ad.write_h5ad(out.path(out_dir / "spots-pred.h5ad"))
        he_small = read_png(directory / "he-small.png")
        write_gene_maps(out.path(out_dir / "maps"), he_small, rows, cols, sr, plot_genes, genes)
        if histories:
            write_loss_plot(out.path(out_dir / "loss.png"), histories)
        truth_p = directory / "truth" / "super.h5ad"
        if truth_p.is_file():
            from ..evaluation.score import score_arrays
            metrics = score_arrays(rows, cols, sr, genes, anndata.read_h5ad(truth_p))
            metrics["model"] = run_name(a)
            out.write_json(out_dir / "metrics.json", metrics)
        out.write_json(out_dir / "run.json", {"model": run_name(a), "config": cfg, "args": {k: str(v) for k, v in a.items()},
                                               "seconds": time.time() - t_start, "device": str(device),
                                               "spot_consistency": consistency, "n_tissue_superpixels": int(len(rows))})
        outputs = [f for f in out.finals if f.is_file()]
    (out_dir / ".tmp-pred-scaled.npy").unlink(missing_ok=True)
    write_manifest(directory, STAGE, {k: (str(v) if isinstance(v, Path) else v) for k, v in a.items()}, inputs, outputs)
    log.info("wrote %s (%d super-pixels x %d genes) in %.0f s", out_dir / "super-res.h5ad", len(rows), len(genes),
             time.time() - t_start)
    if metrics:
        s = metrics["summary"]
        log.info("scores vs truth: median Pearson r %.3f, SSIM %.3f, RMSE %.3f",
                 s["pearson"]["median"], s["ssim"]["median"], s["rmse"]["median"])
    return out_dir, metrics
