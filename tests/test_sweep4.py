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


def test_marker_tables_name_their_own_problems(tmp_path):
    """A cell type named 'unassigned' (the label of no match) crashed pandas; 'TS<TAB>' was said to
    have the wrong number of fields; a cell-type name was called a set name."""
    import pytest

    from utils.analysis.genesets import read_gene_table
    from utils.core.errors import InputError
    cases = {"unassigned\tG1\n": "'unassigned' is reserved", "TS\t\n": "line 1 has an empty gene",
             "\tG1\n": "line 1 has an empty cell-type name", "a b\tG1\n": "not a usable cell-type name"}
    for text, said in cases.items():
        (tmp_path / "m.tsv").write_text(text)
        with pytest.raises(InputError, match=said):
            read_gene_table(tmp_path / "m.tsv", what="marker table", kind="cell-type name", reserved=("unassigned",))
    (tmp_path / "m.tsv").write_text("Unassigned\tG1\n")
    assert read_gene_table(tmp_path / "m.tsv", what="gene-set file") == {"Unassigned": ["G1"]}   # only where reserved


def _maps(path, X, genes=("A", "B")):
    import anndata
    import numpy as np
    import pandas as pd
    n = len(X)
    anndata.AnnData(X=np.asarray(X, np.float32), obs=pd.DataFrame({"row": range(n), "col": [0] * n},
                                                                   index=[str(i) for i in range(n)]),
                    var=pd.DataFrame(index=list(genes))).write_h5ad(path)
    return path


def test_maps_that_are_not_predicted_counts_are_refused(tmp_path, recwarn):
    """A super-res.h5ad scaled by sc.pp.scale (negative values), all zero, of no observation, or with a
    gene twice crashed the analysis (NaN in PCA), utils.score (ZeroDivisionError), or was scored."""
    import pytest

    from utils.core.errors import InputError
    from utils.core.h5ad_io import read_maps
    cases = {"scaled": ([[1, -0.5], [0.2, 1]], ("A", "B"), "2 negative|1 negative value"),
             "zero": ([[0, 0], [0, 0]], ("A", "B"), "every value of X is zero"),
             "empty": (__import__("numpy").zeros((0, 2)), ("A", "B"), "0 observation"),
             "twice": ([[1, 2], [3, 4]], ("A", "A"), "duplicated gene names \\(A\\)")}
    files = {name: _maps(tmp_path / f"{name}.h5ad", X, genes) for name, (X, genes, _) in cases.items()}
    recwarn.clear()   # anndata's own, when the file is made
    for name, (_, _, said) in cases.items():
        with pytest.raises(InputError, match=said):
            read_maps(files[name], "rerun HISTEX.py")
    assert read_maps(_maps(tmp_path / "ok.h5ad", [[1, 0], [0, 2]]), "rerun HISTEX.py").n_obs == 2
    assert not [w for w in recwarn if "not unique" in str(w.message)]


