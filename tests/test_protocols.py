"""The real-data protocols: checkerboard leave-out and 2 x 2 coarsening, and their scoring."""
import json

import anndata
import numpy as np
import pandas as pd
from conftest import square_lattice, write_raw_dir

from utils.evaluation.heldout import score
from utils.evaluation.protocols import make, split


def test_split_square_and_hex():
    ax, ay = np.meshgrid(np.arange(6), np.arange(4))
    train, _ = split(ax.ravel(), ay.ravel(), "leave-out")
    assert train.sum() == 12 and not (train.reshape(4, 6)[:, :-1] == train.reshape(4, 6)[:, 1:]).any()
    _, block = split(ax.ravel(), ay.ravel(), "coarsen")
    assert len(np.unique(block)) == 6 and np.all(np.bincount(np.unique(block, return_inverse=True)[1]) == 4)
    # Visium: array_x steps by 2, odd rows shifted by one
    hx = np.array([0, 2, 4, 6, 1, 3, 5, 7])
    hy = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    train, _ = split(hx, hy, "leave-out")
    assert train.tolist() == [True, False, True, False, False, True, False, True]


def test_make_and_score(tmp_path):
    xy = square_lattice(6, 6, 250.0, origin=(300, 300))
    src = write_raw_dir(tmp_path / "src", xy, pixel_size=0.5, n_genes=8)
    ax = np.tile(np.arange(6), 6)
    ay = np.repeat(np.arange(6), 6)
    (src / "section.json").write_text(json.dumps({"array_x": ax.tolist(), "array_y": ay.tolist()}))
    n_t, n_h = make("leave-out", src, tmp_path / "lo")
    assert (n_t, n_h) == (18, 18)
    n_t, n_h = make("coarsen", src, tmp_path / "co")
    assert (n_t, n_h) == (9, 36)
    co = pd.read_csv(tmp_path / "co" / "cnts.tsv.gz", sep="\t", index_col=0)
    assert co.to_numpy().sum() == pd.read_csv(src / "cnts.tsv", sep="\t", index_col=0).to_numpy().sum()
    # a run that predicts each held-out spot's counts exactly (all on the centre super-pixel) scores r = 1
    d = tmp_path / "lo"
    (d / "calibration.json").write_text(json.dumps({"scale": 1.0, "superpixel_grid": [120, 120], "superpixel_px": 16}))
    h = pd.read_csv(d / "heldout" / "cnts.tsv.gz", sep="\t", index_col=0)
    hl = pd.read_csv(d / "heldout" / "locs-raw.tsv", sep="\t", index_col=0)
    rows = (hl["y"].to_numpy() // 16).astype(int)
    cols = (hl["x"].to_numpy() // 16).astype(int)
    run = d / "results" / "perfect"
    run.mkdir(parents=True)
    anndata.AnnData(X=h.to_numpy(np.float32), obs=pd.DataFrame({"row": rows, "col": cols}, index=[str(i) for i in range(len(h))]),
                    var=pd.DataFrame(index=h.columns)).write_h5ad(run / "super-res.h5ad")
    proto, res = score([run], n_genes=8)
    assert res["perfect"]["median"] > 0.999
    assert "nearest spot" in res and res["nearest spot"]["median"] < 0.999


def test_sparse_leave_out_hides_one_in_five_seeded(tmp_path):
    ax, ay = np.meshgrid(np.arange(10), np.arange(10))
    train, _ = split(ax.ravel(), ay.ravel(), "sparse-leave-out")
    assert (~train).sum() == 20
    assert np.array_equal(train, split(ax.ravel(), ay.ravel(), "sparse-leave-out")[0])
    xy = square_lattice(6, 6, 250.0, origin=(300, 300))
    src = write_raw_dir(tmp_path / "src", xy, pixel_size=0.5, n_genes=8)
    (src / "section.json").write_text(json.dumps({"array_x": np.tile(np.arange(6), 6).tolist(),
                                                  "array_y": np.repeat(np.arange(6), 6).tolist()}))
    assert make("sparse-leave-out", src, tmp_path / "sp") == (28, 8)
    assert json.loads((tmp_path / "sp" / "protocol.json").read_text())["protocol"] == "sparse-leave-out"


def test_bad_folders_and_options_are_one_line(tmp_path):
    """score on a run outside a protocol folder, on a run without super-res.h5ad, and make into a place
    where nothing can be written: one error line each (they were tracebacks)."""
    import pytest

    from utils.core.errors import InputError
    from utils.evaluation.protocols import main
    run = tmp_path / "plain" / "results" / "trihrge"
    run.mkdir(parents=True)
    with pytest.raises(InputError, match="not a protocol folder"):
        main(["score", str(run)])
    (tmp_path / "plain" / "protocol.json").write_text("{}")
    with pytest.raises(InputError, match="damaged protocol folder"):
        main(["score", str(run)])
    with pytest.raises(InputError, match="must be a whole number at least 1"):
        main(["score", str(run), "--n-genes", "0"])
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a directory"):
        main(["make", "leave-out", str(tmp_path), "--directory", str(tmp_path / "f" / "p")])


def test_make_into_another_data_folder_is_refused_and_a_killed_make_is_swept(tmp_path):
    """make into a pipeline DIR replaced its raw inputs and added a second count file; temporaries of
    a killed make stayed for good (it did not run in the stage runner)."""
    import pytest

    from utils.core.errors import InputError
    xy = square_lattice(4, 4, 250.0, origin=(300, 300))
    src = write_raw_dir(tmp_path / "src", xy, pixel_size=0.5, n_genes=8)
    (src / "section.json").write_text(json.dumps({"array_x": np.tile(np.arange(4), 4).tolist(),
                                                  "array_y": np.repeat(np.arange(4), 4).tolist()}))
    other = write_raw_dir(tmp_path / "other", xy, pixel_size=0.5, n_genes=8)
    before = sorted(p.name for p in other.iterdir())
    with pytest.raises(InputError, match="is not a protocol folder"):
        make("leave-out", src, other)
    assert sorted(p.name for p in other.iterdir()) == before
    d = tmp_path / "lo"
    make("leave-out", src, d)
    stale = d / ".trihrge-tmp-999999999-cnts.tsv.gz"     # a dead process's temporary
    stale.write_text("half")
    make("coarsen", src, d)                                # an earlier protocol folder may be rewritten
    assert not stale.exists() and json.loads((d / "protocol.json").read_text())["protocol"] == "coarsen"
