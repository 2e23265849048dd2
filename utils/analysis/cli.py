"""`python -m utils.analysis RUN_DIR`: domains, cell types and gene-set scores on a run's maps.

Reads RUN_DIR/super-res.h5ad (or spots-pred.h5ad with --input spots), writes RUN_DIR/analysis/ (or
analysis-spots/) and rewrites RUN_DIR/report.html, all staged and committed together (a failed or
killed run changes nothing). Bad input is one `error:` line, exit 2, before anything is computed."""
import json
import logging
import os
import time
from pathlib import Path

from ..core import layout as L
from ..core.cli import COUNT, POSITIVE, POSITIVE_INT, Number, Parser, add_seed, path_arg, run, setup_logging, text_file
from ..core.errors import InputError
from ..core.h5ad_io import check_grid_positions, check_predicted_counts, read_anndata
from ..core.stage import run_folder_stage
from ..report import write_report
from ..report.page import source_fingerprint
from ..scverse.keys import File, Key
from ..scverse.spatial import libraries, library_of
from .celltypes import PANELS, panel_table, report_missing, score_cell_types
from .domains import METHODS, PCA_KEY, cluster, embed, markers, smooth
from .genesets import parse_gene_set, read_gene_table, require_genes, score_gene_sets
from .maps import frame, label_map, palette, score_map
from .preprocess import normalise_log

log = logging.getLogger("trihrge")
DEFAULT_DOMAINS = 6
INPUTS = {"superpixels": (L.SUPER_RES, File.ANALYSIS_DIR), "spots": (L.SPOTS_PRED, File.ANALYSIS_SPOTS_DIR)}
UNASSIGNED_COLOUR = "#bbbbbb"


def build_parser() -> Parser:
    p = Parser(prog="python -m utils.analysis", description=__doc__)
    p.add_argument("run_dir", type=path_arg, help="a run directory written by HISTEX.py (DIR/results/<run>)")
    p.add_argument("--input", choices=list(INPUTS), default="superpixels",
                   help="analyse the super-pixels (super-res.h5ad, into analysis/) or the spots (spots-pred.h5ad, "
                        "into analysis-spots/)")
    p.add_argument("--directory", "-d", type=path_arg, default=None,
                   help="the data directory of the run, for the report's H&E and mask overlay (default: RUN_DIR/../.. "
                        "when it holds calibration.json)")
    p.add_argument("--n-domains", type=Number(int, lo=2, hi=50), default=None,
                   help="number of k-means domains, 2-50 (default: 6; Leiden takes --resolution instead)")
    p.add_argument("--method", choices=METHODS, default="kmeans",
                   help="kmeans (scikit-learn, fast) or leiden (scanpy + igraph on a 15-neighbour graph; slower on "
                        "large sections, --resolution sets the number of domains)")
    p.add_argument("--resolution", type=POSITIVE, default=None,
                   help="Leiden resolution (default: 1; higher: more domains; k-means takes --n-domains instead)")
    p.add_argument("--smooth", type=COUNT, default=0,
                   help="spatial smoothing before clustering: average each observation's principal components over "
                        "the neighbours within this many lattice spacings, a whole number (0: none)")
    p.add_argument("--n-pcs", type=POSITIVE_INT, default=30, help="principal components used for the domains")
    p.add_argument("--top-markers", type=POSITIVE_INT, default=10, help="marker genes per domain in domain-markers.tsv")
    p.add_argument("--markers", default="breast",
                   help="cell-type markers: 'breast' (the built-in breast panel, utils/analysis/celltypes.py), 'none' "
                        "(no cell typing) or a TSV of cell_type<TAB>gene lines; markers that the run does not "
                        "predict are listed in cell-type-markers.tsv and the log")
    p.add_argument("--gene-set", action="append", type=parse_gene_set, default=[], metavar="NAME=G1,G2,...",
                   help="a gene set to score and map (repeatable), e.g. TLS=CXCL13,CCL19,CCL21,MS4A1,CD79A")
    p.add_argument("--gene-sets", type=text_file, default=None, metavar="TSV",
                   help="gene sets from a file of set<TAB>gene lines")
    p.add_argument("--export", choices=["spatialdata"], default=None,
                   help="also write analysis/spatialdata.zarr (needs the spatialdata package)")
    add_seed(p)
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors in the log")
    return p


