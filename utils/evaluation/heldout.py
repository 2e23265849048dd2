"""The held-out spots of a protocol folder (`python -m utils.protocols make`) and the scoring of
runs at them: each run's super-pixel counts summed over every held-out spot's footprint, per-gene
Pearson r across the held-out spots against the measured counts, next to the nearest-training-spot
baseline (`python -m utils.protocols score`)."""
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..core import geometry as geo
from ..core import layout as L
from ..core import manifest as mf
from ..core.errors import InputError
from ..core.h5ad_io import read_anndata, read_maps
from ..core.raw_io import examples, match_spots, read_counts, read_locs
from ..core.text_io import json_object, positive_number, require_file
from ..scverse.keys import Key
from .metrics import pearson_per_gene

log = logging.getLogger("trihrge")

MAKE_AGAIN = "write the folder again with `python -m utils.protocols make` and rerun the five stages"


def _protocol_record(d: Path) -> dict:
    """protocol.json: which protocol, and the held-out spots' radius in raw pixels."""
    from .protocols import PROTOCOLS
    fix = f"a damaged protocol folder: {MAKE_AGAIN}"
    rec = json_object(d / "protocol.json", ("protocol", "radius_raw_px", "heldout_spots"), fix)
    radius = rec["radius_raw_px"]
    if rec["protocol"] not in PROTOCOLS or not positive_number(radius):
        raise InputError(f"{d / 'protocol.json'}: protocol {rec['protocol']!r}, radius_raw_px {radius!r} (expected one "
                         f"of {', '.join(PROTOCOLS)} and a positive number); {fix}")
    return rec


def _spots(folder: Path) -> tuple:
    """(counts: spots x genes DataFrame, locs: DataFrame x, y in raw px) of a raw-layout folder, both
    indexed by spot id in the counts' order, checked by the stages' own readers."""
    try:
        ids, genes, X = read_counts(folder)
        locs, locs_path = read_locs(folder)
        locs = match_spots(ids, locs, folder / "cnts.tsv.gz", locs_path)
    except InputError as e:
        raise InputError(f"{str(e).split('; ')[0]} (a damaged protocol folder); {MAKE_AGAIN}") from None
    return pd.DataFrame(X.astype(np.float64), index=ids, columns=genes), locs   # as integers: exact


def _check_on_image(locs, calib, path) -> None:
    """A held-out spot off the section's image has no footprint: it would be scored as predicted 0."""
    xy = locs[["x", "y"]].to_numpy() * calib["scale"]
    h, w = np.asarray(calib["superpixel_grid"]) * calib["superpixel_px"]
    off = locs.index[(xy < 0).any(axis=1) | (xy[:, 0] >= w) | (xy[:, 1] >= h)]
    if len(off):
        raise InputError(f"{path}: {len(off)} held-out spot(s) off the section's image ({examples(off)}); "
                         f"{MAKE_AGAIN}")


