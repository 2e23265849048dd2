"""The run report: sections built from the files a run (and its analysis) wrote, each skipped when
its files are absent, and, when a file is damaged, skipped with one warning that names the file and
the command that rewrites it (the report never costs the run). Files still staged in `out` are read
at their temporary place."""
import base64
import hashlib
import html
import io
import json
import logging
import os
from pathlib import Path

from ..core import layout as L
from ..scverse.keys import File, Key

log = logging.getLogger("trihrge")

IMAGE_MAX_PX = 1400        # long side of an embedded image
JPEG_QUALITY = 85
TOP_GENES = 20             # rows of the accuracy table
MAX_MAPS = 24              # gene maps embedded; the others are listed by name (150 maps made a 17 MB page)
SAMPLE_BYTES = 1 << 20     # source_fingerprint hashes this much at the start, middle and end of a file
SCORES = ("pearson", "ssim", "rmse")
ACCURACY_NUMBERS = ("cv_pearson", "cv_pearson_reference", "cv_pearson_model", "blend_weight", "mean_count")
RERUN = "rerun HISTEX.py with the same options (it reuses the trained states)"
RUN_DIR_NOTE = "(RUN_DIR: the folder of this page)"

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}.note{color:#555;font-size:.9em}"""


def _locator(out):
    """final path -> where the file is now: its staged temporary (also inside a staged folder), or itself
    (a path that does not exist for a file the commit removes)."""
    pending = [(Path(tmp), Path(final)) for tmp, final in (out.pending if out is not None else [])]
    gone = set(out.discarded) if out is not None else set()

    def locate(p: Path) -> Path:
        p = Path(p)
        if p in gone:   # an earlier run's file this run removes: as if absent
            return p.parent / ".trihrge-discarded" / p.name
        for tmp, final in pending:
            if p == final:
                return tmp
            if final in p.parents:
                return tmp / p.relative_to(final)
        return p
    return locate


class _Run:
    """The run folder reported on: `dir` (final paths, as messages name them), `at` (where a file of
    it is now: staged or final) and the data directory (None: no mask overlay)."""

    def __init__(self, run_dir, locate, directory):
        self.dir, self.locate, self.directory = Path(run_dir), locate, directory

    def at(self, *parts) -> Path:
        return self.locate(self.dir.joinpath(*parts))


def _skip(what: str, final: Path, fix: str, build, *args, default=""):
    """build(*args): the part of the page made from the file `final`. When it fails (the file damaged,
    or holding what the report does not expect), that part is left out with one warning naming the
    file and `fix`: one guard per part instead of a check per value read."""
    try:
        return build(*args)
    except Exception as e:   # decoders, pandas and JSON of the wrong shape raise many types
        log.warning("%s: damaged or unexpected content (%s); the report goes without %s; %s", final,
                    type(e).__name__, what, fix)
        return default


def _image(source, caption: str, width: str = "48%") -> str:
    """A figure of an image file (or PIL image) re-encoded as an embedded JPEG (at most IMAGE_MAX_PX
    on its long side)."""
    from PIL import Image
    im = source if isinstance(source, Image.Image) else Image.open(source)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, "white")
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    im.thumbnail((IMAGE_MAX_PX, IMAGE_MAX_PX))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure style="width:{width}"><img alt="{html.escape(caption)}" src="data:image/jpeg;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _figure(run: _Run, final: Path, caption: str, fix: str) -> str:
    """The image file `final` as a figure: "" when absent, "" and a warning when damaged."""
    p = run.locate(final)
    return _skip(f"this image ({caption})", final, fix, _image, p, caption) if p.is_file() else ""


def _table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _json(path: Path):
    """The JSON object at path; None when absent; ValueError when it is not a JSON object."""
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def _read_tsv(path: Path, columns=(), numbers=()):
    """A table a run wrote, every value as its text (gene names such as NA, nan or 7001 stay names),
    then the columns of `numbers` it has as numbers (text there is a ValueError); KeyError without
    one of `columns`."""
    import pandas as pd
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in table]
    if missing:
        raise KeyError(", ".join(missing))
    for c in table.columns.intersection(numbers):
        table[c] = pd.to_numeric(table[c].replace("", "nan"))   # an empty cell: a missing number
    return table


def _he_figure(run: _Run) -> str:
    """The hires H&E of uns['spatial'] in super-res.h5ad ("" when absent); a float or 16-bit image
    (scanpy stores them as float) scaled to 8 bit as the stages read any H&E."""
    import h5py
    from PIL import Image

    from ..core.image_io import to_rgb8
    p = run.at(L.SUPER_RES)
    if not p.is_file():
        return ""
    with h5py.File(p, "r") as f:
        g = f.get(f"uns/{Key.SPATIAL}")
        libs = list(g) if g is not None else []
        if len(libs) != 1 or f"{libs[0]}/{Key.IMAGES}/{Key.HIRES}" not in g:
            return ""
        rgb = g[f"{libs[0]}/{Key.IMAGES}/{Key.HIRES}"][()]
    return _image(Image.fromarray(to_rgb8(rgb, p)), "H&E (the hires image of super-res.h5ad uns['spatial'])")


