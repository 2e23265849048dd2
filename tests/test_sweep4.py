"""The fourth robustness sweep (docs/ROBUSTNESS.md, rows 217-): what a rerun says it recomputes, the
report's settings, and where a run may be written."""
import os

from conftest import REPO, assert_user_error, copy_demo, run_script, snapshot


def test_the_manifest_records_the_settings_the_run_applies(tmp_path):
    """HISTEX's 'recomputing:' line named --epochs for --model interp, and --out given once relative
    and once absolute, though neither changes the run."""
    from utils.superres.config import HistexConfig as H
    interp = H(model="interp", epochs=3, seed=4).applied_parameters()
    assert interp == H(model="interp").applied_parameters()
    assert H(val_fraction=0.3).applied_parameters() == H().applied_parameters()   # with cross-fitting
    assert H(epochs=3).applied_parameters() != H().applied_parameters()
    assert H(out=tmp_path / "run").applied_parameters()["out"] == str((tmp_path / "run").resolve())
    assert H(model="interp", epochs=3, seed=4).unread == ["epochs", "seed"]
    assert H().unread == []


def test_a_rerun_logs_only_what_changes_the_run(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "small")
    relative = os.path.relpath(d / "results" / "i", REPO)     # the stages run in the repository
    assert run_script("HISTEX.py", d, "--model", "interp", "--out", relative).returncode == 0
    r = run_script("HISTEX.py", d, "--model", "interp", "--epochs", "3", "--out", str(d / "results" / "i"))
    assert r.returncode == 0, r.stderr
    assert "recomputing" not in r.stderr and "--model interp ignores --epochs" in r.stderr
    r = run_script("HISTEX.py", d, "--model", "interp", "--sigma", "2", "--out", str(d / "results" / "i"))
    assert "recomputing: --sigma" in r.stderr


def test_the_report_marks_the_settings_the_run_did_not_read(tmp_path):
    from utils.report.page import _args_table
    html = _args_table({"args": {"epochs": "3", "sigma": "1.0"}, "args_unread": ["epochs"]})
    assert "3 (not used by this run)" in html and "1.0 (not used" not in html
    assert "not used" not in _args_table({"args": {"epochs": "3"}})      # a run.json written before the key


def test_a_run_written_into_a_stage_artifact_folder_is_refused(demo_upstream, tmp_path):
    """--out DIR/features (or manifests, truth) was taken: the run sat among the stages' artifacts."""
    d = copy_demo(demo_upstream, tmp_path / "small")
    before = snapshot(d)
    for sub in ("features", "manifests/run", "truth"):
        assert_user_error(run_script("HISTEX.py", d, "--model", "interp", "--out", d / sub), "--out",
                          "another stage", "results")
        assert snapshot(d) == before


def _tables(d):
    from utils.core.raw_io import read_counts, read_locs, read_pixel_size
    ids, genes, X = read_counts(d)
    locs, _ = read_locs(d)
    return list(ids), list(genes), X, locs, read_pixel_size(d)


def test_tables_are_read_by_their_content_not_their_name(raw, tmp_path):
    """A comma-separated cnts.tsv (to_csv's default), a tab file named cnts.csv, gzip'd content named
    cnts.tsv or locs-raw.tsv, and a pixel size written 0.4um were refused with misleading lines."""
    import gzip
    import shutil

    import pandas as pd
    want = _tables(raw)
    cases = {
        "comma-tsv": lambda d: pd.read_csv(d / "cnts.tsv", sep="\t").to_csv(d / "cnts.tsv", index=False),
        "tab-csv": lambda d: (d / "cnts.tsv").rename(d / "cnts.csv"),
        "gzip-named-tsv": lambda d: [(d / n).write_bytes(gzip.compress((d / n).read_bytes()))
                                     for n in ("cnts.tsv", "locs-raw.tsv")],
        "comma-locs": lambda d: pd.read_csv(d / "locs-raw.tsv", sep="\t").to_csv(d / "locs-raw.tsv", index=False),
        "glued-unit": lambda d: (d / "pixel-size-raw.txt").write_text("0.4um\n"),
    }
    for name, damage in cases.items():
        d = shutil.copytree(raw, tmp_path / name)
        damage(d)
        got = _tables(d)
        assert got[:2] == want[:2] and (got[2] == want[2]).all(), name
        assert got[3].equals(want[3]) and got[4] == want[4], name


def test_an_empty_spot_id_or_gene_name_is_named(raw, tmp_path):
    """An empty spot id was reported as a spot of the counts without a location '()'; an empty gene
    name became pandas' 'Unnamed: 4' in spots.h5ad."""
    import shutil
    d = shutil.copytree(raw, tmp_path / "id")
    lines = (d / "cnts.tsv").read_text().splitlines()
    lines[3] = "\t" + lines[3].split("\t", 1)[1]
    (d / "cnts.tsv").write_text("\n".join(lines) + "\n")
    assert run_script("image_calibration.py", d).returncode == 0
    assert_user_error(run_script("get_HR.py", d), "cnts.tsv: line 4 has an empty spot id")
    d = shutil.copytree(raw, tmp_path / "gene")
    lines = (d / "cnts.tsv").read_text().splitlines()
    lines[0] = "\t".join(name if i != 4 else "" for i, name in enumerate(lines[0].split("\t")))
    (d / "cnts.tsv").write_text("\n".join(lines) + "\n")
    assert run_script("image_calibration.py", d).returncode == 0
    assert_user_error(run_script("get_HR.py", d), "cnts.tsv: column 5 of the header has no gene name")
