"""Bad and unusual input to `utils.protocols make|score`, `utils.simulate` and `utils.demo`: one error
line and nothing changed, or the unusual case handled (docs/ROBUSTNESS.md, "Bad inputs")."""
import json
import logging
import os
import subprocess

import anndata
import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error, snapshot, square_lattice, write_raw_dir

from utils import demo
from utils.core import manifest as mf
from utils.core.cli import run
from utils.core.stage import DirectoryLock
from utils.evaluation import heldout, protocols
from utils.scverse.keys import Key
from utils.simulate import cli as simulate_cli
from utils.simulate import simulation
from utils.simulate.simulation import simulate


def _in_process(main, argv, capsys):
    """main(argv) as its command runs it (utils.core.cli.run), in this process; a CompletedProcess."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            run(main, [str(a) for a in argv])
    finally:  # the command points logging at the captured stderr; give it back
        root.handlers[:] = handlers
        root.setLevel(level)
    io = capsys.readouterr()
    return subprocess.CompletedProcess(argv, e.value.code, io.out, io.err)


def _source(d, nx=6, ny=6, seed=0, image_name="he-raw.png", array=None):
    """A raw-layout folder of an nx x ny square lattice with its array coordinates in section.json."""
    src = write_raw_dir(d, square_lattice(nx, ny, 250.0, origin=(300, 300)), pixel_size=0.5, n_genes=8, seed=seed,
                        image_name=image_name)
    ax, ay = array if array is not None else (np.tile(np.arange(nx), ny), np.repeat(np.arange(ny), nx))
    (src / "section.json").write_text(json.dumps({"array_x": list(map(int, ax)), "array_y": list(map(int, ay))}))
    return src


def _make(kind, src, dst, capsys):
    return _in_process(protocols.main, ["make", kind, src, "--directory", dst], capsys)


def _perfect_run(folder, name="interp", spots_pred=True):
    """A run in folder/results/<name> that predicts every held-out spot's counts exactly (on the super-pixel
    under its centre), with the spots-pred.h5ad of the folder's training spots that HISTEX writes."""
    (folder / "calibration.json").write_text(json.dumps({"scale": 1.0, "superpixel_grid": [120, 120], "superpixel_px": 16}))
    h = pd.read_csv(folder / "heldout" / "cnts.tsv.gz", sep="\t", index_col=0)
    hl = pd.read_csv(folder / "heldout" / "locs-raw.tsv", sep="\t", index_col=0)
    run_dir = folder / "results" / name
    run_dir.mkdir(parents=True)
    obs = pd.DataFrame({"row": (hl["y"] // 16).astype(int).to_numpy(), "col": (hl["x"] // 16).astype(int).to_numpy()},
                       index=[str(i) for i in range(len(h))])
    anndata.AnnData(X=h.to_numpy(np.float32), obs=obs, var=pd.DataFrame(index=h.columns)).write_h5ad(
        run_dir / "super-res.h5ad")
    if spots_pred:
        t = pd.read_csv(folder / "cnts.tsv.gz", sep="\t", index_col=0, dtype={0: str})
        anndata.AnnData(X=t.to_numpy(np.float32), obs=pd.DataFrame(index=t.index), var=pd.DataFrame(index=t.columns),
                        layers={Key.MEASURED: t.to_numpy(np.float32)}).write_h5ad(run_dir / "spots-pred.h5ad")
    return run_dir


# --- 1, 10, 12: the simulator ------------------------------------------------------------------------------

def test_simulate_refuses_a_real_data_set_and_replaces_only_a_simulation(tmp_path):
    from utils.core.errors import InputError
    real = write_raw_dir(tmp_path / "real", square_lattice(3, 3, 250.0, origin=(300, 300)), image_name="he-raw.tif")
    (real / "notes.txt").write_text("mine")
    before = snapshot(real)
    with pytest.raises(InputError, match="no earlier simulation"):
        simulate(real, size="small", extent_mm=0.4, n_genes=20, progress=False)
    assert snapshot(real) == before
    # a killed first simulation left its lock and a temporary: the folder is still ours to fill
    new = tmp_path / "new"
    new.mkdir()
    (new / ".trihrge.lock").write_text(json.dumps({"stage": "simulate", "pid": 999999999}))
    (new / ".trihrge-tmp-999999999-he-raw.tif").write_bytes(b"half")
    simulate(new, size="small", extent_mm=0.4, n_genes=20, progress=False)
    assert not [p for p in new.iterdir() if p.name.startswith(".trihrge")]
    meta = json.loads((new / "truth" / "simulation.json").read_text())
    assert meta["size"] == "custom" and meta["extent_mm"] == pytest.approx(0.4, abs=1e-3)   # not "small"
    simulate(new, size="small", seed=1, extent_mm=0.4, n_genes=20, progress=False)         # a simulation is replaced
    assert json.loads((new / "truth" / "simulation.json").read_text())["seed"] == 1


def test_simulate_refuses_what_would_not_fit_in_memory(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(simulation, "available_memory", lambda: 2 * 2 ** 30)
    p = _in_process(simulate_cli.main, ["--directory", tmp_path / "d", "--size", "medium", "--n-genes", 20000], capsys)
    line = assert_user_error(p, "--n-genes 20000", "GiB of memory", "or fewer")
    fit = int(line.split("pass --n-genes ")[1].split()[0])
    assert simulation.MIN_GENES <= fit < 20000
    assert simulation.memory_needed(3.0, 0.3, fit)[0] <= 2 * 2 ** 30 < simulation.memory_needed(3.0, 0.3, fit + 1)[0]
    assert not (tmp_path / "d").exists()
    helptext = simulate_cli._parser().format_help()
    assert "0.1-1.0" in helptext and "12-20000" in helptext


# --- 9, 11, 12: the demo --------------------------------------------------------------------------------

@pytest.fixture
def demo_steps(monkeypatch):
    """The demo's commands, recorded instead of run (each 'fails', so the demo stops after the first)."""
    calls = []
    monkeypatch.setattr(demo, "run_child", lambda cmd, cwd: calls.append(cmd) or 1)
    return calls


def test_demo_resolves_its_directory_and_defaults_to_demo_size(tmp_path, monkeypatch, demo_steps):
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--directory", "rel", "--size", "small"]) == 1
    assert demo_steps[-1][demo_steps[-1].index("--directory") + 1] == str(tmp_path / "rel")
    assert demo.main(["--size", "small"]) == 1
    assert demo_steps[-1][demo_steps[-1].index("--directory") + 1] == str(tmp_path / "demo" / "small")


def test_demo_checks_the_marker_table_path_first(tmp_path, capsys, demo_steps):
    (tmp_path / "d" / demo.DEMO_MARKERS).mkdir(parents=True)
    p = _in_process(demo.main, ["--directory", tmp_path / "d", "--size", "small"], capsys)
    assert_user_error(p, demo.DEMO_MARKERS, "is a directory")
    assert demo_steps == []


@pytest.mark.parametrize("record", ["{bad", "[]", "null", '{"size": "small", "seed": 0}'])
def test_demo_simulates_again_over_a_damaged_record(tmp_path, record):
    d = tmp_path / "d"
    (d / "truth").mkdir(parents=True)
    (d / "truth" / "simulation.json").write_text(record)
    assert demo._simulated_with(d, "small", 0) is False


def test_demo_reuses_only_a_complete_simulation_of_its_settings(tmp_path):
    d = tmp_path / "d"
    (d / "truth").mkdir(parents=True)
    for f in (*demo.RAW_FILES, "truth/super.h5ad"):
        (d / f).write_text("x")
    record = {"size": "small", "seed": 0, "n_genes": demo.DEFAULT_N_GENES, "raw_pixel_size_um": 0.3}
    (d / "truth" / "simulation.json").write_text(json.dumps(record))
    assert demo._simulated_with(d, "small", 0)
    assert not demo._simulated_with(d, "small", 1) and not demo._simulated_with(d, "medium", 0)
    (d / "truth" / "simulation.json").write_text(json.dumps({**record, "size": "custom"}))   # --extent-mm
    assert not demo._simulated_with(d, "small", 0)
    (d / "truth" / "simulation.json").write_text(json.dumps(record))
    (d / "he-raw.tif").unlink()
    assert not demo._simulated_with(d, "small", 0)


# --- 4, 5, 6, 7, 8: protocols make -----------------------------------------------------------------------

def _damage(src, name, text):
    (src / name).unlink() if text is None else (src / name).write_text(text)


@pytest.mark.parametrize("name,text,fragments", [
    ("section.json", "{bad", ["section.json", "not valid JSON"]),
    ("section.json", "[1, 2]", ["section.json", "JSON list"]),
    ("section.json", '{"array_x": "abc", "array_y": []}', ["array_x", "str"]),
    ("section.json", json.dumps({"array_x": [None] * 36, "array_y": list(range(36))}), ["array_x", "whole numbers"]),
    ("section.json", json.dumps({"array_x": ["a"] * 36, "array_y": list(range(36))}), ["array_x", "whole numbers"]),
    ("section.json", json.dumps({"array_x": [0.5] * 36, "array_y": list(range(36))}), ["array_x", "0.5"]),
    ("radius-raw.txt", None, ["radius-raw.txt", "not found"]),
    ("radius-raw.txt", "big", ["radius-raw.txt", "expected one number"]),
    ("radius-raw.txt", "", ["radius-raw.txt", "expected one number"]),
    ("radius-raw.txt", "-5", ["radius-raw.txt", "must be positive"]),
    ("radius-raw.txt", "nan", ["radius-raw.txt", "expected one number"]),
    ("pixel-size-raw.txt", None, ["pixel-size-raw.txt", "not found"]),
], ids=["json-bad", "json-list", "array-text", "array-null", "array-strings", "array-half", "radius-missing",
        "radius-text", "radius-empty", "radius-negative", "radius-nan", "pixel-size-missing"])
def test_make_from_a_damaged_source_is_one_line(tmp_path, capsys, name, text, fragments):
    src = _source(tmp_path / "src")
    _damage(src, name, text)
    assert_user_error(_make("leave-out", src, tmp_path / "p", capsys), *fragments)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("kind,nx,ny,array,fragment", [
    ("leave-out", 2, 2, None, "2 held-out"),
    ("sparse-leave-out", 2, 2, None, "1 held-out"),
    ("leave-out", 3, 3, ([0] * 9, [0] * 9), "share array coordinates"),
    ("coarsen", 2, 2, None, "1 training"),
], ids=["leave-out-4", "sparse-4", "all-zero", "coarsen-4"])
def test_make_refuses_splits_that_cannot_be_scored(tmp_path, capsys, kind, nx, ny, array, fragment):
    src = _source(tmp_path / "src", nx, ny, array=array)
    assert_user_error(_make(kind, src, tmp_path / "p", capsys), fragment)
    assert not (tmp_path / "p").exists()


def test_make_again_replaces_the_image_and_is_byte_identical(tmp_path):
    a = _source(tmp_path / "a")
    b = _source(tmp_path / "b", seed=1, image_name="he-raw.jpg")
    p = tmp_path / "p"
    protocols.make("leave-out", a, p)
    first = {f: (p / f).read_bytes() for f in snapshot(p)}
    protocols.make("leave-out", a, p)
    assert {f: (p / f).read_bytes() for f in snapshot(p)} == first       # gzip without a time stamp
    protocols.make("leave-out", b, p)
    assert sorted(x.name for x in p.glob("he-raw.*")) == ["he-raw.jpg"]
    assert (p / "he-raw.jpg").read_bytes() == (b / "he-raw.jpg").read_bytes()


def test_make_after_a_killed_make_and_beside_a_running_one(tmp_path, capsys):
    src = _source(tmp_path / "src")
    p = tmp_path / "p"
    p.mkdir()   # a make killed before its first commit: its lock and a temporary, no protocol.json
    (p / ".trihrge.lock").write_text(json.dumps({"stage": "protocols", "pid": 999999999}))
    (p / ".trihrge-tmp-999999999-cnts.tsv.gz").write_bytes(b"half")
    assert _make("leave-out", src, p, capsys).returncode == 0
    assert not [x for x in p.iterdir() if x.name.startswith(".trihrge")]
    q = tmp_path / "q"
    q.mkdir()
    lock = DirectoryLock(q, "protocols").acquire()   # another make at work on the new folder
    try:
        assert_user_error(_make("leave-out", src, q, capsys), "in use by protocols")
    finally:
        lock.release()


# --- 2, 3, 12: protocols score ---------------------------------------------------------------------------

def test_score_runs_of_two_folders_each_at_its_own_spots(tmp_path, capsys):
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    protocols.make("leave-out", _source(tmp_path / "a"), p1)
    protocols.make("leave-out", _source(tmp_path / "b", seed=1), p2)
    runs = [_perfect_run(p1), _perfect_run(p2)]
    scored = heldout.pearson_by_folder(runs, n_genes=8)
    res = {k: float(np.median(v)) for _, _, _, r in scored for k, v in r.items()}
    assert res["p1/interp"] > 0.999 and res["p2/interp"] > 0.999
    assert {"nearest spot (p1)", "nearest spot (p2)"} <= set(res)
    out = _in_process(protocols.main, ["score", *runs], capsys)
    assert out.returncode == 0 and "p1/interp" in out.stdout and "p2/interp" in out.stdout


def test_score_refuses_a_run_of_an_earlier_protocol_folder(tmp_path, capsys):
    src, p = _source(tmp_path / "src"), tmp_path / "p"
    protocols.make("leave-out", src, p)
    run_dir = _perfect_run(p)
    assert heldout.score([run_dir], n_genes=8)[1]["interp"]["median"] > 0.999
    protocols.make("sparse-leave-out", src, p)            # written again: other training spots
    assert_user_error(_in_process(protocols.main, ["score", run_dir], capsys), "stale", "rerun")
    # the stages' manifests tell it first, as HISTEX is told
    m = mf.build_manifest(p, "image_calibration", {}, [p / "locs-raw.tsv"], [])
    mf.manifest_path(p, "image_calibration").parent.mkdir()
    mf.manifest_path(p, "image_calibration").write_text(json.dumps(m))
    protocols.make("leave-out", src, p)
    assert_user_error(_in_process(protocols.main, ["score", run_dir], capsys), "locs-raw.tsv changed", "stale")


def test_score_names_a_missing_run_and_scores_other_gene_sets_on_shared_genes(tmp_path, capsys):
    p = tmp_path / "p"
    protocols.make("leave-out", _source(tmp_path / "src"), p)
    missing = p / "results" / "nope"
    assert_user_error(_in_process(protocols.main, ["score", missing], capsys), str(missing), "not found")
    full = _perfect_run(p, "full", spots_pred=False)
    part = _perfect_run(p, "part", spots_pred=False)
    ad = anndata.read_h5ad(part / "super-res.h5ad")
    ad[:, ad.var_names[:5]].copy().write_h5ad(part / "super-res.h5ad")   # a run of fewer genes
    _, genes, res = heldout.heldout_pearson([full, part])
    assert len(genes) == 5 and set(res) == {"full", "part", "nearest spot"}
    os.remove(part / "super-res.h5ad")
    assert_user_error(_in_process(protocols.main, ["score", full, part], capsys), "super-res.h5ad", "not found")
