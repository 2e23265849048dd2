"""The second robustness sweep (docs/ROBUSTNESS.md, rows 76-): damaged artifacts inside DIR, valid
but unusual inputs (BOMs, CRLF, string ids that look like numbers, JPEG trailers, EXIF, 1 px images),
and silent losses (gene maps overwriting each other, names a TSV cannot hold, degenerate lattices,
absurd footprints)."""
import json
import logging
from pathlib import Path

import anndata
import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error, copy_demo, hex_lattice, run_script, snapshot
from test_robustness import FAST, _in_process


def _recode(name, encoding):
    def f(d):
        text = (d / name).read_text()
        (d / name).write_bytes(text.encode(encoding))
    return f


def _to_dir(name):
    def f(d):
        (d / name).unlink()
        (d / name).mkdir()
    return f


def _header_only(name):
    return lambda d: (d / name).write_text((d / name).read_text().splitlines()[0] + "\n")


def _one_location(d):
    df = pd.read_csv(d / "locs-raw.tsv", sep="\t")
    df["x"], df["y"] = 400.0, 400.0
    df.to_csv(d / "locs-raw.tsv", sep="\t", index=False)


def _gene_list(data):
    def f(d):
        (d / "genes.txt").write_bytes(data)
        return ["--gene-list", d / "genes.txt"]
    return f


def _transpose_counts(d):
    df = pd.read_csv(d / "cnts.tsv", sep="\t", dtype={0: str})
    df.set_index(df.columns[0]).T.rename_axis("gene").reset_index().to_csv(d / "cnts.tsv", sep="\t", index=False)


# (id, stage, mutate -> extra args or None, fragments of the one error line)
def _extra_value(name, value):
    def f(d):
        lines = (d / name).read_text().splitlines()
        (d / name).write_text("\n".join(lines[:1] + [line + "\t" + value for line in lines[1:]]) + "\n")
    return f


REFUSED = [
    ("locs-unnamed-extra-column", "image_calibration.py", _extra_value("locs-raw.tsv", "1000"),
     ["locs-raw.tsv", "has 4 fields, the header 3"]),
    ("counts-trailing-tab", "get_HR.py", _extra_value("cnts.tsv", ""), ["cnts.tsv", "(a trailing tab or comma?)"]),
    ("pixel-size-utf16", "image_calibration.py", _recode("pixel-size-raw.txt", "utf-16"), ["pixel-size-raw.txt", "UTF-16", "save it as UTF-8"]),
    ("locs-utf16", "image_calibration.py", _recode("locs-raw.tsv", "utf-16"), ["locs-raw.tsv", "UTF-16", "UTF-8"]),
    ("counts-utf16", "get_HR.py", _recode("cnts.tsv", "utf-16"), ["cnts.tsv", "UTF-16", "UTF-8"]),
    ("gene-list-utf16", "get_HR.py", _gene_list("G1\nG2\n".encode("utf-16")), ["genes.txt", "UTF-16", "UTF-8"]),
    ("pixel-size-dir", "image_calibration.py", _to_dir("pixel-size-raw.txt"), ["pixel-size-raw.txt", "is a directory"]),
    ("radius-dir", "image_calibration.py", _to_dir("radius-raw.txt"), ["radius-raw.txt", "is a directory"]),
    ("locs-dir", "image_calibration.py", _to_dir("locs-raw.tsv"), ["locs-raw.tsv", "is a directory"]),
    ("image-dir", "image_calibration.py", _to_dir("he-raw.png"), ["he-raw.png", "is a directory"]),
    ("counts-dir", "get_HR.py", _to_dir("cnts.tsv"), ["cnts.tsv", "is a directory"]),
    ("locs-header-only", "image_calibration.py", _header_only("locs-raw.tsv"), ["locs-raw.tsv", "only a header"]),
    ("counts-header-only", "get_HR.py", _header_only("cnts.tsv"), ["cnts.tsv", "only a header"]),
    ("locs-empty", "image_calibration.py", lambda d: (d / "locs-raw.tsv").write_text(""), ["locs-raw.tsv", "empty"]),
    ("counts-empty", "get_HR.py", lambda d: (d / "cnts.tsv").write_text(""), ["cnts.tsv", "empty"]),
    ("image-1x1", "image_calibration.py", lambda d: cv2.imwrite(str(d / "he-raw.png"), np.zeros((1, 1, 3), np.uint8)) and None,
     ["he-raw.png", "1 x 1 px", "smaller than one 224 px tile"]),
    ("all-spots-one-location", "image_calibration.py", _one_location, ["locs-raw.tsv", "share a location", "own x, y"]),
    ("pixel-size-two-numbers", "image_calibration.py", lambda d: (d / "pixel-size-raw.txt").write_text("0.4\n0.5\n") and None,
     ["pixel-size-raw.txt", "holds 2 numbers", "one number"]),
    ("pixel-size-decimal-comma", "image_calibration.py", lambda d: (d / "pixel-size-raw.txt").write_text("0,4\n") and None,
     ["pixel-size-raw.txt", "'0,4'", "dot as the decimal separator (0.4)"]),
    ("counts-transposed", "get_HR.py", _transpose_counts, ["cnts.tsv", "genes as rows", "transpose it"]),
    ("radius-450um", "get_HR.py", lambda d: (d / "radius-raw.txt").write_text(f"{450 / 0.4}\n") and None,
     ["radius-raw.txt", "4.5x", "spacing"]),
]


