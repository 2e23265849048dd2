"""The report and the scores with damaged or unusual inputs: a damaged file the report reads costs its
part of the page with one warning naming the file and the command that rewrites it, never the run;
utils.score refuses a truth it cannot use in one line naming it, HISTEX.py warns and keeps the run.
All on copies of one interpolation run of the small demo (analysis_fixtures.interp_run)."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from analysis_fixtures import interp_run  # noqa: F401  (fixture)
from conftest import REPO, assert_user_error, copy_demo, run_script, snapshot

from utils.core.atomic import StagedOutputs
from utils.core.errors import InputError
from utils.evaluation.score import score_data_directory_truth, score_run
from utils.report import write_report
from utils.report.page import MAX_MAPS, source_fingerprint
from utils.scverse.keys import File

H5AD = ("super-res.h5ad", "spots-pred.h5ad")


def _analysis(run, sub, source, markers):
    """A made-up analysis folder of the run, current for `source`: a domain map and analysis.json."""
    (run / sub).mkdir()
    shutil.copy(next((run / "maps").glob("*.png")), run / sub / File.DOMAIN_MAP)
    summary = {"input": source, "source": source_fingerprint(run / source), "gene_sets": [], "markers": markers,
               "markers_not_predicted": ["NOTAGENE1"]}
    (run / sub / File.ANALYSIS_JSON).write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def template(interp_run, tmp_path_factory):  # noqa: F811
    """The run's small files (its h5ad files linked, never to be written through), an analysis of the
    super-pixels and one of the spots (markers at an absolute path), and a data directory holding the
    mask overlay."""
    d, run = interp_run
    dst = tmp_path_factory.mktemp("report-template") / "results" / "interp"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("*.h5ad", "analysis*", File.REPORT))
    for name in H5AD:
        (dst / name).symlink_to(run / name)
    _analysis(dst, File.ANALYSIS_DIR, H5AD[0], str(d / "markers.tsv"))
    _analysis(dst, File.ANALYSIS_SPOTS_DIR, H5AD[1], str(d / "markers.tsv"))
    shutil.copy(d / "mask-overlay.png", dst.parent.parent)
    return dst


def _copy(template, tmp_path):
    run = tmp_path / "results" / "interp"
    shutil.copytree(template, run, symlinks=True)
    shutil.copy(template.parent.parent / "mask-overlay.png", tmp_path)
    return run


def _report(run):
    with StagedOutputs() as out:
        write_report(out, run, directory=run.parent.parent)
    return (run / File.REPORT).read_text()


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _write(rel, data):
    def edit(run):
        (run / rel).write_bytes(data.encode() if isinstance(data, str) else data)
    return edit


def _truncate(rel):
    def edit(run):
        p = run / rel
        p.write_bytes(p.read_bytes()[:300])
    return edit


def _json_edit(rel, change):
    def edit(run):
        p = run / rel
        d = json.loads(p.read_text())
        change(d)
        p.write_text(json.dumps(d))
    return edit


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _first_map(run):
    """The file name of the run's first gene map."""
    return (run / "maps" / "index.tsv").read_text().splitlines()[1].split("\t")[1]


