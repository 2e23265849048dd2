"""super-res.h5ad and spots-pred.h5ad in scanpy's Visium layout: obsm/uns 'spatial', plotted by scanpy
and squidpy with no extra arguments."""
import anndata
import matplotlib
import numpy as np
import pytest
from analysis_fixtures import interp_run  # noqa: F401  (fixture)

from utils.core import layout as L
from utils.scverse.keys import Key
from utils.scverse.spatial import HIRES_MAX_PX, LOWRES_MAX_PX, library_of

matplotlib.use("Agg")


@pytest.fixture(scope="module", params=[L.SUPER_RES, L.SPOTS_PRED])
def output(request, interp_run):  # noqa: F811
    d, run_dir = interp_run
    return d, anndata.read_h5ad(run_dir / request.param)


def test_spatial_layout(output):
    d, ad = output
    calib = L.load_calibration(d)
    xy = ad.obsm[Key.SPATIAL]
    x, y = ("x", "y") if "row" in ad.obs else ("x_raw", "y_raw")
    np.testing.assert_allclose(xy, ad.obs[[x, y]].to_numpy())       # he-raw pixels, as obs
    lib = library_of(ad)
    assert lib == d.name
    sp = ad.uns[Key.SPATIAL][lib]
    hires, lowres = sp[Key.IMAGES][Key.HIRES], sp[Key.IMAGES][Key.LOWRES]
    assert hires.dtype == np.uint8 and hires.shape[2] == 3 and max(hires.shape[:2]) <= HIRES_MAX_PX
    assert max(lowres.shape[:2]) <= LOWRES_MAX_PX
    f = sp[Key.SCALEFACTORS]
    H, W = calib["raw_shape"][:2]
    for img, s in ((hires, f[Key.HIRES_SCALEF]), (lowres, f[Key.LOWRES_SCALEF])):
        # the image covers the raw image at its scale factor (whole-factor block means drop < 1 block)
        assert abs(img.shape[1] - W * s) <= 1 / (s / calib["scale"]) + 1 and abs(img.shape[0] - H * s) <= 1 / (
            s / calib["scale"]) + 1
        # every observation falls on the image
        assert (xy * s < np.array([img.shape[1], img.shape[0]]) + 1).all()
    expect = 8 / calib["raw_pixel_size_um"] if "row" in ad.obs else 2 * calib["radius_raw_px"]
    assert f[Key.SPOT_DIAMETER] == pytest.approx(expect)
    # the hires image is the H&E: tissue super-pixels are darker than the white background
    if "row" in ad.obs:
        s = f[Key.HIRES_SCALEF]
        ij = np.minimum((xy * s).astype(int), [hires.shape[1] - 1, hires.shape[0] - 1])
        assert hires[ij[:, 1], ij[:, 0]].mean() < hires.mean(axis=2).max() - 10


def test_scanpy_and_squidpy_plot_with_no_extra_arguments(output):
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq
    _, ad = output
    gene = ad.var_names[0]
    sc.pl.spatial(ad, color=gene, show=False)
    ax = plt.gcf().axes[0]
    assert ax.images, "scanpy drew no H&E"
    plt.close("all")
    sq.pl.spatial_scatter(ad, color=gene)
    assert plt.gcf().axes[0].images, "squidpy drew no H&E"
    plt.close("all")


@pytest.mark.parametrize("k", [1, 2, 7, 23])
def test_block_mean_is_the_rounded_mean_of_each_block(k):
    """The integer block sums give the rounded float mean of every whole k x k block."""
    from utils.scverse.spatial import _block_mean
    img = np.random.default_rng(k).integers(0, 256, (5 * k + 3, 4 * k + 1, 3), dtype=np.uint8)
    r, c = img.shape[0] // k, img.shape[1] // k
    want = np.rint(img[:r * k, :c * k].astype(np.float64).reshape(r, k, c, k, 3).mean(axis=(1, 3)))
    np.testing.assert_array_equal(_block_mean(img, k), want.astype(np.uint8))


@pytest.mark.parametrize("n", [0, 5, 4096, 10001])
def test_streamed_x_is_plain_or_hdf5s_own_shuffle_and_gzip(tmp_path, n):
    """super-res.h5ad's X, compressed by our threads and written as raw chunks, reads back exactly
    (anndata, h5py) as a dataset with HDF5's shuffle + gzip filters, for any thread count."""
    import h5py
    import pandas as pd

    from utils.superres.outputs import write_h5ad_streamed
    X = (np.random.default_rng(n).random((n, 7)) * [1, 10, 100, 0, 1e-3, 5, 2]).astype(np.float32)
    obs, var = pd.DataFrame(index=[f"{i}_0" for i in range(n)]), pd.DataFrame(index=[f"g{i}" for i in range(7)])
    files = []
    for threads in (1, 3):
        files.append(tmp_path / f"x{threads}.h5ad")
        write_h5ad_streamed(files[-1], obs, var, X, chunk_rows=4096, threads=threads, compress=True)
        np.testing.assert_array_equal(anndata.read_h5ad(files[-1]).X, X)
    with h5py.File(files[0]) as a, h5py.File(files[1]) as b:
        assert a["X"].compression == "gzip" and a["X"].shuffle == bool(n)
        assert n == 0 or a["X"].id.read_direct_chunk((0, 0)) == b["X"].id.read_direct_chunk((0, 0))
    plain = tmp_path / "plain.h5ad"       # uncompressed, as anndata writes X
    write_h5ad_streamed(plain, obs, var, X, chunk_rows=4096)
    np.testing.assert_array_equal(anndata.read_h5ad(plain).X, X)
    with h5py.File(plain) as f:
        assert f["X"].compression is None


@pytest.mark.parametrize("n", [0, 5, 10001])
def test_x_computed_in_place_is_the_h5ad_anndata_writes(tmp_path, n):
    """The default run computes its map inside super-res.h5ad's X (h5ad_x_memmap), then adds the
    rest (complete_h5ad): anndata reads the same AnnData as from its own write, backed mode included,
    and no temporary is left."""
    import pandas as pd

    from utils.superres.outputs import complete_h5ad, h5ad_x_memmap
    X = np.random.default_rng(n).random((n, 7)).astype(np.float32)
    obs = pd.DataFrame({"row": np.arange(n, dtype=np.int32)}, index=[f"{i}_0" for i in range(n)])
    var = pd.DataFrame({"scale_max": np.arange(7.0)}, index=[f"g{i}" for i in range(7)])
    uns, obsm = {"model": "trihrge", "spatial": {"s": {"scalefactors": {"x": 1.0}}}}, {"spatial": np.ones((n, 2))}
    path = tmp_path / "in-place.h5ad"
    mm = h5ad_x_memmap(path, X.shape)
    mm[:] = X
    complete_h5ad(path, obs, var, uns, obsm=obsm)
    del mm
    want = tmp_path / "anndata.h5ad"
    anndata.AnnData(X=X, obs=obs, var=var, uns=uns, obsm=obsm).write_h5ad(want)
    got, ref = anndata.read_h5ad(path), anndata.read_h5ad(want)
    np.testing.assert_array_equal(got.X, X)
    assert got.obs.equals(ref.obs) and got.var.equals(ref.var) and got.uns == ref.uns
    np.testing.assert_array_equal(got.obsm["spatial"], ref.obsm["spatial"])
    if n:
        np.testing.assert_array_equal(anndata.read_h5ad(path, backed="r").X[3], X[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anndata.h5ad", "in-place.h5ad"]