class HeldOut:
    """The held-out spots of a protocol folder: their counts, raw positions and footprints, and the
    training spots (for the nearest-spot baseline). The genes scored are the n_genes most variable
    held-out genes that the runs predict (choose_genes; else at the first run read)."""

    def __init__(self, directory, n_genes=100):
        d = self.directory = Path(directory)
        if not (d / "protocol.json").is_file():
            raise InputError(f"{d}: not a protocol folder (no protocol.json); score runs made in DST/results/<run> "
                             f"of a folder written by `python -m utils.protocols make ... --directory DST`")
        self.protocol = _protocol_record(d)
        self.counts, self.locs = _spots(d / L.HELDOUT_DIR)
        self.train_counts, self.train_locs = _spots(d)
        self.calib = L.read_json(L.CALIBRATION, d, keys=("scale", "superpixel_grid", "superpixel_px"))
        _check_on_image(self.locs, self.calib, d / L.HELDOUT_DIR / "locs-raw.tsv")
        self.n_genes, self.genes = n_genes, None

    def choose_genes(self, predicted_genes):
        """Score the n_genes most variable held-out genes among those predicted."""
        common = self.counts.columns[self.counts.columns.isin(predicted_genes)]
        self.genes = list(self.counts[common].var().sort_values(ascending=False).index[:self.n_genes])

    def footprint_sums(self, run_dir) -> pd.DataFrame:
        """(held-out spots, genes) float64: a run's super-pixel counts summed over each held-out footprint,
        for every gene of the run that the held-out counts have."""
        p = require_file(Path(run_dir) / L.SUPER_RES, fix="give run directories written by HISTEX.py (DST/results/<run>)")
        sr = read_maps(p, "rerun HISTEX.py")
        genes = sr.var_names[sr.var_names.isin(self.counts.columns)]
        if len(genes) == 0:
            raise InputError(f"{p}: none of its genes is among the held-out genes of {self.directory}; score runs "
                             f"made on this protocol folder")
        lookup = np.full(tuple(self.calib["superpixel_grid"]), -1)
        lookup[sr.obs["row"].to_numpy(), sr.obs["col"].to_numpy()] = np.arange(sr.n_obs)
        scale = self.calib["scale"]
        M = geo.footprint_matrix(self.locs[["x", "y"]].to_numpy() * scale, self.protocol["radius_raw_px"] * scale,
                                 lookup, sr.n_obs, dtype=np.float64)
        X = np.asarray(sr.X[:, sr.var_names.get_indexer(genes)], dtype=np.float64)
        return pd.DataFrame(np.asarray(M @ X), index=self.locs.index, columns=genes)

    def predicted(self, run_dir):
        """(held-out spots, genes) float64: footprint_sums of the scored genes."""
        sums = self.footprint_sums(run_dir)
        if self.genes is None:
            self.choose_genes(sums.columns)
        return sums[self.genes].to_numpy()

    def measured(self):
        """(held-out spots, genes) float64 measured counts of the scored genes."""
        return self.counts[self.genes].to_numpy(float)

    def nearest_spot(self):
        """(held-out spots, genes): the counts of the nearest training spot (the copy baseline)."""
        _, nn = cKDTree(self.train_locs[["x", "y"]].to_numpy()).query(self.locs[["x", "y"]].to_numpy())
        return self.train_counts[self.genes].to_numpy(float)[nn]

    def check_current(self, run_dir):
        """Refuse a run that this folder no longer matches (it was written again after the run), as HISTEX
        refuses stale upstream artifacts: a stage's inputs changed since it ran, or the run was trained on
        other spots than the folder's training spots now."""
        d, run_dir = self.directory, Path(run_dir)
        fix = f"rerun the five stages on {d} and HISTEX.py for {run_dir.name}, then score it again"
        for stage in mf.upstream_closure("HISTEX"):
            problems = mf.out_of_date(d, stage) if mf.manifest_path(d, stage).is_file() else []
            if problems:
                raise InputError(f"{problems[0]}; {fix}")
        p = run_dir / L.SPOTS_PRED
        if p.is_file() and not self._trained_here(read_anndata(p, "rerun HISTEX.py")):
            raise InputError(f"{run_dir}: trained on other spots than the training spots of {d} now (the folder was "
                             f"written again after the run), so the run is stale; {fix}")

    def _trained_here(self, spots) -> bool:
        """The run's measured spots are training spots of this folder, with the same counts."""
        t = self.train_counts
        if Key.MEASURED not in spots.layers or not (spots.obs_names.isin(t.index).all()
                                                    and spots.var_names.isin(t.columns).all()):
            return False
        here = t.loc[spots.obs_names, spots.var_names].to_numpy(np.float64)
        return bool(np.array_equal(np.asarray(spots.layers[Key.MEASURED], np.float64), here))


