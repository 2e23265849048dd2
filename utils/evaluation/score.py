"""Score super-resolution runs against truth: `python -m utils.score RUN_DIR [RUN_DIR ...]`.

Per gene, prediction and truth are min-max scaled inside the truth mask, then Pearson r, SSIM
(data_range 1) and RMSE; medians and means over genes. Several runs print one comparison table."""
import logging
from pathlib import Path

import numpy as np

from ..core.cli import Parser, path_arg, setup_logging
from ..core.errors import InputError
from ..core.h5ad_io import check_finite_values, check_grid_positions, read_anndata
from ..core.layout import METRICS, data_directory_of
from ..core.raw_io import examples
from ..core.stage import run_folder_in_use, run_folder_stage
from .metrics import align_to_truth, score_maps

log = logging.getLogger("trihrge")


def score_arrays(rows, cols, X, genes, truth, threads=None):
    P, T, t_rows, t_cols, g, coverage = align_to_truth(rows, cols, X, genes, truth)
    if not g:
        raise InputError("the prediction and the truth share no gene; score runs made on the same data set")
    if len(g) < len(genes):
        missing = [x for x in genes if x not in set(g)]
        log.warning("%d of the %d predicted genes have no truth (%s); scored over the other %d",
                    len(missing), len(genes), examples(missing), len(g))
    m = score_maps(P, T, t_rows, t_cols, g, threads=threads)
    m["truth_coverage"] = coverage
    return m


def _super_res(run_dir: Path) -> Path:
    sr_p = Path(run_dir) / "super-res.h5ad"
    if not sr_p.is_file():
        raise InputError(f"{sr_p}: not found; give a run directory written by HISTEX.py (DIR/results/<model>)")
    return sr_p


def score_run(run_dir, truth_path=None):
    run_dir = Path(run_dir)
    sr_p = _super_res(run_dir)
    truth_path = Path(truth_path) if truth_path else run_dir.parent.parent / "truth" / "super.h5ad"
    if not truth_path.is_file():
        raise InputError(f"{truth_path}: no truth to score against; pass --truth PATH (a super.h5ad with obs row/col)")
    sr = _with_grid_positions(sr_p, "rerun HISTEX.py")
    truth = _with_grid_positions(truth_path, "pass --truth a super.h5ad with one observation per super-pixel "
                                             "(obs row/col), as the simulator and the converters' --truth write")
    m = score_arrays(sr.obs["row"].to_numpy(np.int64), sr.obs["col"].to_numpy(np.int64), np.asarray(sr.X),
                     list(sr.var_names), truth)
    m["model"] = sr.uns.get("model", run_dir.name)
    return m


def _with_grid_positions(path, fix):
    """The AnnData at path, whose obs hold each observation's super-pixel (row, col), with finite X."""
    ad = read_anndata(path, fix)
    check_grid_positions(ad, path, fix)
    check_finite_values(ad, path, fix)
    return ad


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
    if args.write:   # every run checked first: an error writes no run's metrics.json
        for r in args.runs:
            _super_res(r)
            busy = run_folder_in_use(r, data_directory_of(r))
            if busy:
                raise InputError(busy)
    for r in args.runs:
        if args.write:   # locked as the analysis is, read and written under the lock (a HISTEX rerun waits)
            with run_folder_stage("score", r, data_directory_of(r)) as st:
                m = score_run(r, args.truth)
                st.out.write_json(r / METRICS, m)
        else:
            m = score_run(r, args.truth)
        results.append((str(r.name), m))
    print(format_table(results))
    return 0