@pytest.mark.parametrize("row,script,mutate,fragments", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_one_line(raw, tmp_path, row, script, mutate, fragments):
    d = copy_demo(raw, tmp_path / "d")
    args = mutate(d)
    args = list(args) if isinstance(args, list) else []
    if script != "image_calibration.py":
        assert run_script("image_calibration.py", d, "-q").returncode == 0
        if "--gene-list" not in args:
            args += ["--n-genes", 5]
    before = snapshot(d)
    assert_user_error(run_script(script, d, *args), *fragments)
    assert snapshot(d) == before


def _bom(name):
    return _recode(name, "utf-8-sig")


def _crlf(name):
    return lambda d: (d / name).write_bytes((d / name).read_text().replace("\n", "\r\n").encode())


def _r_write_table(name):
    """As R's write.table(df, sep="\t") writes it: every name quoted, and no name for the row names."""
    def f(d):
        rows = [line.split("\t") for line in (d / name).read_text().splitlines()]
        quoted = lambda fields: "\t".join(f'"{v}"' for v in fields)  # noqa: E731
        (d / name).write_text("\n".join([quoted(rows[0][1:])] + [quoted(r[:1]) + "\t" + "\t".join(r[1:])
                                                                   for r in rows[1:]]) + "\n")
    return f


def _r_row_numbers(name):
    """R's write.table of a data frame with a spot column: quoted names, row numbers 1, 2, ... first."""
    def f(d):
        rows = [line.split("\t") for line in (d / name).read_text().splitlines()]
        (d / name).write_text("\n".join(["\t".join(f'"{v}"' for v in rows[0])]
                                        + [f'"{i}"\t"{r[0]}"\t' + "\t".join(r[1:]) for i, r in enumerate(rows[1:], 1)])
                              + "\n")
    return f


ACCEPTED = [("r-row-numbers", [_r_row_numbers(n) for n in ("locs-raw.tsv", "cnts.tsv")], _gene_list(b"G1\nG2\n")),
            ("r-write-table", [_r_write_table(n) for n in ("locs-raw.tsv", "cnts.tsv")], _gene_list(b"G1\nG2\n")),
            ("bom", [_bom(n) for n in ("pixel-size-raw.txt", "radius-raw.txt", "locs-raw.tsv", "cnts.tsv")],
             _gene_list("\ufeffG1\nG2\n".encode())),
            ("crlf", [_crlf(n) for n in ("pixel-size-raw.txt", "radius-raw.txt", "locs-raw.tsv", "cnts.tsv")],
             _gene_list(b"G1\r\nG2\r\n"))]


@pytest.mark.parametrize("row,mutators,gene_list", ACCEPTED, ids=[r[0] for r in ACCEPTED])
def test_unusual_but_valid_tables_are_read_like_plain_ones(raw, tmp_path, row, mutators, gene_list):
    d = copy_demo(raw, tmp_path / "d")
    for m in mutators:
        m(d)
    args = gene_list(d)
    assert run_script("image_calibration.py", d, "-q").returncode == 0
    r = run_script("get_HR.py", d, *args, "-q")
    assert r.returncode == 0, r.stderr
    clean = copy_demo(raw, tmp_path / "clean")
    gene_list(clean)
    (clean / "genes.txt").write_text("G1\nG2\n")
    run_script("image_calibration.py", clean, "-q")
    run_script("get_HR.py", clean, "--gene-list", clean / "genes.txt", "-q")
    a, b = anndata.read_h5ad(d / "spots.h5ad"), anndata.read_h5ad(clean / "spots.h5ad")
    assert list(a.var_names) == ["G1", "G2"] and list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.X, b.X)
    assert (d / "radius.txt").read_text() == (clean / "radius.txt").read_text()