def test_a_damaged_protocol_folder_is_one_line(tmp_path):
    """protocols score did not check heldout/ or protocol.json: NaN or text coordinates and a missing
    spot were tracebacks; a radius of 0, a spot off the image, a negative count were scored."""
    import json
    import shutil

    import numpy as np
    import pytest
    from conftest import square_lattice, write_raw_dir

    from utils.core.errors import InputError
    from utils.evaluation.heldout import HeldOut
    from utils.evaluation.protocols import make
    src = write_raw_dir(tmp_path / "src", square_lattice(6, 6, 250.0, origin=(300, 300)), pixel_size=0.5, n_genes=8)
    (src / "section.json").write_text(json.dumps({"array_x": np.tile(np.arange(6), 6).tolist(),
                                                  "array_y": np.repeat(np.arange(6), 6).tolist()}))
    make("leave-out", src, tmp_path / "lo")
    (tmp_path / "lo" / "calibration.json").write_text(json.dumps({"scale": 1.0, "superpixel_grid": [120, 120],
                                                                  "superpixel_px": 16}))
    HeldOut(tmp_path / "lo")

    def edit_line(rel, i, field, value):
        def edit(d):
            import gzip
            p = d / rel
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rt") as f:
                lines = f.read().splitlines()
            cells = lines[i].split("\t")
            cells[field] = value
            lines[i] = "\t".join(cells)
            with opener(p, "wt") as f:
                f.write("\n".join(lines) + "\n")
        return edit

    def protocol(**kw):
        def edit(d):
            rec = json.loads((d / "protocol.json").read_text())
            (d / "protocol.json").write_text(json.dumps({**rec, **kw}))
        return edit
    cases = {"nan": (edit_line("heldout/locs-raw.tsv", 2, 1, "nan"), "missing or non-numeric x/y"),
             "text": (edit_line("heldout/locs-raw.tsv", 2, 1, "left"), "missing or non-numeric x/y"),
             "off": (edit_line("heldout/locs-raw.tsv", 2, 1, "1e9"), "off the section's image"),
             "negative": (edit_line("heldout/cnts.tsv.gz", 2, 1, "-5"), "negative count"),
             "radius": (protocol(radius_raw_px=0), "radius_raw_px 0"),
             "kind": (protocol(protocol="bogus"), "protocol 'bogus'"),
             "missing": (lambda d: (d / "heldout" / "locs-raw.tsv").write_text(
                 "\n".join((d / "heldout" / "locs-raw.tsv").read_text().splitlines()[:-1]) + "\n"), "have no location")}
    for name, (damage, said) in cases.items():
        d = shutil.copytree(tmp_path / "lo", tmp_path / name)
        damage(d)
        with pytest.raises(InputError, match=said) as e:
            HeldOut(d)
        assert "utils.protocols make" in str(e.value), name


def test_the_lock_file_as_a_folder_and_observations_without_counts(tmp_path, recwarn):
    import anndata
    import numpy as np
    import pytest

    from utils.analysis.preprocess import normalise_log
    from utils.core.errors import InputError
    from utils.core.stage import LOCK_NAME, DirectoryLock
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(InputError, match="remove that folder"):
        DirectoryLock(tmp_path, "HISTEX.py").acquire()
    ad = anndata.AnnData(np.array([[0, 0], [1, 3], [2, 2]], np.float32))
    normalise_log(ad)
    assert np.isfinite(ad.X).all() and not [w for w in recwarn if "zero counts" in str(w.message)]


def test_the_report_and_scores_are_not_what_makes_a_run_stale(demo_upstream, tmp_path):
    """utils.analysis rewrites report.html, which HISTEX's manifest fingerprinted: the cohort then
    reran HISTEX (inference and fusion again) after every analysis, without saying why."""
    from utils.core import manifest as mf
    d = copy_demo(demo_upstream, tmp_path / "small")
    assert run_script("HISTEX.py", d, "--model", "interp").returncode == 0
    (d / "results" / "interp" / "report.html").write_text("rewritten by the analysis")
    assert mf.out_of_date(d, "HISTEX") == []
    (d / "results" / "interp" / "run.json").write_text("{}")
    assert mf.out_of_date(d, "HISTEX")


def test_a_gene_list_is_recorded_by_its_absolute_path(demo_upstream, tmp_path):
    """get_HR recorded --gene-list as typed: the same file by another path logged 'recomputing', and a
    relative path was checked against the wrong folder from another working directory."""
    import json
    d = copy_demo(demo_upstream, tmp_path / "small")
    genes = [line.split("\t")[0] for line in (d / "genes.tsv").read_text().splitlines()[1:4]]
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
    assert run_script("get_HR.py", d, "--gene-list", os.path.relpath(tmp_path / "genes.txt", REPO)).returncode == 0
    m = json.loads((d / "manifests" / "get_HR.json").read_text())
    assert m["parameters"]["gene_list"] == str((tmp_path / "genes.txt").resolve())
    r = run_script("get_HR.py", d, "--gene-list", tmp_path / "genes.txt")
    assert r.returncode == 0 and "recomputing" not in r.stderr


