"""Optional SpatialData export (`python -m utils.analysis RUN_DIR --export spatialdata`): the H&E as
an image element, the super-pixels as squares (spots as circles) in a shapes element, and a table
annotating them (the predicted counts, the obs with the analysis columns), all in the 'global'
coordinate system of he-raw pixels, so spatialdata-plot and napari-spatialdata open it as it is."""
import numpy as np

from ..core.errors import InputError
from .keys import Key
from .spatial import library_of

IMAGE = "he"
SHAPES = "superpixels"
SPOT_SHAPES = "spots"
TABLE = "table"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"


def require_spatialdata() -> None:
    """One clear line when the optional dependency is missing."""
    try:
        import spatialdata  # noqa: F401
    except ImportError:
        raise InputError("--export spatialdata: the spatialdata package is not installed; install it "
                         "(pip install 'spatialdata>=0.2') or leave out --export") from None


def _image(adata):
    """The hires H&E as a (c, y, x) image element, scaled to he-raw pixels."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale
    sp = adata.uns[Key.SPATIAL][library_of(adata)]
    f = float(sp[Key.SCALEFACTORS][Key.HIRES_SCALEF])
    rgb = np.asarray(sp[Key.IMAGES][Key.HIRES])
    return Image2DModel.parse(np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                              transformations={"global": Scale([1 / f, 1 / f], axes=("y", "x"))})


def _shapes(adata):
    """(name, shapes element): squares of the super-pixel side, or circles of the spot diameter."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity
    size = float(adata.uns[Key.SPATIAL][library_of(adata)][Key.SCALEFACTORS][Key.SPOT_DIAMETER])
    xy = adata.obsm[Key.SPATIAL]
    t = {"global": Identity()}
    if "row" in adata.obs:
        boxes = shapely.box(xy[:, 0] - size / 2, xy[:, 1] - size / 2, xy[:, 0] + size / 2, xy[:, 1] + size / 2)
        return SHAPES, ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes), transformations=t)
    return SPOT_SHAPES, ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), size / 2), transformations=t)


def export_spatialdata(adata, path, *, counts) -> None:
    """Write a SpatialData zarr store at `path`.

    Parameters
    ----------
    adata
        The analysed AnnData (obs with the analysis columns, obsm/uns 'spatial').
    path
        The .zarr folder to write (a staged temporary).
    counts
        The predicted counts (observations x genes, as in the run's h5ad) for the table's X.
    """
    import warnings

    import anndata
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import TableModel
    name, shapes = _shapes(adata)
    obs = adata.obs.copy()
    obs.index = obs.index.astype(str)
    obs[REGION_KEY] = pd.Categorical([name] * adata.n_obs)   # as TableModel wants it (else a warning)
    obs[INSTANCE_KEY] = np.arange(adata.n_obs)
    colours = {k: list(v) for k, v in adata.uns.items() if k.endswith("_colors")}   # the maps' colours, scanpy's key
    table = anndata.AnnData(X=counts, obs=obs, var=adata.var[[]].copy(),
                            obsm={Key.SPATIAL: adata.obsm[Key.SPATIAL]}, uns=colours)
    table = TableModel.parse(table, region=name, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    with warnings.catch_warnings():   # zarr's notice of a future default, once per array written
        warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)
        SpatialData(images={IMAGE: _image(adata)}, shapes={name: shapes}, tables={TABLE: table}).write(path)
