"""The run report: sections built from the files a run (and its analysis) wrote, each skipped when
its files are absent. Files still staged in `out` are read at their temporary place."""
import base64
import html
import io
import json
import logging
from pathlib import Path

from ..core import layout as L
from ..scverse.keys import File, Key

log = logging.getLogger("trihrge")

IMAGE_MAX_PX = 1400        # long side of an embedded image
JPEG_QUALITY = 85
TOP_GENES = 20             # rows of the accuracy table

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


def _image(path: Path, caption: str, width: str = "48%") -> str:
    """A figure with the image re-encoded as an embedded JPEG (at most IMAGE_MAX_PX on its long side)."""
    from PIL import Image
    im = Image.open(path)
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


def _table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _json(path: Path, *, expected: bool = False):
    """A JSON object the report shows; missing or damaged: None, and the log says so when the file is
    damaged or `expected` (the page then goes without that section, and the reader should know why)."""
    if not path.is_file():
        if expected:
            log.warning("%s: not found; the report goes without what it holds (rerun HISTEX.py)", path)
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        value = None
    if not isinstance(value, dict):
        log.warning("%s: damaged (not a JSON object); the report goes without what it holds (rerun HISTEX.py)", path)
        return None
    return value


def _hires_he(sr_path: Path):
    """The hires H&E of uns['spatial'] in super-res.h5ad, as a PNG in memory (None when absent)."""
    import h5py
    if not sr_path.is_file():
        return None
    with h5py.File(sr_path, "r") as f:
        g = f.get(f"uns/{Key.SPATIAL}")
        libs = list(g) if g is not None else []
        if len(libs) != 1 or f"{libs[0]}/{Key.IMAGES}/{Key.HIRES}" not in g:
            return None
        rgb = g[f"{libs[0]}/{Key.IMAGES}/{Key.HIRES}"][()]
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    buf.seek(0)
    return buf


def _tissue(locate, run_dir, directory) -> str:
    parts = []
    he = _hires_he(locate(run_dir / L.SUPER_RES))
    if he is not None:
        parts.append(_image(he, "H&E (the hires image of super-res.h5ad uns['spatial'])"))
    if directory is not None and L.MASK_OVERLAY.path(directory).is_file():
        parts.append(_image(L.MASK_OVERLAY.path(directory), "tissue mask (green outline) and spot footprints"))
    return "<h2>Tissue</h2>" + "".join(parts) if parts else ""


def _training(locate, run_dir, run) -> str:
    p = locate(run_dir / L.LOSS_PLOT)
    out = ["<h2>Training</h2>", _image(p, "loss per state: training (solid), held-out spots (dashed)")] \
        if p.is_file() else []
    cv = (run or {}).get("cross_validation")
    if cv:
        out.append(f'<p>Cross-validated accuracy (out-of-fold, spot level, {cv["n_genes"]} most variable genes, '
                   f'{cv["n_spots"]} spots): median Pearson r <b>{cv["pearson_median"]:.3f}</b>, interpolation '
                   f'reference {cv["reference_pearson_median"]:.3f}.</p>')
    return "".join(out)


def _accuracy(locate, run_dir):
    """{gene: cv_pearson} and the table of the most accurate genes (genes-accuracy.tsv), when present."""
    import pandas as pd
    p = locate(run_dir / L.GENES_ACCURACY)
    if not p.is_file():
        return {}, ""
    acc = pd.read_csv(p, sep="\t")
    top = acc.sort_values("cv_pearson", ascending=False).head(TOP_GENES)
    cols = [c for c in ("gene", "cv_pearson", "cv_pearson_reference", "mean_count") if c in top]
    table = (f"<h3>Most accurate genes (cross-validated, {L.GENES_ACCURACY})</h3>"
             + _table(top[cols].itertuples(index=False), cols))
    return dict(zip(acc["gene"], acc["cv_pearson"])), table


def _gene_maps(locate, run_dir) -> str:
    import pandas as pd
    cv, table = _accuracy(locate, run_dir)
    index = locate(run_dir / L.GENE_MAPS / L.GENE_MAP_INDEX)
    figs = []
    if index.is_file():
        for gene, name in pd.read_csv(index, sep="\t", dtype=str).itertuples(index=False):
            p = locate(run_dir / L.GENE_MAPS / name)
            if p.is_file():
                r = f", cross-validated r {cv[gene]:.3f}" if gene in cv else ""
                figs.append(_image(p, f"{gene}{r}"))
    return "<h2>Gene maps</h2>" + "".join(figs) + table if figs or table else ""


def source_fingerprint(path: Path) -> dict:
    """Size and mtime of the h5ad an analysis read (a rename keeps both), to tell a stale analysis."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _analysis(locate, run_dir) -> str:
    out = []
    for sub, what in ((File.ANALYSIS_DIR, "super-pixels"), (File.ANALYSIS_SPOTS_DIR, "spots")):
        d = locate(run_dir / sub)
        summary = _json(d / File.ANALYSIS_JSON)
        if summary is None:
            continue
        out.append(f"<h2>Analysis of the {what} ({sub}/)</h2>")
        source = locate(run_dir / str(summary.get("input")))
        if not source.is_file() or summary.get("source") != source_fingerprint(source):
            out.append(f'<p class="note">Made from an earlier {html.escape(str(summary.get("input")))}, not '
                       f"shown; rerun <code>python -m utils.analysis {html.escape(str(run_dir))}</code>.</p>")
            continue
        for name, caption in ((File.DOMAIN_MAP, "tissue domains"), (File.CELL_TYPE_MAP, "cell types (arg-max score)")):
            if (d / name).is_file():
                out.append(_image(d / name, caption))
        for key in summary.get("gene_sets", []):
            name = key[len(Key.GENE_SET_SCORE.format("")):]
            p = d / File.GENE_SET_MAP.format(name)
            if p.is_file():
                out.append(_image(p, f"gene set {name}"))
        missing = summary.get("markers_not_predicted") or []
        out.append(f'<p class="note">Markers: {html.escape(str(summary.get("markers")))}; not predicted by this run '
                   f'({len(missing)}): {html.escape(", ".join(missing)) or "none"}.</p>')
    return "".join(out)


def _settings(run, metrics) -> str:
    if not run:
        return ""
    rows = sorted((run.get("args") or {}).items())
    out = ["<h2>Settings (run.json)</h2>", _table(rows, ["option", "value"])]
    if metrics and "summary" in metrics:
        s = metrics["summary"]
        out.append("<h3>Scores against the truth (metrics.json)</h3>"
                   + _table([(k, s[k]["median"], s[k]["mean"]) for k in ("pearson", "ssim", "rmse") if k in s],
                            ["metric", "median", "mean"]))
    return "".join(out)


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
    run_dir = Path(run_dir)
    locate = _locator(out)
    run = _json(locate(run_dir / L.RUN_JSON), expected=True)
    metrics = _json(locate(run_dir / L.METRICS))
    name = html.escape(str((run or {}).get("model", run_dir.name)))
    body = (_tissue(locate, run_dir, directory) + _training(locate, run_dir, run) + _gene_maps(locate, run_dir)
            + _analysis(locate, run_dir) + _settings(run, metrics))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>TriHRGE run {name}</title>'
            f"<style>{_STYLE}</style></head><body><h1>TriHRGE run: {name}</h1>"
            f'<p class="note">{html.escape(str(run_dir))}</p>{body}</body></html>\n')
    final = run_dir / File.REPORT
    out.path(final).write_text(page, encoding="utf-8")
    return final
