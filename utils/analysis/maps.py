"""The pictures of the analysis: a label (domains, cell types) or a score next to the H&E.

Both panels are drawn in the frame of the `hires` image of uns['spatial']: super-pixels (obs row,
col) as a raster of squares, spots as discs of their diameter."""
import warnings

import numpy as np

from ..scverse.keys import Key
from ..scverse.spatial import library_of


def palette(n: int) -> list:
    """n distinct colours as hex (tab10, then tab20, then a sampled hsv)."""
    import matplotlib
    for name, size in (("tab10", 10), ("tab20", 20)):
        if n <= size:
            cmap = matplotlib.colormaps[name]
            return [matplotlib.colors.to_hex(cmap(i)) for i in range(n)]
    return [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))]


def frame(adata):
    """(hires H&E, he-raw px -> hires px factor, super-pixel side or spot diameter in he-raw px)."""
    sp = adata.uns[Key.SPATIAL][library_of(adata)]
    f = sp[Key.SCALEFACTORS]
    return np.asarray(sp[Key.IMAGES][Key.HIRES]), float(f[Key.HIRES_SCALEF]), float(f[Key.SPOT_DIAMETER])


def _draw(ax, adata, values, **style):
    """Values (float, NaN = nothing) per observation onto ax, in hires pixels."""
    img, f, size = frame(adata)
    ax.imshow(img, alpha=0.25)
    if "row" in adata.obs and "col" in adata.obs:   # super-pixels: a raster of squares
        rows, cols = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
        r0, c0 = rows.min(), cols.min()
        grid = np.full((rows.max() - r0 + 1, cols.max() - c0 + 1), np.nan, np.float32)
        grid[rows - r0, cols - c0] = values
        extent = (c0 * size * f, (cols.max() + 1) * size * f, (rows.max() + 1) * size * f, r0 * size * f)
        return ax.imshow(grid, extent=extent, interpolation="nearest", **style)
    xy = adata.obsm[Key.SPATIAL] * f
    diameter_pt = size * f * 72 / ax.figure.dpi * ax.get_window_extent().width / img.shape[1]
    return ax.scatter(xy[:, 0], xy[:, 1], c=values, s=diameter_pt ** 2, marker="o", linewidths=0, **style)


def _figure(adata, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    img, _, _ = frame(adata)
    h, w = img.shape[:2]
    fig, ax = plt.subplots(1, 2, figsize=(13, 6 * h / w + 0.8), dpi=100)
    ax[0].imshow(img)
    ax[0].set_title("H&E")
    ax[1].set_xlim(0, w)
    ax[1].set_ylim(h, 0)
    ax[1].set_title(title)
    for a in ax:
        a.set_axis_off()
    return fig, ax


def label_map(adata, *, key: str, path, title: str = None) -> None:
    """A categorical obs column as a map with a legend; colours from uns['<key>_colors'] (scanpy's)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    cats = adata.obs[key].cat.categories
    colours = list(adata.uns.get(f"{key}_colors", palette(len(cats))))
    fig, ax = _figure(adata, title or key)
    codes = adata.obs[key].cat.codes.to_numpy().astype(np.float32)
    _draw(ax[1], adata, np.where(codes < 0, np.nan, codes), cmap=ListedColormap(colours), vmin=-0.5,
          vmax=len(cats) - 0.5)
    counts = adata.obs[key].value_counts()
    handles = [Patch(color=c, label=f"{t} ({counts[t] / adata.n_obs:.0%})") for t, c in zip(cats, colours)]
    # a column per 25 labels: Leiden at a high resolution gives ~170 domains, whose one-column legend
    # ran off the figure (and matplotlib printed its tight-layout warning into the log)
    ax[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
                 ncol=-(-len(handles) // 25))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tight layout not applied", category=UserWarning)
        fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def score_map(adata, *, key: str, path, title: str = None) -> None:
    """A numeric obs column as a map with a colour bar (1st-99th percentile range)."""
    import matplotlib.pyplot as plt
    v = adata.obs[key].to_numpy(np.float32)
    lo, hi = np.nanpercentile(v, [1, 99]) if len(v) else (0, 1)
    fig, ax = _figure(adata, title or key)
    im = _draw(ax[1], adata, v, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    fig.colorbar(im, ax=ax[1], fraction=0.046, pad=0.02)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