SPOTS_JSON = f"{File.ANALYSIS_SPOTS_DIR}/{File.ANALYSIS_JSON}"
DAMAGE = {   # id: (edit of the run folder, the file the warning names, the fix it gives)
    "loss-text": (_write("loss.png", "not a png"), "loss.png", "rerun HISTEX.py"),
    "loss-empty": (_write("loss.png", b""), "loss.png", "rerun HISTEX.py"),
    "map-truncated": (lambda run: _truncate(f"maps/{_first_map(run)}")(run), "maps/", "rerun HISTEX.py"),
    "overlay-text": (lambda run: (run.parent.parent / "mask-overlay.png").write_text("x"), "mask-overlay.png",
                     "masking_non_tissue.py"),
    "domains-truncated": (_truncate(f"{File.ANALYSIS_DIR}/{File.DOMAIN_MAP}"), File.DOMAIN_MAP, "utils.analysis"),
    "cv-text": (_json_edit("run.json", _set("cross_validation", "high")), "run.json", "rerun HISTEX.py"),
    "cv-list": (_json_edit("run.json", _set("cross_validation", [0.5])), "run.json", "rerun HISTEX.py"),
    "cv-keys": (_json_edit("run.json", _set("cross_validation", {"n_genes": 3})), "run.json", "rerun HISTEX.py"),
    "args-list": (_json_edit("run.json", _set("args", ["--seed", "0"])), "run.json", "rerun HISTEX.py"),
    "args-text": (_json_edit("run.json", _set("args", "--seed 0")), "run.json", "rerun HISTEX.py"),
    "summary-list": (_json_edit("metrics.json", _set("summary", [1])), "metrics.json", "utils.score"),
    "summary-text": (_json_edit("metrics.json", _set("summary", "pearson")), "metrics.json", "utils.score"),
    "no-median": (_json_edit("metrics.json", lambda d: d["summary"]["pearson"].pop("median")), "metrics.json",
                  "utils.score"),
    "accuracy-empty": (_write("genes-accuracy.tsv", ""), "genes-accuracy.tsv", "rerun HISTEX.py"),
    "accuracy-no-cv": (_write("genes-accuracy.tsv", "gene\tmean_count\nG1\t3\n"), "genes-accuracy.tsv", "HISTEX"),
    "accuracy-text": (_write("genes-accuracy.tsv", "gene\tcv_pearson\nG1\thigh\n"), "genes-accuracy.tsv", "HISTEX"),
    "index-empty": (_write("maps/index.tsv", ""), "index.tsv", "rerun HISTEX.py"),
    "index-1-column": (_write("maps/index.tsv", "gene\nG1\n"), "index.tsv", "rerun HISTEX.py"),
    "index-3-columns": (_write("maps/index.tsv", "gene\tfile\tx\nG1\tG1.png\t1\n"), "index.tsv", "rerun HISTEX.py"),
    "gene-sets-null": (_json_edit(SPOTS_JSON, _set("gene_sets", None)), SPOTS_JSON, "--input spots"),
    "gene-sets-number": (_json_edit(SPOTS_JSON, _set("gene_sets", [5])), SPOTS_JSON, "--input spots"),
    "not-predicted-number": (_json_edit(SPOTS_JSON, _set("markers_not_predicted", [1])), SPOTS_JSON, "--input spots"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_file_costs_its_part_of_the_report_with_one_warning(template, tmp_path, caplog, case):
    """Each was a traceback that lost the report (and with it HISTEX's or the analysis's run)."""
    edit, where, fix = DAMAGE[case]
    run = _copy(template, tmp_path)
    edit(run)
    page = _report(run)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert where in warnings[0] and fix in warnings[0], warnings[0]
    assert "Settings (run.json)" in page or "run.json" in where


def test_cross_validation_null_is_no_section_and_no_warning(template, tmp_path, caplog):
    """What a run without cross-fitting writes."""
    run = _copy(template, tmp_path)
    _json_edit("run.json", _set("cross_validation", None))(run)
    assert "Cross-validated accuracy" not in _report(run) and not _warnings(caplog)


def test_a_float_hires_image_is_embedded_scaled(template, tmp_path, caplog):
    """scanpy stores images as float in [0, 1]: PIL refused the array."""
    run = _copy(template, tmp_path)
    (run / H5AD[0]).unlink()
    shutil.copy(template / H5AD[0], run / H5AD[0])
    with h5py.File(run / H5AD[0], "r+") as f:
        g = f["uns/spatial"]
        key = f"{next(iter(g))}/images/hires"
        rgb = g[key][()]
        del g[key]
        g[key] = rgb.astype(np.float32) / 255
    page = _report(run)
    assert "H&amp;E (the hires image" in page and not _warnings(caplog)


def test_gene_names_that_pandas_reads_as_missing_or_numbers_stay_names(template, tmp_path, caplog):
    run = _copy(template, tmp_path)
    png = _first_map(run)
    (run / "genes-accuracy.tsv").write_text("gene\tcv_pearson\tmean_count\nNA\t0.5\t1\nnan\t0.4\t2\n7001\t0.3\t3\n")
    (run / "maps/index.tsv").write_text("gene\tfile\n" + "".join(f"{g}\t{png}\n" for g in ("NA", "nan", "7001")))
    page = _report(run)
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    for gene, r in (("NA", "0.500"), ("nan", "0.400"), ("7001", "0.300")):
        assert f"{gene}, cross-validated r {r}" in captions and f"<td>{gene}</td>" in page
    assert not _warnings(caplog)


def test_a_copied_run_keeps_its_analysis_and_a_stale_one_names_its_command(template, tmp_path):
    """`cp -r` gives new mtimes: the analysis was hidden as made from an earlier super-res.h5ad."""
    run = _copy(template, tmp_path)
    for name in H5AD:
        (run / name).unlink()
        shutil.copy(template / name, run / name)   # new mtime, same content
    os.utime(run / H5AD[0], ns=(1, 1))
    page = _report(run)
    assert "Made from an earlier" not in page and "tissue domains" in page
    _json_edit(SPOTS_JSON, _set("source", {"size": 1, "sha256_sample": "0"}))(run)
    stale = re.findall(r"Made from an earlier ([^,]*), not shown; rerun <code>([^<]*)</code>", _report(run))
    assert stale == [(H5AD[1], "python -m utils.analysis RUN_DIR --input spots")]


def test_the_report_holds_no_absolute_path_and_embeds_at_most_max_maps(template, tmp_path):
    run = _copy(template, tmp_path)
    png = _first_map(run)
    genes = [f"G{i:03d}" for i in range(MAX_MAPS + 6)]
    (run / "maps/index.tsv").write_text("gene\tfile\n" + "".join(f"{g}\t{g}.png\n" for g in genes))
    for g in genes:
        shutil.copy(run / "maps" / png, run / "maps" / f"{g}.png")
    _json_edit("run.json", lambda d: d["args"].__setitem__("out", str(run)))(run)
    page = _report(run)
    assert str(tmp_path) not in page and str(REPO) not in page
    captions = re.findall(r"<figcaption>(G\d+)", page)
    assert captions == genes[:MAX_MAPS]
    assert f"6 more map(s) in maps/, not embedded: {', '.join(genes[MAX_MAPS:])}" in page


# ---- scores ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def truth(interp_run):  # noqa: F811
    return anndata.read_h5ad(interp_run[0] / "truth" / "super.h5ad")


def _truth_file(truth, tmp_path, edit):
    t = truth.copy()
    edited = edit(t)   # a new AnnData, or None for an edit in place (an empty AnnData is falsy)
    t = t if edited is None else edited
    path = tmp_path / "t.h5ad"
    t.write_h5ad(path)
    return path


def _set_obs(key, i, value):
    def edit(t):
        v = t.obs[key].to_numpy().copy()
        v[i] = value
        t.obs[key] = v
    return edit


def _duplicate_position(t):
    for key in ("row", "col"):
        _set_obs(key, 1, t.obs[key].iloc[0])(t)


def _duplicate_gene(t):
    t.var_names = [t.var_names[0], *t.var_names[:-1]]


REFUSED = {
    "no-gene-but-by-case": (lambda t: setattr(t, "var_names", t.var_names.str.lower()), "differ from a truth gene only "
                                                                                          "by case"),
    "no-gene": (lambda t: setattr(t, "var_names", "x" + t.var_names), "shares no gene with the run"),
    "no-observation": (lambda t: t[:0].copy(), "has no observations"),
    "no-x": (lambda t: anndata.AnnData(obs=t.obs, var=t.var), "has no X"),
    "row-1e9": (_set_obs("row", 0, 1e9), "a damaged row/col"),
    "other-grid": (lambda t: setattr(t, "obs", t.obs.assign(row=t.obs["row"] * 5 + 90)), "in common with the run"),
    "two-on-one-super-pixel": (_duplicate_position, "on a super-pixel that already has one"),
    "duplicated-genes": (_duplicate_gene, "duplicated gene names"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_score_refuses_a_truth_it_cannot_use_naming_it(interp_run, truth, tmp_path, case):  # noqa: F811
    """Tracebacks (ValueError, AttributeError, a 1.4 TiB allocation), an error naming no file, or a
    silently wrong score (another grid, two observations on one super-pixel)."""
    edit, fragment = REFUSED[case]
    path = _truth_file(truth, tmp_path, edit)
    with pytest.raises(InputError, match=re.escape(fragment)) as e:
        score_run(interp_run[1], path)
    assert str(e.value).startswith(f"{path}: ")


@pytest.mark.parametrize("case, said", [
    ("thin", "thinner than the 7 x 7 SSIM window"),
    ("crop", "% of the run's")])
def test_a_thin_or_partial_truth_is_scored_with_a_warning(interp_run, truth, tmp_path, caplog, case, said):  # noqa: F811
    rows = truth.obs["row"]
    keep = (rows >= rows.median()) & (rows < rows.median() + 4) if case == "thin" else rows < rows.quantile(0.3)
    path = _truth_file(truth, tmp_path, lambda t: t[keep.to_numpy()].copy())
    m = score_run(interp_run[1], path)
    assert any(said in w and str(path) in w for w in _warnings(caplog)), _warnings(caplog)
    assert np.isfinite(m["summary"]["pearson"]["median"])
    assert np.isnan(m["summary"]["ssim"]["median"]) == (case == "thin")
    if case == "crop":
        assert 0.1 < m["run_coverage"] < 0.5 and m["truth"] == str(path.resolve())


def test_histex_scoring_skips_a_truth_it_cannot_use(interp_run, truth, tmp_path, caplog):  # noqa: F811
    """HISTEX's scoring (score_data_directory_truth) warns and returns None instead of failing the run."""
    sr = anndata.read_h5ad(interp_run[1] / H5AD[0])
    rows, cols = sr.obs["row"].to_numpy(), sr.obs["col"].to_numpy()
    path = _truth_file(truth, tmp_path, _set_obs("row", 0, 1e9))
    assert score_data_directory_truth(rows, cols, np.asarray(sr.X), list(sr.var_names), path) is None
    assert len(_warnings(caplog)) == 1 and "the run is written without scores" in _warnings(caplog)[0]


def test_a_sparse_super_res_scores_as_the_dense_one(interp_run, tmp_path):  # noqa: F811
    run = tmp_path / "sparse"
    run.mkdir()
    sr = anndata.read_h5ad(interp_run[1] / H5AD[0])
    sr.X = sp.csr_matrix(sr.X)
    sr.write_h5ad(run / H5AD[0])
    truth = interp_run[0] / "truth" / "super.h5ad"
    assert score_run(run, truth)["per_gene"] == score_run(interp_run[1], truth)["per_gene"]


def _data_directory(interp_run, template, tmp_path):  # noqa: F811
    """A data directory around a copy of the run: calibration.json, the truth (linked)."""
    d = tmp_path / "D"
    run = _copy(template, d)
    shutil.copy(interp_run[0] / "calibration.json", d)
    (d / "truth").mkdir()
    (d / "truth" / "super.h5ad").symlink_to(interp_run[0] / "truth" / "super.h5ad")
    return d, run


def _score(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "utils.score", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_score_write_from_inside_the_run_rebuilds_the_report(interp_run, template, tmp_path, truth):  # noqa: F811
    """`cd RUN && python -m utils.score . --write` looked for ./../../truth (the wrong folder), printed
    an empty run name and left report.html showing the previous scores."""
    d, run = _data_directory(interp_run, template, tmp_path)
    (run / File.REPORT).write_text("old")
    r = _score(".", "--write", cwd=run)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^interp\s+\d", r.stdout, re.M), r.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["truth"] == str((d / "truth" / "super.h5ad").resolve())
    assert "Scores against the truth (metrics.json, truth truth/super.h5ad)" in (run / File.REPORT).read_text()
    bad = _truth_file(truth, tmp_path, lambda t: setattr(t, "var_names", t.var_names.str.lower()))
    before = snapshot(d)
    assert_user_error(_score(run, "--write", "--truth", bad), str(bad), "only by case")
    assert snapshot(d) == before


def test_histex_warns_about_a_truth_without_its_genes_and_keeps_the_run(demo_upstream, truth, tmp_path):
    """It failed after training with an error naming no file, losing the run."""
    d = copy_demo(demo_upstream, tmp_path / "d")
    _truth_file(truth, tmp_path, lambda t: setattr(t, "var_names", t.var_names.str.lower()))
    shutil.copy(tmp_path / "t.h5ad", d / "truth" / "super.h5ad")
    r = run_script("HISTEX.py", d, "--model", "interp", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    warning = [line for line in r.stderr.splitlines() if "WARNING" in line and "truth" in line]
    assert len(warning) == 1 and "truth/super.h5ad: shares no gene" in warning[0] and "only by case" in warning[0]
    run = d / "results" / "interp"
    assert not (run / "metrics.json").exists() and (run / File.REPORT).is_file()


def test_score_labels_runs_by_section_and_says_why_an_out_run_has_no_truth(interp_run, template, tmp_path):  # noqa: F811
    """Two sections' `interp` runs were two rows named `interp`; a run written with --out got
    'no truth to score against' with no word on why DIR/truth was not looked at."""
    a, run_a = _data_directory(interp_run, template, tmp_path / "A")
    b, run_b = _data_directory(interp_run, template, tmp_path / "B")
    r = _score(run_a, run_b)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^D/interp\s+\d", r.stdout, re.M) is None   # both sections' folders are named D
    assert str(run_a) in r.stdout and str(run_b) in r.stdout
    (a.parent / "S1").mkdir()
    shutil.move(a, a.parent / "S1" / "sec1")
    r = _score(a.parent / "S1" / "sec1" / "results" / "interp", run_b)
    assert re.search(r"^sec1/interp\s+\d", r.stdout, re.M) and re.search(r"^D/interp\s+\d", r.stdout, re.M), r.stdout
    out = _copy(template, tmp_path / "elsewhere").rename(tmp_path / "out-run")
    assert_user_error(_score(out), "no truth to score against", "--out", "--truth")