def test_spot_ids_are_text_everywhere(raw, tmp_path):
    """0.1 / 0.10 / 000 / 0 / 1e3 / NA are six different spots, kept exactly as written."""
    d = copy_demo(raw, tmp_path / "d")
    ids = ["0.1", "0.10", "000", "0", "1e3", "NA"] + [str(i) for i in range(6, 30)]
    for name in ("cnts.tsv", "locs-raw.tsv"):
        df = pd.read_csv(d / name, sep="\t", dtype=str)
        df.iloc[:, 0] = ids
        df.to_csv(d / name, sep="\t", index=False)
    assert run_script("image_calibration.py", d, "-q").returncode == 0
    r = run_script("get_HR.py", d, "--n-genes", 5, "-q")
    assert r.returncode == 0, r.stderr
    assert list(anndata.read_h5ad(d / "spots.h5ad").obs_names) == ids
    locs = pd.read_csv(d / "locs.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(locs.iloc[:, 0]) == ids


def test_jpeg_with_trailer_is_read_and_truncated_jpeg_refused(raw, tmp_path):
    d = copy_demo(raw, tmp_path / "d")
    img = cv2.imread(str(d / "he-raw.png"))
    (d / "he-raw.png").unlink()
    cv2.imwrite(str(d / "he-raw.jpg"), img)
    full = (d / "he-raw.jpg").read_bytes()
    (d / "he-raw.jpg").write_bytes(full + b"SCANNER-TRAILER" * 500)  # no JPEG end marker in the last bytes
    r = run_script("image_calibration.py", d, "-q")
    assert r.returncode == 0, r.stderr
    (d / "he-raw.jpg").write_bytes(full[: len(full) // 2])
    assert_user_error(run_script("image_calibration.py", d, "--force"), "he-raw.jpg", "truncated")


def test_exif_orientation_is_logged_as_ignored(tmp_path, caplog):
    from PIL import Image

    from utils.core.image_io import read_rgb
    p = tmp_path / "he.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(p, exif=exif)
    with caplog.at_level(logging.WARNING, logger="trihrge"):
        rgb = read_rgb(p)
    assert rgb.shape == (40, 60, 3)  # pixels as stored, like Space Ranger's coordinates
    assert "orientation 6" in caplog.text and "ignored" in caplog.text


def test_image_above_pillow_bomb_limit_and_memory_check(tmp_path, monkeypatch):
    """Pillow's decompression-bomb guard (and OpenCV's 2^30 px limit) do not apply: memory is checked."""
    from PIL import Image

    from utils.core import image_io
    from utils.core.errors import InputError
    p = tmp_path / "big.png"
    Image.new("L", (13500, 13500), 180).save(p)  # 182 Mpx: over Pillow's 2 x 89 Mpx error limit
    assert image_io.read_rgb(p).shape == (13500, 13500, 3)
    monkeypatch.setattr(image_io, "available_memory", lambda: 10 * 2 ** 20)
    with pytest.raises(InputError, match="needs about .* GiB of memory"):
        image_io.read_rgb(p)


def test_collinear_spots_are_not_a_lattice():
    from utils.spots.lattice import describe_lattice
    line = np.c_[np.arange(10) * 100.0, np.full(10, 50.0)]
    assert describe_lattice(line)["kind"] == "irregular"
    assert describe_lattice(line[:3])["kind"] == "irregular"
    assert describe_lattice(hex_lattice(6, 2, 100.0))["kind"] == "hexagonal"  # a two-row strip is still hexagonal
    assert describe_lattice(hex_lattice(6, 5, 100.0))["kind"] == "hexagonal"


def test_footprint_overlapping_neighbours_warns(raw, tmp_path):
    d = copy_demo(raw, tmp_path / "d")
    (d / "radius-raw.txt").write_text(f"{225 / 0.4}\n")
    run_script("image_calibration.py", d, "-q")
    r = run_script("get_HR.py", d, "--n-genes", 5)
    assert r.returncode == 0 and "overlaps its neighbours" in r.stderr, r.stderr


def test_gene_maps_never_overwrite_each_other():
    from utils.superres.outputs import map_file_names
    genes = ["HLA/A", "HLA_A", "HLA?A", "hla_a", "ERBB2", "..", ""]
    files = map_file_names(genes)
    assert len(set(f.lower() for f in files.values())) == len(genes)
    assert files["ERBB2"] == "ERBB2.png"
    assert all("/" not in f and f not in (".png", "..png") for f in files.values())


def test_gene_maps_index_in_a_run(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "d")
    genes = list(pd.read_csv(d / "genes.tsv", sep="\t", index_col=0).index[:2])
    r = run_script("HISTEX.py", d, "--model", "interp", "--plot-genes", *genes, "-q")
    assert r.returncode == 0, r.stderr
    index = pd.read_csv(d / "results" / "interp" / "maps" / "index.tsv", sep="\t")
    assert list(index["gene"]) == genes
    assert all((d / "results" / "interp" / "maps" / f).is_file() for f in index["file"])


def _state(d, suffix):
    return d / "results" / "trihrge" / "states" / f"state-00{suffix}"


DAMAGED_STATES = [
    ("json-corrupt", ".json", lambda p: p.write_text("{bad")),
    ("json-list", ".json", lambda p: p.write_text("[1]")),
    ("json-no-history", ".json", lambda p: p.write_text(json.dumps({"fingerprint": "x"}))),
    ("pt-truncated", ".pt", lambda p: p.write_bytes(p.read_bytes()[:100])),
]


def test_damaged_states_are_retrained_with_a_warning(demo_upstream, tmp_path):
    """A trained state is a cache: each kind of damage is retrained with a warning, to the same result."""
    d = copy_demo(demo_upstream, tmp_path / "d")
    assert run_script("HISTEX.py", d, *FAST).returncode == 0
    first = anndata.read_h5ad(d / "results" / "trihrge" / "super-res.h5ad").X
    for row, suffix, damage in DAMAGED_STATES:
        damage(_state(d, suffix))
        r = run_script("HISTEX.py", d, *FAST[:-1])
        assert r.returncode == 0, (row, r.stderr)
        assert "damaged" in r.stderr and "training this state again" in r.stderr, (row, r.stderr)
        assert "state 2/2: already trained" in r.stderr, (row, r.stderr)
        np.testing.assert_array_equal(anndata.read_h5ad(d / "results" / "trihrge" / "super-res.h5ad").X, first)
    _state(d, ".json").write_text("{bad")
    assert run_script("HISTEX.py", d, *FAST, "--retrain").returncode == 0


def _features_json(edit):
    def f(d):
        p = d / "features" / "features.json"
        p.write_text(json.dumps(edit(json.loads(p.read_text()))))
        return ["--force"]
    return f


def _h5ad(name, edit):
    def f(d):
        a = anndata.read_h5ad(d / name)
        edit(a)
        a.write_h5ad(d / name)
        return ["--force"]
    return f


def _set_first(column, value):
    def edit(a):
        a.obs.iloc[0, a.obs.columns.get_loc(column)] = value
    return edit


def _negative_count(a):
    X = np.asarray(a.X, dtype=np.float32).copy()
    X[0, 0] = -5
    a.X = X


def _calibration(key, value):
    def f(d):
        p = d / "calibration.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), key: value}))
        return ["--force"]
    return f


def _features_is_a_file(d):
    import shutil
    shutil.rmtree(d / "features")
    (d / "features").write_text("x")
    return ["--force"]


def _feature_nan(d):
    """NaN at one tissue super-pixel of micro.npy (where the spots' windows or inference read it)."""
    mask = cv2.imread(str(d / "mask.png"), cv2.IMREAD_GRAYSCALE) > 127
    rows, cols = np.nonzero(mask)
    m = np.load(d / "features" / "micro.npy")
    m[rows[len(rows) // 2], cols[len(cols) // 2], 0] = np.nan
    np.save(d / "features" / "micro.npy", m)
    return ["--force"]


DAMAGED = [
    ("spots-x-nan", "HISTEX.py", _h5ad("spots.h5ad", _set_first("x", np.nan)), ["spots.h5ad", "obs 'x'", "get_HR.py"]),
    ("spots-negative-count", "HISTEX.py", _h5ad("spots.h5ad", _negative_count), ["spots.h5ad", "X holds", "get_HR.py"]),
    ("hr-spots-y-nan", "HISTEX.py", _h5ad("hr-spots.h5ad", _set_first("y", np.nan)), ["hr-spots.h5ad", "obs 'y'", "get_HR.py"]),
    ("calibration-radius-text", "get_HR.py", _calibration("radius_px", "big"), ["calibration.json", "radius_px", "image_calibration.py"]),
    ("calibration-scale-negative", "HISTEX.py", _calibration("scale", -1), ["calibration.json", "scale", "image_calibration.py"]),
    ("features-dir-is-a-file", "Histology_Extractor.py", _features_is_a_file, ["features", "is a file where a directory", "delete it"]),
    ("features-nan", "HISTEX.py", _feature_nan, ["micro.npy", "NaN or infinite values (first at super-pixel", "Histology_Extractor.py"]),
    ("features-json-dims-text", "HISTEX.py", _features_json(lambda m: {**m, "dims": "x"}), ["features.json", "Histology_Extractor.py"]),
    ("features-json-grid-short", "HISTEX.py", _features_json(lambda m: {**m, "grid_shape": [3]}), ["features.json", "Histology_Extractor.py"]),
    ("features-json-null", "HISTEX.py", lambda d: (d / "features" / "features.json").write_text("null") and ["--force"],
     ["features.json", "Histology_Extractor.py"]),
    ("spots-truncated", "HISTEX.py", lambda d: (d / "spots.h5ad").write_bytes((d / "spots.h5ad").read_bytes()[:500]) and ["--force"],
     ["spots.h5ad", "get_HR.py"]),
    ("mask-garbage", "HISTEX.py", lambda d: (d / "mask.png").write_bytes(b"garbage") and ["--force"],
     ["mask.png", "rerun `python masking_non_tissue.py"]),
    ("manifest-empty-object", "HISTEX.py", lambda d: (d / "manifests" / "get_HR.json").write_text("{}") and [],
     ["get_HR.json", "rerun `python get_HR.py"]),
    ("manifest-null", "HISTEX.py", lambda d: (d / "manifests" / "Histology_Extractor.json").write_text("null") and [],
     ["Histology_Extractor.json", "rerun `python Histology_Extractor.py"]),
]


@pytest.mark.parametrize("row,script,mutate,fragments", DAMAGED, ids=[r[0] for r in DAMAGED])
def test_damaged_artifacts(demo_upstream, tmp_path, capsys, row, script, mutate, fragments):
    d = copy_demo(demo_upstream, tmp_path / "d")
    args = mutate(d)
    before = snapshot(d)
    extra = FAST if script == "HISTEX.py" else []
    assert_user_error(_in_process(script, d, [*args, *extra], capsys), *fragments)
    assert snapshot(d) == before


@pytest.mark.parametrize("content", ["{}", "[]", "null"])
def test_damaged_manifest_never_blocks_the_stage_that_writes_it(demo_upstream, tmp_path, content):
    d = copy_demo(demo_upstream, tmp_path / "d")
    (d / "manifests" / "get_HR.json").write_text(content)
    r = run_script("get_HR.py", d, "--n-genes", 40, "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((d / "manifests" / "get_HR.json").read_text())["stage"] == "get_HR"


def test_out_where_nothing_can_be_written(tmp_path):
    """HISTEX.py --out or utils.cohort --summary under a file, or where the file system refuses a
    folder (/proc), is refused when the options are read, not by a traceback after the work; a new
    nested folder is accepted, and nothing is left behind."""
    import argparse

    from utils.core.cli import output_directory, output_file
    (tmp_path / "f").write_text("x")
    proc = [("/proc/trihrge-out", "nothing can be written in /proc")] if Path("/proc/self").exists() else []
    for check in (output_directory, output_file):
        for bad, fragment in [(tmp_path / "f" / "x", "is not a directory"), *proc]:
            with pytest.raises(argparse.ArgumentTypeError, match=fragment):
                check(str(bad))
    with pytest.raises(argparse.ArgumentTypeError, match="is not a directory"):
        output_directory(str(tmp_path / "f"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory; give a file name"):
        output_file(str(tmp_path))
    assert output_directory(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert output_file(str(tmp_path / "a" / "s.json")) == tmp_path / "a" / "s.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_score_refuses_a_truth_it_cannot_use(demo_upstream, tmp_path):
    """utils.score --truth: a file that is not AnnData, or AnnData without the super-pixel of each
    observation (spots.h5ad), is one line naming it (both were tracebacks)."""
    from utils.core.errors import InputError
    from utils.evaluation.score import score_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "super-res.h5ad").write_bytes((demo_upstream / "truth" / "super.h5ad").read_bytes())  # has row/col
    (tmp_path / "w.h5ad").write_bytes(b"garbage")
    for truth, fragment in [(tmp_path / "w.h5ad", "cannot be read as AnnData"),
                            (demo_upstream / "spots.h5ad", "obs 'row' is missing")]:
        with pytest.raises(InputError, match=fragment):
            score_run(run, truth)


def test_h5ad_without_x(tmp_path, raw):
    d = copy_demo(raw, tmp_path / "d")
    ids = pd.read_csv(d / "cnts.tsv", sep="\t", index_col=0).index.astype(str)
    (d / "cnts.tsv").unlink()
    anndata.AnnData(obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=["G1", "G2"])).write_h5ad(d / "cnts.h5ad")
    run_script("image_calibration.py", d, "-q")
    assert_user_error(run_script("get_HR.py", d, "--n-genes", 1), "cnts.h5ad", "no count matrix")


def test_stain_backbone_says_it_runs_on_cpu(caplog):
    from utils.histology.encoders import build_encoder
    with caplog.at_level(logging.WARNING, logger="trihrge"):
        enc = build_encoder("stain", device="cuda")
    assert enc.device == "cpu" and "runs on the CPU" in caplog.text


def test_unknown_gene_names_suggest_the_likely_one():
    """--plot-genes, --gene-list and --gene-set name the gene a typo or another case most likely meant."""
    from utils.core.raw_io import unknown_names
    known = ["ERBB2", "HK_01", "MUCL1", "Actb"]
    assert unknown_names(["hk_01", "ERB2", "ZZZ9", "ACTB"], known) == "hk_01 (HK_01?), ERB2 (ERBB2?), ZZZ9, ..."
    assert unknown_names(["ACTB"], known) == "ACTB (Actb?)"


@pytest.mark.parametrize("argv, fragment", [
    (["-m", "utils.protocols", "make", "coarsen", "SRC", "--directory", ""], "argument --directory: '': an empty path"),
    (["-m", "utils.score", "RUN", "--truth", ""], "argument --truth: '': an empty path"),
    (["-m", "utils.cohort", "SRC", "--summary", "out/"], "out/: names a folder; give a file name"),
    ([str(Path(__file__).resolve().parents[1] / "HISTEX.py"), "--directory", " "],
     "argument --directory/-d: ' ': an empty path"),
    (["-m", "utils.score", "x" * 300], "longer than the file system allows")])
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(tmp_path, argv, fragment):
    """Path('') is '.': `protocols make ... --directory ''` wrote a protocol folder into the current one.
    A name longer than NAME_MAX was an OSError traceback wherever it was first used."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert_user_error(r, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_name_with_a_newline_is_still_one_error_line(tmp_path):
    """The message names DIR; a newline in its name split the `error:` line in two (row 200)."""
    d = tmp_path / "two\nlines"
    d.mkdir()
    r = run_script("image_calibration.py", d)
    line = assert_user_error(r, "two\\nlines/he-raw.jpg", "not found")
    assert [l for l in r.stderr.splitlines() if l.strip()] == [line]


def test_histex_locks_an_out_folder_outside_dir(demo_upstream, tmp_path):
    """Two HISTEX.py runs on two DIRs with one --out wrote into the same run folder at once (one
    loaded the other's trained states); that folder is now locked too, and one made only for the
    lock is removed again when the run fails."""
    from utils.core.stage import DirectoryLock
    d = copy_demo(demo_upstream, tmp_path / "d")
    out = tmp_path / "shared" / "run"
    out.mkdir(parents=True)
    lock = DirectoryLock(out, "HISTEX.py").acquire()
    try:
        assert_user_error(run_script("HISTEX.py", d, *FAST, "--out", out), "in use by HISTEX.py")
    finally:
        lock.release()
    r = run_script("HISTEX.py", d, *FAST, "--model", "interp", "--out", d)   # DIR itself: one lock, not two
    assert r.returncode == 0 and (d / "super-res.h5ad").is_file(), r.stderr[-2000:]
    (d / "features" / "micro.npy").unlink()     # fails after the lock is taken
    fresh = tmp_path / "fresh" / "run"
    assert_user_error(run_script("HISTEX.py", d, *FAST, "--out", fresh), "micro.npy")
    assert not (tmp_path / "fresh").exists()


def test_a_spot_of_millions_of_counts_gives_finite_maps(demo_upstream, tmp_path):
    """The stack's scratch map was float16 (largest value 65504): one gene at 1e7 counts in one spot
    left NaN in super-res.h5ad, with exit 0."""
    d = copy_demo(demo_upstream, tmp_path / "d")
    counts = pd.read_csv(d / "cnts.tsv", sep="\t", dtype={0: str})
    counts.iloc[0, 1] = 10_000_000
    counts.to_csv(d / "cnts.tsv", sep="\t", index=False)
    assert run_script("get_HR.py", d, "-q").returncode == 0
    r = run_script("HISTEX.py", d, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    X = np.asarray(anndata.read_h5ad(d / "results" / "trihrge" / "super-res.h5ad").X)
    assert np.isfinite(X).all() and X.max() > 65504 / 4


def test_a_rerun_removes_the_outputs_it_does_not_make(demo_upstream, tmp_path):
    """genes-accuracy.tsv of a cross-fitted run stayed (and filled the report) after a rerun without
    cross-fitting; loss.png of a trained run stayed after an interp run into the same --out."""
    d = copy_demo(demo_upstream, tmp_path / "d")
    run = d / "results" / "trihrge"
    assert run_script("HISTEX.py", d, *FAST).returncode == 0
    assert (run / "genes-accuracy.tsv").is_file() and (run / "loss.png").is_file()
    r = run_script("HISTEX.py", d, *FAST[:2], "--n-states", "1", "--threads", "1", "--fusion", "none", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (run / "genes-accuracy.tsv").exists() and "cross-validated" not in (run / "report.html").read_text()
    r = run_script("HISTEX.py", d, "--model", "interp", "--out", run, "-q")
    assert r.returncode == 0 and not (run / "loss.png").exists()