def _domain_options(args) -> None:
    """Fill in --n-domains and --resolution; each method reads one of them, and the other, when given,
    gets a warning instead of being ignored without a word."""
    unused = "--n-domains" if args.method == "leiden" and args.n_domains else \
        "--resolution" if args.method == "kmeans" and args.resolution else None
    if unused:
        log.warning("%s is not used by --method %s (%s)", unused, args.method,
                    "--resolution sets the number of domains" if args.method == "leiden" else "--n-domains sets it")
    args.n_domains, args.resolution = args.n_domains or DEFAULT_DOMAINS, args.resolution or 1.0


def _data_directory(run_dir: Path, given):
    own = L.data_directory_of(run_dir)
    if given is None:
        return own
    L.CALIBRATION.existing(given)
    if own is not None and own != Path(given).resolve():   # its H&E and mask would be another section's
        raise InputError(f"--directory {given}: the run {run_dir} belongs to {own}; leave --directory out (it is "
                         f"only needed for a run written elsewhere with HISTEX.py --out)")
    return Path(given)


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: {'is not a directory' if run_dir.exists() else 'not found'}; give a run "
                         f"directory written by HISTEX.py (DIR/{L.RESULTS_DIR}/<run>)")
    if not os.access(run_dir, os.W_OK | os.X_OK):   # before anything is computed
        raise InputError(f"{run_dir}: cannot be written (no permission or a read-only file system); the analysis "
                         f"writes its outputs there: make it writable, or copy the run folder")


def read_run(run_dir: Path, name: str):
    """The run's AnnData, with the scverse spatial layout this analysis draws on (run_dir checked
    by _check_run_dir)."""
    p = run_dir / name
    if not p.is_file():
        raise InputError(f"{p}: not found; run HISTEX.py on the data directory first (it writes {name})")
    ad = read_anndata(p, "rerun HISTEX.py")
    sections = libraries(ad)
    if len(sections) > 1:
        raise InputError(f"{p}: holds {len(sections)} sections ({', '.join(map(str, sections[:3]))} in "
                         f"uns['spatial']: concatenated?); analyse each section's own run folder")
    if Key.SPATIAL not in ad.obsm or library_of(ad) is None:
        raise InputError(f"{p}: has no obsm/uns 'spatial' (written by an older HISTEX.py); rerun HISTEX.py")
    if ad.n_obs < 2 or ad.n_vars < 2:
        raise InputError(f"{p}: {ad.n_obs} observation(s) x {ad.n_vars} gene(s); domains and cell types need at "
                         f"least 2 of each (a run of one gene: select more genes with get_HR.py, then rerun HISTEX.py)")
    if "row" in ad.obs or "col" in ad.obs:   # super-pixels, drawn as a raster of the section's grid
        check_grid_positions(ad, p, "rerun HISTEX.py")
        _check_inside_image(ad, p)
    check_predicted_counts(ad, p, "rerun HISTEX.py")
    return ad


def _check_inside_image(ad, path) -> None:
    """Every super-pixel lies on the H&E the run stores (a damaged row/col would ask for a raster of
    terabytes)."""
    try:
        img, f, size = frame(ad)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: uns 'spatial' lacks its hires image or scale factors; rerun HISTEX.py") from None
    extent = (ad.obs["row"].max() + 1) * size * f, (ad.obs["col"].max() + 1) * size * f
    if extent[0] > img.shape[0] * 1.01 + size * f or extent[1] > img.shape[1] * 1.01 + size * f:
        raise InputError(f"{path}: obs row/col reach beyond the H&E image the run stores (super-pixel "
                         f"{int(ad.obs['row'].max())}, {int(ad.obs['col'].max())}); rerun HISTEX.py")


