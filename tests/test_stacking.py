"""--fusion stack (utils/superres/stacking.py): per-gene stacking weights fitted on out-of-fold spots,
the between-spot map, and its mix with the blend by proximity to the spots."""
import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import copy_demo, hex_lattice, run_script

from utils.superres.stacking import between_maps, mix_by_proximity, proximity, stack_weights, stacked_oof


def test_stack_weights_find_the_informative_predictor_per_gene():
    rng = np.random.default_rng(0)
    n = 400
    truth = rng.gamma(2.0, 5.0, (n, 2))
    good = truth + rng.normal(0, 0.3, (n, 2))            # predictor 0 carries gene 0, predictor 1 gene 1
    bad = truth.mean(0) + rng.normal(0, 3.0, (n, 2))
    image = np.stack([good[:, 0], bad[:, 1]], 1)
    consistent = np.stack([bad[:, 0], good[:, 1]], 1)
    reference = truth.mean(0) + rng.normal(0, 3.0, (n, 2))
    c, record = stack_weights(truth, [image, consistent], reference, ridge=0.01)
    assert c.shape == (2, 3) and np.allclose(c.sum(1), 1.0) and (c >= 0).all()
    assert c[0, 0] > 0.9 and c[1, 1] > 0.9                # each gene follows its informative predictor
    shrunk, _ = stack_weights(truth, [image, consistent], reference, ridge=100.0)
    assert abs(shrunk[0, 0] - shrunk[1, 0]) < abs(c[0, 0] - c[1, 0])   # the ridge pulls genes together
    np.testing.assert_allclose(stacked_oof(c, [image, consistent], reference),
                               c[:, 0] * image + c[:, 1] * consistent + c[:, 2] * reference, rtol=1e-6)
    assert record["n_spots"] == n and set(record["median_weights"]) == {"image", "consistent", "interpolation"}
    assert set(record["pooled_weights"]) == set(record["median_weights"])   # all three parts, summing to 1
    assert sum(record["pooled_weights"].values()) == pytest.approx(1.0)


def test_between_map_and_proximity_mix():
    xy = hex_lattice(4, 4, 100.0)
    rows, cols = np.divmod(np.arange(400), 20)
    w = proximity(rows, cols, xy, radius_px=27.5)
    assert w.shape == (400,) and (w > 0).all() and (w <= 1).all()
    # a super-pixel on a spot centre is near 1; one far from every spot near 0
    centre = np.argmin(np.hypot((cols + 0.5) * 16 - xy[0, 0], (rows + 0.5) * 16 - xy[0, 1]))
    assert w[centre] > 0.95
    far = proximity(np.array([500]), np.array([500]), xy, radius_px=27.5)
    assert far[0] < 1e-6
    rng = np.random.default_rng(1)
    image = rng.random((400, 3)).astype(np.float32)
    consistent = rng.random((400, 3)).astype(np.float32)
    kernel = sp.random(400, len(xy), density=0.2, random_state=2, format="csr")
    per_sp = rng.random((len(xy), 3)).astype(np.float32)
    c = np.array([[0.5, 0.2, 0.3], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    expected = c[:, 0] * image + c[:, 1] * consistent + c[:, 2] * (kernel @ per_sp)
    out = between_maps(image.copy(), c, consistent, kernel, per_sp, chunk=64)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    sr = consistent.copy()
    mix_by_proximity(sr, out, w, chunk=50)
    np.testing.assert_allclose(sr, w[:, None] * consistent + (1 - w[:, None]) * out, rtol=1e-5)


def test_row_chunks_cover_the_rows_in_chunks_of_bounded_bytes():
    from utils.core.chunks import CHUNK_BYTES, row_chunks
    for n, g in [(0, 5), (1, 1000), (10_000, 1000), (117_000, 1000), (5, 10**9)]:
        chunks = row_chunks(n, g)
        assert np.array_equal(np.concatenate([np.arange(n)[s] for s in chunks] or [np.zeros(0, int)]), np.arange(n))
        assert all(s.stop - s.start == 1 or (s.stop - s.start) * g * 4 <= CHUNK_BYTES for s in chunks)
    assert [(s.start, s.stop) for s in row_chunks(5, 3, rows=2)] == [(0, 2), (2, 4), (4, 5)]


@pytest.fixture
def demo(demo_upstream, tmp_path):
    return copy_demo(demo_upstream, tmp_path / "small")


def test_histex_fusion_stack_end_to_end(demo, tmp_path):
    r = run_script("HISTEX.py", demo, "--epochs", "4", "--n-states", "2", "--threads", "1", "-q",
                   "--fusion", "stack", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    stack = run["fusion"]["stack"]
    assert abs(sum(stack["median_weights"].values()) - 1) < 0.5 and 0 <= run["fusion"]["blend"]["pooled_weight"] <= 1
    table = pd.read_csv(tmp_path / "s" / "genes-accuracy.tsv", sep="\t")
    weights = table[["stack_image", "stack_consistent", "stack_interpolation"]]
    assert np.allclose(weights.sum(1), 1.0, atol=1e-3) and (weights >= 0).all().all()
    sr = anndata.read_h5ad(tmp_path / "s" / "super-res.h5ad")
    assert np.isfinite(sr.X).all() and (sr.X >= 0).all()
    assert not list((tmp_path / "s").rglob("image-map.npy"))   # the scratch map is not left behind
