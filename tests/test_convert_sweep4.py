"""The converters' fourth bad-input sweep: damaged 10x matrices, one-column features.tsv, bad obs
columns of an .h5ad, byte-order marks, reconverting into the same folder, a partial Visium HD bin
folder, in_tissue as text, collinear Xenium keypoints, --library-id, a boundary file of another run,
--raster-um's bound, empty gene names, and the pixel-size range message."""
import json
import shutil

import anndata
import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import assert_user_error
from scipy import sparse
from test_convert import convert, convert_cli, read_counts, visium_hd_outs, visium_outs, write_10x_h5, xenium_folder

from utils.convert import h5ad as h5ad_convert
from utils.convert import xenium as xenium_convert
from utils.convert.cli import build_parser
from utils.convert.he_image import check_pixel_size
from utils.convert.tenx_matrix import read_10x_h5, read_10x_mtx
from utils.core.errors import InputError

BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def visium_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("visium4")
    outs, image, t = visium_outs(root, "csv")
    return outs, image, t


def small_h5(path):
    """A 4 barcodes x 3 genes 10x .h5 (CSC by barcode: 4 columns, indptr of 5)."""
    X = np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0], [0, 5, 6]])
    write_10x_h5(path, [f"B{i}" for i in range(4)], ["G0", "G1", "G2"], ["Gene Expression"] * 3, X)
    return path


def rewrite(path, key, value):
    with h5py.File(path, "r+") as f:
        del f[key]
        f[key] = value


# ----------------------------------------------------------------------------------------------------
# 1, 2, 12: 10x matrices


@pytest.mark.parametrize("damage", ["data-short", "shape-1", "index-out-of-range", "indptr-decreasing"])
def test_damaged_10x_h5_is_one_line(tmp_path, damage):
    """Each was a traceback (scipy's ValueError) or silently wrong counts."""
    p = small_h5(tmp_path / "m.h5")
    with h5py.File(p) as f:
        data, indices, indptr = f["matrix/data"][:], f["matrix/indices"][:], f["matrix/indptr"][:]
    if damage == "data-short":
        rewrite(p, "matrix/data", data[:-2])
        rewrite(p, "matrix/indices", indices[:-2])
    elif damage == "shape-1":
        rewrite(p, "matrix/shape", np.array([3], np.int32))
    elif damage == "index-out-of-range":
        indices[1] = 7
        rewrite(p, "matrix/indices", indices)
    else:
        indptr[1], indptr[2] = indptr[2], indptr[1]
        rewrite(p, "matrix/indptr", indptr)
    with pytest.raises(InputError, match=r"m\.h5: damaged .*copy the file again"):
        read_10x_h5(p)


def test_damaged_10x_h5_through_the_cli(tmp_path):
    outs, image, _ = visium_outs(tmp_path, "csv")
    m = outs / "filtered_feature_bc_matrix.h5"
    with h5py.File(m) as f:
        indices = f["matrix/indices"][:]
    indices[0] = 10_000
    rewrite(m, "matrix/indices", indices)
    p = convert_cli("visium", outs, "--directory", tmp_path / "raw", "--image", image)
    assert_user_error(p, "filtered_feature_bc_matrix.h5", "damaged", "Space Ranger's outs/")
    assert not (tmp_path / "raw").exists()


def test_matrix_market_features_with_one_column(tmp_path):
    """features.tsv with only the ids was a KeyError traceback."""
    from scipy.io import mmwrite
    mmwrite(str(tmp_path / "matrix.mtx"), sparse.coo_matrix(np.array([[1, 0], [0, 2], [3, 0]])))
    pd.Series(["ENSG1", "ENSG2", "ENSG3"]).to_csv(tmp_path / "features.tsv", header=False, index=False)
    pd.Series(["B1", "B2"]).to_csv(tmp_path / "barcodes.tsv", header=False, index=False)
    with pytest.raises(InputError, match=r"features\.tsv: 1 column.*id and name columns"):
        read_10x_mtx(tmp_path)


def test_an_empty_gene_name_takes_its_feature_id(tmp_path):
    """An empty name became pandas' "Unnamed: N" in the outputs; both name and id empty is refused."""
    p = small_h5(tmp_path / "m.h5")
    rewrite(p, "matrix/features/name", np.array([b"G0", b"", b"G2"]))
    assert list(read_10x_h5(p).genes) == ["G0", "ENSG00001", "G2"]
    rewrite(p, "matrix/features/id", np.array([b"E0", b"", b"E2"]))
    with pytest.raises(InputError, match=r"m\.h5: feature\(s\) 1 .*neither a name nor an id"):
        read_10x_h5(p)


# ----------------------------------------------------------------------------------------------------
# 3, 7, 9: h5ad