def _module(*args, env=None):
    import subprocess
    import sys
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True, text=True, env=e,
                          timeout=300)


def test_cohort_and_demo_say_one_thing_once(tmp_path):
    """A bad option of utils.cohort under torchrun was said by every rank; --stage-args HISTEX=-h printed
    HISTEX's whole help before refusing it; a demo refused at its first step added that 'the artifacts
    so far' were in the folder it had not touched."""
    section = tmp_path / "s"
    section.mkdir()
    r = _module("utils.cohort", section, "-j", "0", env={"RANK": "1", "WORLD_SIZE": "2"})
    assert r.returncode == 2 and "error:" not in r.stderr
    assert_user_error(_module("utils.cohort", section, "-j", "0"), "--jobs")
    r = _module("utils.cohort", section, "--stage-args", "HISTEX=-h")
    assert_user_error(r, "only options that run the stage")
    assert "usage" not in r.stdout
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    r = _module("utils.demo", "--directory", tmp_path / "mine", "--size", "small")
    assert_user_error(r, "notes.txt")
    assert "no step before it ran" in r.stdout


def test_spots_h5ad_is_checked_for_what_no_get_hr_writes(demo_upstream, tmp_path):
    """HISTEX --force on a spots.h5ad rewritten by hand: a sparse X (a scanpy round trip) and
    scale_max 0 were tracebacks; all-zero counts, duplicated ids, a negative radius and 2 spots ran
    to exit 0 (with NumPy's warnings in the log)."""
    import anndata
    import numpy as np
    import pytest
    from scipy import sparse

    from utils.core import layout as L
    from utils.core.errors import InputError
    d = copy_demo(demo_upstream, tmp_path / "small")
    good = anndata.read_h5ad(d / "spots.h5ad")

    def edited(change):
        ad = good.copy()
        change(ad)
        ad.write_h5ad(d / "spots.h5ad")
        return d
    assert not sparse.issparse(L.read_spots(edited(lambda a: setattr(a, "X", sparse.csr_matrix(a.X)))).X)
    cases = {"every count is zero": lambda a: setattr(a, "X", np.zeros_like(a.X)),
             "duplicated spot ids": lambda a: setattr(a, "obs_names", ["s"] * a.n_obs),
             "radius_px -5": lambda a: a.uns.__setitem__("radius_px", -5),
             "2 spot": lambda a: a._inplace_subset_obs(np.arange(2)),
             "scale_min / scale_max": lambda a: a.var.__setitem__("scale_max", 0.0)}
    for said, change in cases.items():
        with pytest.raises(InputError, match=said):
            L.read_spots(edited(change))


def test_stage_options_and_locations_odd_values(demo_upstream, tmp_path):
    """--plot-genes given twice kept only the last list, ' HK_01' and '' got puzzling lines;
    --weights '' was read as the current folder; --backbone timm: was said to need --weights; a
    locs.tsv of no spot gave a mask with exit 0."""
    d = copy_demo(demo_upstream, tmp_path / "small")
    r = run_script("HISTEX.py", d, "--model", "interp", "--plot-genes", " HK_01", "--plot-genes", "HK_02")
    assert r.returncode == 0, r.stderr[-2000:]
    drawn = (d / "results" / "interp" / "maps" / "index.tsv").read_text()
    assert "HK_01" in drawn and "HK_02" in drawn
    assert_user_error(run_script("HISTEX.py", d, "--plot-genes", ""), "an empty gene name")
    assert_user_error(run_script("Histology_Extractor.py", d, "--weights", ""), "an empty path")
    assert_user_error(run_script("Histology_Extractor.py", d, "--backbone", "timm:"), "names no architecture")
    (d / "locs.tsv").write_text("spot\tx\ty\n")
    assert_user_error(run_script("masking_non_tissue.py", d, "--force"), "locs.tsv", "no spots")