def _folders(run_dirs) -> dict:
    """{protocol folder: [its runs]} in the order given (a run named twice is scored once); each run
    is scored at the held-out spots of its own folder, DST of DST/results/<run>."""
    folders, seen = {}, set()
    for r in map(Path, run_dirs):
        if not r.is_dir():
            raise InputError(f"{r}: {'not a directory' if r.exists() else 'not found'}; give run directories "
                             f"written by HISTEX.py (DST/results/<run> of a protocol folder DST)")
        if r.resolve() not in seen:
            seen.add(r.resolve())
            folders.setdefault(r.resolve().parent.parent, []).append(r)
    return folders


# a run by its folder's name, else as folder/run (the data directory's name): runs of several sections
RUN_NAMINGS = (lambda r: r.name, lambda r: f"{Path(r).resolve().parent.parent.name}/{r.name}")


def unique_labels(paths, ways) -> dict:
    """{path: label} by the first way of naming that tells all the paths apart."""
    for way in ways:
        labels = {p: way(p) for p in paths}
        if len(set(labels.values())) == len(labels):
            return labels
    return {p: str(p) for p in paths}


def _score_folder(held, runs, labels, baseline, log1p):
    """(genes, {label: per-gene Pearson r}) of a folder's runs and the copy baseline (labelled `baseline`),
    on genes all its runs predict: runs of other gene sets are compared on the same genes."""
    f = np.log1p if log1p else (lambda v: v)
    for r in runs:
        held.check_current(r)
    sums = {r: held.footprint_sums(r) for r in runs}
    shared = [g for g in sums[runs[0]].columns if all(g in s.columns for s in sums.values())]
    if not shared:
        raise InputError(f"{held.directory}: its runs {examples(r.name for r in runs)} predict no gene in common; "
                         f"score runs of the same gene set together")
    if any(len(s.columns) > len(shared) for s in sums.values()):
        log.warning("%s: the runs predict different genes; scoring the %d genes all of them predict",
                    held.directory, len(shared))
    held.choose_genes(shared)
    results = {labels[r]: pearson_per_gene(f(sums[r][held.genes].to_numpy()), f(held.measured())) for r in runs}
    results[baseline] = pearson_per_gene(f(held.nearest_spot()), f(held.measured()))
    return held.genes, results


def pearson_by_folder(run_dirs, n_genes=100, log1p=False) -> list:
    """[(protocol folder, protocol record, genes, {label: per-gene Pearson r at its held-out spots})], one per
    protocol folder of the runs, over the n_genes most variable held-out genes that all its runs predict.
    A label is the run's name, or folder/name where names repeat; "nearest spot" is the copy baseline
    ("nearest spot (folder)" with several folders). log1p: of log1p counts."""
    folders = _folders(run_dirs)
    runs = [r for rs in folders.values() for r in rs]
    labels = unique_labels(runs, RUN_NAMINGS)
    baseline = unique_labels(list(folders), (lambda d: "nearest spot",) if len(folders) == 1 else
                              (lambda d: f"nearest spot ({d.name})", lambda d: f"nearest spot ({d})"))
    out = []
    for d, rs in folders.items():
        held = HeldOut(d, n_genes)
        genes, results = _score_folder(held, rs, labels, baseline[d], log1p)
        out.append((d, held.protocol, genes, results))
    return out


def _one_folder(scored):
    if len(scored) > 1:
        raise InputError(f"{scored[1][0]}: the runs come from {len(scored)} protocol folders; pass the runs of one "
                         f"folder (python -m utils.protocols score takes several)")
    return scored[0]


def heldout_pearson(run_dirs, n_genes=100, log1p=False):
    """(protocol record, genes, {label: per-gene Pearson r}) of runs of one protocol folder (pearson_by_folder)."""
    _, proto, genes, results = _one_folder(pearson_by_folder(run_dirs, n_genes, log1p))
    return proto, genes, results


def summary(results) -> dict:
    return {k: {"median": float(np.median(v)), "mean": float(np.mean(v))} for k, v in results.items()}


def score(run_dirs, n_genes=100):
    """(protocol record, {label: median and mean per-gene r}) of runs of one protocol folder."""
    proto, _, results = heldout_pearson(run_dirs, n_genes)
    return proto, summary(results)