def _panel(option: str, genes):
    """(panel or None, its source) after the checks that need no computation."""
    if option == "none":
        return None, "none"
    if option in PANELS:
        return PANELS[option], f"built-in {option} panel"
    path = Path(option).expanduser()
    if not option.strip() or (not path.exists() and path.suffix == "" and len(path.parts) == 1):
        raise InputError(f"--markers {option!r}: neither a built-in panel ({', '.join([*PANELS, 'none'])}) nor a file; "
                         f"give one of those or the path of a cell_type<TAB>gene table")
    panel = read_gene_table(path, what="marker table", kind="cell-type name", reserved=(Key.UNASSIGNED,))
    if not panel_table(panel, genes)["predicted"].any():
        raise InputError(f"{path}: none of its {sum(map(len, panel.values()))} markers is among the "
                         f"{len(genes)} predicted genes; check the gene names (super-res.h5ad var_names)")
    return panel, str(path)


def _gene_sets(args, genes) -> dict:
    named = [(name, members, f"--gene-set {name}") for name, members in args.gene_set]
    if args.gene_sets is not None:
        from_file = read_gene_table(args.gene_sets, what="gene-set file")
        require_genes(from_file, genes, source=str(args.gene_sets))
        named += [(name, members, f"{args.gene_sets} ({name})") for name, members in from_file.items()]
    require_genes(dict(args.gene_set), genes, source="--gene-set")
    _one_set_a_name(named)
    return {name: members for name, members, _ in named}


def _one_set_a_name(named) -> None:
    """Two sets under one name (or names that differ only in case, whose gene-set-<name>.png files
    are one file on macOS and Windows): the later one replaced the first without a word."""
    seen = {}
    for name, _, source in named:
        if name.casefold() in seen:
            raise InputError(f"{source}: the name is taken by {seen[name.casefold()]}; give each gene set its "
                             f"own name (names that differ only in case count as one)")
        seen[name.casefold()] = source


def analyse(ad, *, args, panel, sets) -> dict:
    """Every step on one AnnData; returns the summary of analysis.json."""
    t = time.time()
    normalise_log(ad)
    embed(ad, n_pcs=args.n_pcs, seed=args.seed)
    rep = smooth(ad, rings=args.smooth)
    cluster(ad, n_domains=args.n_domains, method=args.method, resolution=args.resolution, rep=rep, seed=args.seed)
    ad.uns[f"{Key.DOMAIN}_colors"] = palette(len(ad.obs[Key.DOMAIN].cat.categories))
    log.info("domains in %.1f s", time.time() - t)
    summary = {"domains": {"method": args.method, "n": len(ad.obs[Key.DOMAIN].cat.categories),
                           "sizes": ad.obs[Key.DOMAIN].value_counts().sort_index().to_dict(),
                           "n_pcs": int(ad.obsm[PCA_KEY].shape[1])}}   # what fits, not what was asked
    if panel is not None:
        scored = score_cell_types(ad, panel=panel, seed=args.seed)
        ad.uns[f"{Key.CELL_TYPE}_colors"] = palette(len(scored)) + [UNASSIGNED_COLOUR]
        summary["cell_types"] = {"scored": scored, "fractions": ad.obs[Key.CELL_TYPE].value_counts(
            normalize=True).round(4).to_dict()}
    summary["gene_sets"] = score_gene_sets(ad, sets=sets, seed=args.seed)
    summary["seconds"] = round(time.time() - t, 1)
    return summary


def _light(ad):
    """The AnnData written as analysis.h5ad: obs (with the analysis columns), obsm/uns 'spatial' and the
    colours; no expression matrix (join its obs onto super-res.h5ad, README 'After the maps')."""
    import anndata
    uns = {k: ad.uns[k] for k in ad.uns if k == Key.SPATIAL or k.endswith("_colors")}
    return anndata.AnnData(obs=ad.obs.copy(), obsm={Key.SPATIAL: ad.obsm[Key.SPATIAL]}, uns=uns)


