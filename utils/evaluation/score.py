"""Score super-resolution runs against truth: `python -m utils.score RUN_DIR [RUN_DIR ...]`.

Per gene, prediction and truth are min-max scaled inside the truth mask, then Pearson r, SSIM
(data_range 1) and RMSE; medians and means over genes. Several runs print one comparison table."""
import logging
from pathlib import Path

import numpy as np

from ..core.cli import Parser, path_arg, setup_logging
from ..core.errors import InputError
from ..core.h5ad_io import read_maps
from ..core.layout import METRICS, data_directory_of
from ..core.raw_io import examples, unknown_names
from ..core.stage import run_folder_in_use, run_folder_stage
from ..report import write_report
from .heldout import RUN_NAMINGS, unique_labels
from .metrics import SSIM_WINDOW, align_to_truth, extent, score_maps, ssim_fits
from .truth import read_truth

log = logging.getLogger("trihrge")

TRUTH_FIX = ("pass --truth a super.h5ad with one observation per super-pixel (obs row/col), as the simulator and the "
             "converters' --truth write")
DIR_TRUTH_FIX = ("replace it by this section's truth (one observation per 8 um super-pixel, obs row/col) or remove it; "
                 "python -m utils.score RUN_DIR --truth F --write scores the run later")
# shares of super-pixels in common: a truth sharing less than REFUSED of its own with the run is another
# section's or grid's; less than WARNED of its own or of the run's is said
REFUSED, WARNED = 0.1, 0.5


def score_arrays(rows, cols, X, genes, truth, truth_path, threads=None):
    """Scores of the map X (super-pixels (rows, cols) x genes) against `truth` (read_truth of
    truth_path), with the file and how much of the truth and of the run the other covers; InputError
    naming truth_path when they share no gene or hardly a super-pixel."""
    P, T, t_rows, t_cols, g, coverage = align_to_truth(rows, cols, X, genes, truth)
    _check_genes(genes, g, truth.var_names, truth_path)
    run_coverage = _check_overlap(coverage, len(t_rows), len(rows), truth_path)
    with_ssim = ssim_fits(t_rows, t_cols)
    if not with_ssim:
        log.warning("%s: the truth spans %d x %d super-pixels, thinner than the %d x %d SSIM window; SSIM is not "
                    "computed (NaN), Pearson r and RMSE are", truth_path, *extent(t_rows, t_cols), SSIM_WINDOW,
                    SSIM_WINDOW)
    m = score_maps(P, T, t_rows, t_cols, g, threads=threads, with_ssim=with_ssim)
    m.update(truth=str(Path(truth_path).resolve()), truth_coverage=coverage, run_coverage=run_coverage)
    return m


def _check_genes(genes, shared, truth_genes, truth_path) -> None:
    """Refuse a truth without any predicted gene, warn about the predicted genes it lacks; either
    says how many names differ from a truth gene only by case (gene symbols do between references)."""
    if len(shared) == len(genes):
        return
    missing = [g for g in genes if g not in set(shared)]
    lower = set(truth_genes.str.lower())
    by_case = [g for g in missing if g.lower() in lower]
    case = (f"{len(by_case)} of them differ from a truth gene only by case ({unknown_names(by_case, truth_genes)}): "
            f"rename them on one side") if by_case else ""
    if not shared:
        raise InputError(f"{truth_path}: shares no gene with the run's {len(genes)}; " + (
            case or f"the run has {examples(genes)}, the truth {examples(truth_genes)}: score a run made on the same "
                    f"data set"))
    log.warning("%s: %d of the %d predicted genes have no truth (%s)%s; scored over the other %d", truth_path,
                len(missing), len(genes), unknown_names(missing, truth_genes), f"; {case}" if case else "", len(shared))


def _check_overlap(coverage, n_truth, n_run, truth_path) -> float:
    """The share of the run's super-pixels that have a truth, from `coverage`, the share of the
    truth's that have a prediction; refused or said as REFUSED and WARNED set."""
    shared = round(coverage * n_truth)
    run_coverage = shared / n_run
    said = (f"{shared} super-pixel(s) in common with the run: {100 * coverage:.2f}% of the truth's {n_truth}, "
            f"{100 * run_coverage:.2f}% of the run's {n_run}")
    if coverage < REFUSED:
        raise InputError(f"{truth_path}: only {said} (another section, or another grid); score against the truth of "
                         f"this section, on the 8 um super-pixel grid of its H&E image")
    if min(coverage, run_coverage) < WARNED:
        log.warning("%s: %s; the scores hold for those (the run's super-pixels without truth are not scored, the "
                    "truth's without prediction count as 0)", truth_path, said)
    return run_coverage