def visium_h5ad(path, t, **obs):
    """A scanpy Visium object of the fixture's spots; obs columns overridden by `obs`."""
    pos = t["pos"].loc[t["barcodes"]]
    cols = {"in_tissue": pos.in_tissue.to_numpy(), "array_row": pos.array_row.to_numpy(),
            "array_col": pos.array_col.to_numpy(), **obs}
    ad = anndata.AnnData(X=sparse.csr_matrix(t["X"][:, :30]), obs=pd.DataFrame(cols, index=t["barcodes"]),
                         var=pd.DataFrame(index=[f"G{j}" for j in range(30)]))
    ad.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    ad.uns["spatial"] = {"lib1": {"scalefactors": {"spot_diameter_fullres": 65.0}}}
    ad.write_h5ad(path)
    return path


@pytest.mark.parametrize("bad", [np.nan, "x"])
def test_h5ad_array_row_missing_or_text(tmp_path, visium_src, bad):
    """Was a LinAlgError / ValueError traceback."""
    outs, image, t = visium_src
    rows = t["pos"].loc[t["barcodes"], "array_row"].to_numpy().astype(object)
    rows[0] = bad
    src = visium_h5ad(tmp_path / "v.h5ad", t, array_row=rows.astype(str if bad == "x" else float))
    p = convert_cli("h5ad", src, "--directory", tmp_path / "raw", "--image", image)
    assert_user_error(p, "v.h5ad", "obs['array_row'] holds 1 missing or non-numeric")
    assert not (tmp_path / "raw").exists()


def test_h5ad_in_tissue_as_text(tmp_path, visium_src):
    """"True"/"False" (R conversions) were read as all-NaN: "only 0 spots under tissue"."""
    outs, image, t = visium_src
    flags = t["pos"].loc[t["barcodes"], "in_tissue"].to_numpy()
    src = visium_h5ad(tmp_path / "v.h5ad", t, in_tissue=np.where(flags == 1, "True", "false"))
    assert convert("h5ad", src, "--directory", tmp_path / "raw", "--image", image) == 0
    assert len(read_counts(tmp_path / "raw")) == int(flags.sum())
    visium_h5ad(src, t, in_tissue=flags == 1)                  # booleans, as before
    assert convert("h5ad", src, "--directory", tmp_path / "raw", "--image", image) == 0
    assert len(read_counts(tmp_path / "raw")) == int(flags.sum())
    words = np.where(flags == 1, "1", "0").astype(object)
    words[0] = "yes"
    visium_h5ad(src, t, in_tissue=words)
    p = convert_cli("h5ad", src, "--directory", tmp_path / "raw2", "--image", image)
    assert_user_error(p, "v.h5ad", "obs['in_tissue'] holds 1 value(s)", "'yes'")


def test_h5ad_library_id_not_in_uns_spatial(tmp_path, visium_src):
    """Said "choose one with --library-id" to a user who had."""
    outs, image, t = visium_src
    src = visium_h5ad(tmp_path / "v.h5ad", t)
    p = convert_cli("h5ad", src, "--directory", tmp_path / "raw", "--image", image, "--library-id", "nope")
    assert_user_error(p, "v.h5ad", "--library-id nope: not in uns['spatial'] (lib1)")


def test_h5ad_library_id_without_uns_spatial_warns(tmp_path, visium_src, caplog):
    """Was ignored silently."""
    src = visium_h5ad(tmp_path / "v.h5ad", visium_src[2])
    ad = anndata.read_h5ad(src)
    del ad.uns["spatial"]
    with caplog.at_level("WARNING", logger="trihrge"):
        assert h5ad_convert._scalefactors(ad, src, "nope") == {}
    assert "--library-id nope" in caplog.text and "does not apply" in caplog.text


# ----------------------------------------------------------------------------------------------------
# 4: byte-order marks


def test_scalefactors_json_with_a_byte_order_mark(tmp_path):
    """Was refused as not JSON (visium and visium-hd read it with the same reader)."""
    outs, image, _ = visium_outs(tmp_path, "csv")
    sf = outs / "spatial" / "scalefactors_json.json"
    sf.write_bytes(BOM + sf.read_bytes())
    assert convert("visium", outs, "--directory", tmp_path / "raw", "--image", image) == 0
    sec = json.loads((tmp_path / "raw" / "section.json").read_text())
    assert sec["conversion"]["scalefactors"]["tissue_hires_scalef"] == 0.5


def test_xenium_alignment_matrix_with_a_byte_order_mark(tmp_path):
    """Was refused: "expected 3 lines of 3 numbers"."""
    align = tmp_path / "matrix.csv"
    M = np.array([[2.0, 0.1, 30.0], [-0.1, 2.0, 40.0], [0.0, 0.0, 1.0]])
    align.write_bytes(BOM + "\r\n".join(",".join(map(str, row)) for row in M).encode())
    np.testing.assert_array_equal(xenium_convert.read_alignment(align)[0], M)


def test_experiment_xenium_with_a_byte_order_mark(tmp_path):
    """Its pixel_size was ignored (a warning, then 0.2125)."""
    (tmp_path / "experiment.xenium").write_bytes(BOM + json.dumps({"pixel_size": 0.25}).encode())
    assert xenium_convert._xenium_pixel_size(tmp_path, None) == (0.25, "pixel_size of experiment.xenium")


# ----------------------------------------------------------------------------------------------------
# 5: reconverting into the same folder