def write_outputs(ad, out_dir: Path, *, args, panel_used, marker_table, summary, source: Path) -> list:
    """Files of the analysis into out_dir (a staged folder); returns their names. source: the run's h5ad
    (its counts go into the SpatialData table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [File.DOMAIN_MAP, File.DOMAIN_MARKERS, File.ANALYSIS_H5AD, File.ANALYSIS_JSON]
    label_map(ad, key=Key.DOMAIN, path=out_dir / File.DOMAIN_MAP, title=f"domains ({args.method})")
    markers(ad, n_top=args.top_markers).to_csv(out_dir / File.DOMAIN_MARKERS, sep="\t", index=False,
                                                float_format="%.4g")
    if marker_table is not None:
        marker_table.to_csv(out_dir / File.CELL_TYPE_MARKERS, sep="\t", index=False)
        label_map(ad, key=Key.CELL_TYPE, path=out_dir / File.CELL_TYPE_MAP, title=f"cell types ({Path(panel_used).name})")
        written += [File.CELL_TYPE_MARKERS, File.CELL_TYPE_MAP]
    for key in summary["gene_sets"]:
        name = key[len(Key.GENE_SET_SCORE.format("")):]
        score_map(ad, key=key, path=out_dir / File.GENE_SET_MAP.format(name), title=f"gene set {name} (score)")
        written.append(File.GENE_SET_MAP.format(name))
    _light(ad).write_h5ad(out_dir / File.ANALYSIS_H5AD, compression="gzip")
    if args.export == "spatialdata":
        import anndata

        from ..scverse.spatialdata import export_spatialdata
        export_spatialdata(ad, out_dir / File.SPATIALDATA, counts=anndata.read_h5ad(source).X)
        written.append(File.SPATIALDATA)
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    _domain_options(args)
    if args.export == "spatialdata":
        from ..scverse.spatialdata import require_spatialdata
        require_spatialdata()
    name, sub = INPUTS[args.input]
    run_dir = Path(args.run_dir)
    _check_run_dir(run_dir)
    directory = _data_directory(run_dir, args.directory)
    t0 = time.time()
    # the lock first: a HISTEX.py rerun must not replace the input between reading and writing
    with run_folder_stage("analysis", run_dir, directory) as st:
        ad = read_run(run_dir, name)
        genes = list(ad.var_names)
        panel, panel_used = _panel(args.markers, genes)
        sets = _gene_sets(args, genes)
        table = None
        if panel is not None:
            table = panel_table(panel, genes)
            report_missing(table, source=panel_used)
            if not table["predicted"].any():     # said by report_missing
                panel = table = None
        # analysis.h5ad (and the SpatialData copy) hold about what the input holds: a disk that cannot
        # take it is refused now, not by HDF5 part-way through a write
        size = (run_dir / name).stat().st_size * (2 if args.export == "spatialdata" else 1)
        st.require_space(size, f"{sub}/", where=run_dir)
        log.info("%s: %d observations x %d genes", run_dir / name, ad.n_obs, ad.n_vars)
        summary = analyse(ad, args=args, panel=panel, sets=sets)
        summary.update(input=name, source=source_fingerprint(run_dir / name), parameters={k: str(v) for k, v in vars(args).items()}, markers=panel_used,
                       markers_not_predicted=[] if table is None else table.loc[~table["predicted"], "gene"].tolist())
        out_dir = run_dir / sub
        staged = st.out.path(out_dir)
        summary["outputs"] = write_outputs(ad, staged, args=args, panel_used=panel_used, marker_table=table,
                                           summary=summary, source=run_dir / name)
        summary["seconds_total"] = round(time.time() - t0, 1)
        (staged / File.ANALYSIS_JSON).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        write_report(st.out, run_dir, directory=directory)
    log.info("wrote %s and %s in %.0f s", out_dir, run_dir / File.REPORT, time.time() - t0)
    return 0


if __name__ == "__main__":
    run(main)