def _tissue(run: _Run) -> str:
    parts = _skip("the H&E", run.dir / L.SUPER_RES, RERUN, _he_figure, run)
    if run.directory is not None:
        parts += _figure(run, L.MASK_OVERLAY.path(run.directory), "tissue mask (green outline) and spot footprints",
                         f"rerun python masking_non_tissue.py --directory {run.directory}")
    return "<h2>Tissue</h2>" + parts if parts else ""


def _cv_note(settings) -> str:
    cv = (settings or {}).get("cross_validation")
    if not cv:   # null without cross-fitting
        return ""
    return (f'<p>Cross-validated accuracy (out-of-fold, spot level, {html.escape(str(cv["n_genes"]))} most variable '
            f'genes, {html.escape(str(cv["n_spots"]))} spots): median Pearson r <b>{cv["pearson_median"]:.3f}</b>, interpolation '
            f'reference {cv["reference_pearson_median"]:.3f}.</p>')


def _training(run: _Run, settings) -> str:
    loss = _figure(run, run.dir / L.LOSS_PLOT, _loss_caption(settings), RERUN)
    note = _skip("the cross-validated accuracy", run.dir / L.RUN_JSON, RERUN, _cv_note, settings)
    return ("<h2>Training</h2>" + loss if loss else "") + note


def _loss_caption(settings) -> str:
    """Held-out spots only where the states had some (cross-fitting, or --val-fraction above 0)."""
    config = (settings or {}).get("config")
    config = config if isinstance(config, dict) else {}
    held_out = config.get("cv_folds") or (isinstance(v := config.get("val_fraction", 0.1), (int, float)) and v > 0)
    return ("loss per state: training (solid), held-out spots (dashed; the dot marks the epoch kept)" if held_out
            else "training loss per state (no spot held out: every state ran all its epochs)")


def _accuracy(run: _Run):
    """{gene: cv_pearson} and the table of the most accurate genes (genes-accuracy.tsv), when present."""
    p = run.at(L.GENES_ACCURACY)
    if not p.is_file():
        return {}, ""
    acc = _read_tsv(p, ("gene", "cv_pearson"), ACCURACY_NUMBERS)
    top = acc.sort_values("cv_pearson", ascending=False).head(TOP_GENES)
    cols = [c for c in ("gene", "cv_pearson", "cv_pearson_reference", "mean_count") if c in top]
    table = (f"<h3>Most accurate genes (cross-validated, {L.GENES_ACCURACY})</h3>"
             + _table(top[cols].itertuples(index=False), cols))
    return dict(zip(acc["gene"], acc["cv_pearson"])), table


def _map_figures(run: _Run, cv: dict) -> str:
    """The first MAX_MAPS maps of maps/index.tsv that exist as figures, the others named."""
    p = run.at(L.GENE_MAPS, L.GENE_MAP_INDEX)
    if not p.is_file():
        return ""
    index = _read_tsv(p)
    if list(index.columns) != ["gene", "file"]:
        raise ValueError(f"columns {list(index.columns)}, not gene, file")
    finals = [run.dir / L.GENE_MAPS / Path(name).name for name in index["file"]]   # inside maps/ only
    index = index.assign(final=finals)[[run.locate(f).is_file() for f in finals]]
    shown, rest = index.iloc[:MAX_MAPS], index["gene"].iloc[MAX_MAPS:]
    figs = "".join(_figure(run, final, gene + (f", cross-validated r {cv[gene]:.3f}" if gene in cv else ""), RERUN)
                   for gene, final in zip(shown["gene"], shown["final"]))
    if len(rest):
        figs += (f'<p class="note">{len(rest)} more map(s) in {L.GENE_MAPS}/, not embedded: '
                 f'{html.escape(", ".join(rest))}.</p>')
    return figs


def _gene_maps(run: _Run) -> str:
    cv, table = _skip("the accuracy table", run.dir / L.GENES_ACCURACY, RERUN, _accuracy, run, default=({}, ""))
    figs = _skip("the gene maps", run.dir / L.GENE_MAPS / L.GENE_MAP_INDEX, RERUN, _map_figures, run, cv)
    return "<h2>Gene maps</h2>" + figs + table if figs or table else ""