def test_reconverting_the_same_source_replaces_the_earlier_files(tmp_path, visium_src):
    """Another --counts-format or image format was refused as "another data set"; a folder converted from
    another source still is."""
    outs, image, t = visium_src
    jpg = tmp_path / "fullres.jpg"
    cv2.imwrite(str(jpg), tifffile.imread(image)[..., ::-1])
    d = tmp_path / "raw"

    def converted(*args):
        assert convert("visium", outs, "--directory", d, *args) == 0
        return {p.name for p in d.iterdir()}

    assert {"he-raw.jpg", "cnts.h5ad"} <= converted("--image", jpg, "--counts-format", "h5ad")
    names = converted("--image", jpg, "--counts-format", "tsv")
    assert "cnts.tsv.gz" in names and "cnts.h5ad" not in names
    names = converted("--image", image)
    assert "he-raw.tif" in names and "he-raw.jpg" not in names
    assert jpg.is_file()                                   # the image hard-linked before stays
    other = tmp_path / "other"
    shutil.copytree(outs, other / "outs")
    p = convert_cli("visium", other / "outs", "--directory", d, "--image", jpg)
    assert_user_error(p, "he-raw.tif", "another data set")
    assert {"he-raw.tif", "cnts.tsv.gz"} <= {p.name for p in d.iterdir()}


# ----------------------------------------------------------------------------------------------------
# 6: Visium HD


def test_visium_hd_bin_folder_without_spatial(tmp_path):
    """Said "no binned_outputs/square_008um/ folder (it holds square_008um: pass --bin-size 8)"."""
    outs, image, _ = visium_hd_outs(tmp_path)
    shutil.rmtree(outs / "binned_outputs" / "square_008um" / "spatial")
    p = convert_cli("visium-hd", outs, "--directory", tmp_path / "raw", "--image", image)
    err = assert_user_error(p, "square_008um/spatial: not found", "tissue_positions.parquet", "scalefactors_json.json")
    assert "--bin-size" not in err


# ----------------------------------------------------------------------------------------------------
# 8, 10, 11: Xenium


def test_xenium_collinear_keypoints(tmp_path):
    """Were fitted, then "only 0% of centroids fall on the image"."""
    he = np.array([[10.0, 20.0], [200.0, 40.0], [390.0, 60.0], [580.0, 80.0]])
    kp = tmp_path / "keypoints.csv"
    pd.DataFrame({"fixedX": he[:, 0] * 2 + 5, "fixedY": he[:, 1] * 2 + 7, "alignmentX": he[:, 0],
                  "alignmentY": he[:, 1]}).to_csv(kp, index=False)
    with pytest.raises(InputError, match=r"keypoints\.csv: 4 keypoint\(s\), all on one line; at least 3 keypoints "
                                         r"not on one line"):
        xenium_convert.read_alignment(kp)


def test_xenium_boundaries_of_another_run(tmp_path):
    """Went on with an INFO line and every cell placed by centroid."""
    src, image, align, _ = xenium_folder(tmp_path)
    b = pd.read_parquet(src / "cell_boundaries.parquet")
    b["cell_id"] = "other-" + b["cell_id"]
    b.to_parquet(src / "cell_boundaries.parquet", index=False)
    p = convert_cli("xenium", src, "--directory", tmp_path / "raw", "--image", image, "--alignment", align)
    assert_user_error(p, "cell_boundaries.parquet", "only 0 of the", "another run", "--assign centroids")
    assert not (tmp_path / "raw").exists()


def test_xenium_raster_um_is_bounded_at_parse_time():
    """1e-3 divides 8 and ran for ages."""
    with pytest.raises(InputError, match=r"--raster-um: '1e-3': must be .*at least 0\.1"):
        build_parser().parse_args(["xenium", "x", "--directory", "d", "--image", "i", "--alignment", "a",
                                   "--raster-um", "1e-3"])


# ----------------------------------------------------------------------------------------------------
# 13


def test_pixel_size_message_does_not_contradict_itself():
    """2.0000001 was printed as "2", "outside 0.05-2.0"."""
    with pytest.raises(InputError, match=r"as 2\.0000001 um/px .*outside 0\.05-2\.0"):
        check_pixel_size(2.0000001, "he.tif", "a fit")
    with pytest.raises(InputError, match=r"as 3\.5 um/px"):
        check_pixel_size(3.5, "he.tif", "a fit")


def test_tissue_positions_in_tissue_as_words_or_out_of_range(tmp_path):
    """tissue_positions.csv with in_tissue True/False was refused; a 2 was read as not under tissue."""
    import pandas as pd
    import pytest

    from utils.convert.tables import in_tissue_flags
    from utils.core.errors import InputError
    assert in_tissue_flags(pd.Series(["True", "false", "1", 0, True]), "p", "in_tissue", "fix").tolist() == \
        [True, False, True, False, True]
    with pytest.raises(InputError, match=r"in_tissue holds 1 value\(s\) other than 1/0 or True/False \(2\)"):
        in_tissue_flags(pd.Series([1, 2, 0]), "p", "in_tissue", "fix")