def score_data_directory_truth(rows, cols, X, genes, truth_path, *, threads=None):
    """HISTEX's scores against DIR/truth/super.h5ad, or None with one warning when that truth cannot
    be used: it is optional, and the run it would score is kept."""
    try:
        return score_arrays(rows, cols, X, genes, read_truth(truth_path, DIR_TRUTH_FIX), truth_path, threads=threads)
    except InputError as e:
        log.warning("%s (the run is written without scores)", e)
        return None


def _super_res(run_dir: Path) -> Path:
    sr_p = Path(run_dir) / "super-res.h5ad"
    if not sr_p.is_file():
        raise InputError(f"{sr_p}: not found; give a run directory written by HISTEX.py (DIR/results/<model>)")
    return sr_p


def score_run(run_dir, truth_path=None):
    run_dir = Path(run_dir).resolve()   # DIR/truth and the run's name from where it is, also for `.`
    sr_p = _super_res(run_dir)
    truth_path = Path(truth_path) if truth_path else run_dir.parent.parent / "truth" / "super.h5ad"
    if not truth_path.is_file():
        where = "" if data_directory_of(run_dir) else (f" ({run_dir} is not in a data directory's results/ folder, "
                                                       f"e.g. written with HISTEX.py --out, so its DIR/truth is unknown)")
        raise InputError(f"{truth_path}: no truth to score against{where}; pass --truth PATH (a super.h5ad with obs "
                         f"row/col, e.g. DIR/truth/super.h5ad)")
    sr = read_maps(sr_p, "rerun HISTEX.py")
    truth = read_truth(truth_path, TRUTH_FIX)
    X = sr.X if hasattr(sr.X, "tocsc") else np.asarray(sr.X)   # sparse: read by columns (metrics.OnTruth)
    m = score_arrays(sr.obs["row"].to_numpy(np.int64), sr.obs["col"].to_numpy(np.int64), X, list(sr.var_names),
                     truth, truth_path)
    m["model"] = sr.uns.get("model", run_dir.name)
    return m


def format_table(results):
    head = f"{'run':32s} {'r median':>9s} {'r mean':>8s} {'SSIM med':>9s} {'SSIM mean':>9s} {'RMSE med':>9s}"
    lines = [head, "-" * len(head)]
    for name, m in results:
        s = m["summary"]
        lines.append(f"{name:32s} {s['pearson']['median']:9.4f} {s['pearson']['mean']:8.4f} {s['ssim']['median']:9.4f} "
                     f"{s['ssim']['mean']:9.4f} {s['rmse']['median']:9.4f}")
    return "\n".join(lines)


def main(argv=None):
    p = Parser(prog="python -m utils.score", description=__doc__)
    p.add_argument("runs", nargs="+", type=path_arg, help="run directories (each holds super-res.h5ad)")
    p.add_argument("--truth", type=path_arg, default=None,
                   help="truth super.h5ad (default: DIR/truth/super.h5ad for a run in DIR/results/<model>)")
    p.add_argument("--write", action="store_true", help="also write metrics.json into each run directory")
    args = p.parse_args(argv)
    setup_logging(True)
    results = []
    runs = [Path(r).resolve() for r in args.runs]   # `.` has a name, and DIR/truth is found from it
    if args.write:   # every run checked first: an error writes no run's metrics.json
        for r in runs:
            _super_res(r)
            busy = run_folder_in_use(r, data_directory_of(r))
            if busy:
                raise InputError(busy)
    for r in runs:
        if args.write:   # locked as the analysis is, read and written under the lock (a HISTEX rerun waits)
            directory = data_directory_of(r)
            with run_folder_stage("score", r, directory) as st:
                m = score_run(r, args.truth)
                st.out.write_json(r / METRICS, m)
                write_report(st.out, r, directory=directory)   # it shows metrics.json: committed with it
        else:
            m = score_run(r, args.truth)
        results.append((r, m))
    labels = unique_labels(runs, RUN_NAMINGS)   # runs of two sections are both 'trihrge'
    print(format_table([(labels[r], m) for r, m in results]))
    return 0