def source_fingerprint(path: Path) -> dict:
    """Size and a SHA-256 of the first, middle and last MB of the h5ad an analysis read, to tell a
    stale analysis: unlike the mtime it survives a copy (cp -r) and a rename, and it reads 3 MB of a
    file of GBs (a new map changes X, which fills most of the file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.sha256()
        for start in sorted({0, max(0, (size - SAMPLE_BYTES) // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(start)
            h.update(f.read(SAMPLE_BYTES))
    return {"size": size, "sha256_sample": h.hexdigest()}


def _same_source(recorded, path: Path) -> bool:
    """Whether path is still the file of the fingerprint an analysis recorded (one from before the
    content sample, size and mtime, is compared as such)."""
    if not path.is_file() or not isinstance(recorded, dict):
        return False
    if "sha256_sample" not in recorded:
        st = path.stat()
        return recorded == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return recorded == source_fingerprint(path)


def _analysis_part(run: _Run, sub: str, what: str, option: str) -> str:
    d = run.dir / sub
    summary = _json(run.locate(d / File.ANALYSIS_JSON))
    if summary is None:
        return ""
    out = f"<h2>Analysis of the {what} ({sub}/)</h2>"
    source = Path(summary["input"]).name   # a file of the run folder
    if not _same_source(summary.get("source"), run.at(source)):
        return out + (f'<p class="note">Made from an earlier {html.escape(source)}, not shown; rerun <code>python -m '
                      f"utils.analysis RUN_DIR{option}</code> {RUN_DIR_NOTE}.</p>")
    fix = f"rerun python -m utils.analysis {run.dir}{option}"
    sets = [key.removeprefix(Key.GENE_SET_SCORE.format("")) for key in summary.get("gene_sets", [])]
    figures = [(File.DOMAIN_MAP, "tissue domains"), (File.CELL_TYPE_MAP, "cell types (arg-max score)")]
    figures += [(File.GENE_SET_MAP.format(name), f"gene set {name}") for name in sets]
    missing = summary.get("markers_not_predicted") or []
    note = (f'<p class="note">Markers: {html.escape(Path(str(summary.get("markers"))).name)}; not predicted by this '
            f'run ({len(missing)}): {html.escape(", ".join(missing)) or "none"}.</p>')
    return out + "".join(_figure(run, d / name, caption, fix) for name, caption in figures) + note


def _analysis(run: _Run) -> str:
    parts = ((File.ANALYSIS_DIR, "super-pixels", ""), (File.ANALYSIS_SPOTS_DIR, "spots", " --input spots"))
    return "".join(_skip(f"the analysis of the {what}", run.dir / sub / File.ANALYSIS_JSON,
                         f"rerun python -m utils.analysis {run.dir}{option}", _analysis_part, run, sub, what, option)
                   for sub, what, option in parts)


def _shown(value):
    """A setting as the page shows it: an absolute path by its name (the page travels without them)."""
    return Path(value).name if isinstance(value, str) and os.path.isabs(value) else value


def _args_table(settings) -> str:
    unread = set(settings.get("args_unread") or ())   # runs before it have none
    rows = sorted((str(k), f"{_shown(v)} (not used by this run)" if k in unread else _shown(v))
                  for k, v in (settings.get("args") or {}).items())
    return "<h2>Settings (run.json)</h2>" + _table(rows, ["option", "value"])


def _scores(run: _Run) -> str:
    metrics = _json(run.at(L.METRICS))
    if metrics is None:
        return ""
    s = metrics["summary"]
    rows = [(k, float(s[k]["median"]), float(s[k]["mean"])) for k in SCORES if k in s.keys()]
    if not rows:
        raise KeyError(" / ".join(SCORES))
    truth = metrics.get("truth")
    against = f", truth {Path(truth).parent.name}/{Path(truth).name}" if isinstance(truth, str) else ""
    return (f"<h3>Scores against the truth ({L.METRICS}{html.escape(against)})</h3>"
            + _table(rows, ["metric", "median", "mean"]))


def _run_settings(run: _Run):
    """run.json as a dict, or None (with a warning: the page then goes without what it holds)."""
    if not run.at(L.RUN_JSON).is_file():
        log.warning("%s: not found; the report goes without the run's settings; %s", run.dir / L.RUN_JSON, RERUN)
        return None
    return _skip("the run's settings", run.dir / L.RUN_JSON, RERUN, _json, run.at(L.RUN_JSON), default=None)


def write_report(out, run_dir, *, directory=None) -> Path:
    """Stage RUN_DIR/report.html in `out` (a StagedOutputs); returns its final path.

    Parameters
    ----------
    out
        The staged outputs of the command writing it; files staged there are read at their temporary place.
    run_dir
        The run directory (DIR/results/<run> or HISTEX.py --out).
    directory
        The data directory (for the mask overlay); None to leave it out.
    """
    run = _Run(run_dir, _locator(out), directory)
    settings = _run_settings(run)
    name = html.escape(str((settings or {}).get("model", run.dir.resolve().name)))
    args = _skip("the settings table", run.dir / L.RUN_JSON, RERUN, _args_table, settings) if settings else ""
    scores = _skip("the scores", run.dir / L.METRICS, f"rewrite it with python -m utils.score {run.dir} --write "
                   "(or remove it)", _scores, run)
    body = _tissue(run) + _training(run, settings) + _gene_maps(run) + _analysis(run) + args + scores
    folder = html.escape("/".join(run.dir.resolve().parts[-2:]))   # no absolute path: the page travels
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>TriHRGE run {name}</title>'
            f"<style>{_STYLE}</style></head><body><h1>TriHRGE run: {name}</h1>"
            f'<p class="note">Run folder {folder}</p>{body}</body></html>\n')
    final = run.dir / File.REPORT
    out.path(final).write_text(page, encoding="utf-8")
    return final
