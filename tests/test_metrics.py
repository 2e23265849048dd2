"""The scores against a truth (utils.evaluation.metrics): SSIM equals scikit-image's."""
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from utils.evaluation.metrics import ssim


@pytest.mark.parametrize("shape", [(7, 7), (40, 23), (64, 90)])
def test_ssim_equals_scikit_images_structural_similarity(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.random(shape)
    b = np.clip(a + rng.normal(0, 0.3, shape), 0, 1)
    a[: shape[0] // 3] = 0  # outside the tissue: zeros, as score_maps fills them
    for x, y in ((a, b), (a, a), (a, np.zeros(shape)), (np.zeros(shape), np.zeros(shape))):
        assert ssim(x, y) == pytest.approx(structural_similarity(x, y, data_range=1.0), abs=1e-12)


def test_ssim_refuses_a_map_smaller_than_its_window():
    with pytest.raises(ValueError, match="smaller than the 7 x 7 SSIM window"):
        ssim(np.zeros((6, 30)), np.zeros((6, 30)))


def test_the_prediction_on_the_truth_is_gathered_by_column_chunks_and_scored_on_any_thread_count(monkeypatch):
    """align_to_truth's OnTruth equals the direct gather (missing super-pixels 0, the truth's gene
    order); score_maps gives the same per-gene values on 1 and 3 threads."""
    import anndata
    import pandas as pd

    from utils.evaluation.metrics import align_to_truth, score_maps
    rng = np.random.default_rng(5)
    rr, cc = np.meshgrid(np.arange(30), np.arange(25), indexing="ij")
    t_rows, t_cols = rr.ravel(), cc.ravel()
    keep = rng.random(len(t_rows)) < 0.8                       # the prediction lacks a fifth
    order = rng.permutation(int(keep.sum()))
    p_rows, p_cols = t_rows[keep][order], t_cols[keep][order]
    X = rng.random((len(p_rows), 6)).astype(np.float32)
    truth = anndata.AnnData(X=rng.random((len(t_rows), 4)).astype(np.float32),
                            obs=pd.DataFrame({"row": t_rows, "col": t_cols}, index=[str(i) for i in range(len(t_rows))]),
                            var=pd.DataFrame(index=["g5", "g1", "gx", "g2"]))
    P, T, rows, cols, genes, cover = align_to_truth(p_rows, p_cols, X, [f"g{i}" for i in range(6)], truth)
    want = np.zeros((len(t_rows), 3), np.float32)
    at = {(r, c): i for i, (r, c) in enumerate(zip(p_rows, p_cols))}
    for j, (r, c) in enumerate(zip(t_rows, t_cols)):
        if (r, c) in at:
            want[j] = X[at[r, c], [5, 1, 2]]
    assert genes == ["g5", "g1", "g2"] and cover == pytest.approx(keep.mean())
    np.testing.assert_array_equal(np.asarray(P), want)
    np.testing.assert_array_equal(P[:, 1:3], want[:, 1:3])
    monkeypatch.setattr("utils.core.chunks.CHUNK_BYTES", 8 * len(t_rows))   # one gene per chunk
    one, three = (score_maps(P, T, rows, cols, genes, threads=n) for n in (1, 3))
    assert one["per_gene"] == three["per_gene"] and len(one["per_gene"]["ssim"]) == 3
    # a sparse truth (the demo's) is read by column chunks: the same values and scores
    import scipy.sparse as sp
    truth.X = sp.csr_matrix(np.where(truth.X > 0.5, truth.X, 0))
    P, T, *_ = align_to_truth(p_rows, p_cols, X, [f"g{i}" for i in range(6)], truth)
    dense = truth.X.toarray()[:, [0, 1, 3]]
    np.testing.assert_array_equal(np.asarray(T), dense)
    assert score_maps(P, T, rows, cols, genes, threads=1) == score_maps(P, dense, rows, cols, genes, threads=1)
