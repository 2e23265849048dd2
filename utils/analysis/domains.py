"""Tissue domains: PCA of the log-normalised expression, optionally averaged over spatial neighbours,
clustered by k-means (scikit-learn) or Leiden (scanpy, igraph); marker genes per domain by
scanpy.tl.rank_genes_groups."""
import logging
import warnings

import numpy as np
import pandas as pd

from ..core.errors import InputError
from ..scverse.keys import Key

log = logging.getLogger("trihrge")

METHODS = ("kmeans", "leiden")
PCA_KEY = "X_pca"
SMOOTH_KEY = "X_pca_smooth"
LEIDEN_NEIGHBOURS = 15
MAX_DOMAINS = 200   # more cannot be told apart on a map; Leiden at an absurd resolution gives one per super-pixel
EXACT_KNN_MAX_OBS = 8192   # scanpy.pp.neighbors searches exactly below this many observations


def embed(adata, *, n_pcs: int = 30, seed: int = 0) -> None:
    """obsm['X_pca']: the first `n_pcs` principal components (fewer when there are fewer genes).

    Parameters
    ----------
    adata
        Log-normalised expression (preprocess.normalise_log).
    n_pcs
        Number of components.
    seed
        Random state of the solver.
    """
    import scanpy as sc
    n = max(1, min(n_pcs, adata.n_vars - 1, adata.n_obs - 1))
    if n < n_pcs:
        log.info("%d principal components, not %d: %d observations x %d genes hold no more", n, n_pcs,
                 adata.n_obs, adata.n_vars)
    sc.pp.pca(adata, n_comps=n, random_state=seed)


def neighbour_spacing(xy: np.ndarray) -> float:
    """The median distance from an observation to its nearest other one (super-pixel side, spot spacing)."""
    from sklearn.neighbors import NearestNeighbors
    d, _ = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy)
    return float(np.median(d[:, 1]))


def smooth(adata, *, rings: int, key: str = PCA_KEY) -> str:
    """obsm['X_pca_smooth']: each observation's embedding averaged with its neighbours within
    `rings` lattice spacings (itself included). Returns the key of the embedding to cluster
    (`key` itself when rings is 0).

    Parameters
    ----------
    adata
        With obsm['spatial'] and obsm[key].
    rings
        Radius of the neighbourhood in spacings of the observations' lattice; 0 for none.
    key
        The embedding to smooth.
    """
    if rings <= 0:
        return key
    from sklearn.neighbors import radius_neighbors_graph
    xy = adata.obsm[Key.SPATIAL]
    radius = rings * neighbour_spacing(xy) * 1.01       # 1.01: the lattice's own rounding
    A = radius_neighbors_graph(xy, radius, mode="connectivity", include_self=True, n_jobs=-1).tocsr()
    deg = np.asarray(A.sum(1)).ravel()
    adata.obsm[SMOOTH_KEY] = (A @ adata.obsm[key]) / deg[:, None]
    log.info("spatial smoothing over %.1f neighbours on average (%d ring(s))", deg.mean(), rings)
    return SMOOTH_KEY


def cluster(adata, *, n_domains: int = 6, method: str = "kmeans", resolution: float = 1.0,
            rep: str = PCA_KEY, seed: int = 0) -> None:
    """obs['domain']: categorical labels '1', '2', ... numbered by decreasing size.

    Parameters
    ----------
    adata
        With obsm[rep].
    n_domains
        Number of k-means clusters (ignored by Leiden, which takes `resolution`).
    method
        'kmeans' (scikit-learn KMeans, 4 initialisations) or 'leiden' (scanpy, igraph flavour, on a
        15-nearest-neighbour graph of the embedding).
    resolution
        Leiden resolution: higher gives more domains.
    rep
        The embedding in obsm to cluster.
    seed
        Random state of the initialisation / neighbour search / Leiden.
    """
    if method == "kmeans":
        from sklearn.cluster import KMeans
        k = min(n_domains, adata.n_obs)
        from sklearn.exceptions import ConvergenceWarning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(adata.obsm[rep])
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):   # fewer distinct points than k
            log.warning("k-means found fewer than %d distinct points in the embedding, so some domains are "
                        "empty or split at random; a narrower --smooth (or fewer --n-domains) gives real ones", k)
    else:
        import scanpy as sc
        sc.pp.neighbors(adata, n_neighbors=LEIDEN_NEIGHBOURS, use_rep=rep, random_state=seed,
                        transformer=_approximate_knn(adata.n_obs, seed))
        sc.tl.leiden(adata, resolution=resolution, flavor="igraph", n_iterations=2, random_state=seed,
                     key_added="_leiden")
        labels = adata.obs.pop("_leiden").astype(int).to_numpy()
        if labels.max() + 1 > MAX_DOMAINS:
            raise InputError(f"--resolution {resolution:g}: Leiden found {labels.max() + 1} domains, more than the "
                             f"{MAX_DOMAINS} a map can show; lower --resolution (higher gives more domains)")
        if (single := int((np.bincount(labels) == 1).sum())) > len(labels) // 10:
            log.warning("--resolution %g: %d of Leiden's %d domains are single observations (of %d); a lower "
                        "--resolution gives domains of several", resolution, single, labels.max() + 1, len(labels))
    sizes = np.bincount(labels)
    rank = np.empty_like(sizes)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(len(sizes))
    names = [str(i + 1) for i in range(len(sizes))]
    adata.obs[Key.DOMAIN] = pd.Categorical.from_codes(rank[labels], categories=names)
    log.info("%d domains (%s); sizes %s", len(names), method, ", ".join(str(int(s)) for s in np.sort(sizes)[::-1]))


def _approximate_knn(n_obs: int, seed: int):
    """None (scanpy's exact search) below scanpy's size for it; above, the pynndescent search scanpy
    would make (UMAP's tree and iteration counts), returning a csr_matrix: pynndescent 0.7 returns a
    sparse array, which scanpy 1.11's neighbour code cannot read ('csr_array' has no getnnz)."""
    if n_obs < EXACT_KNN_MAX_OBS:
        return None
    import scipy.sparse as sp
    from pynndescent import PyNNDescentTransformer

    class MatrixOutput(PyNNDescentTransformer):
        def fit_transform(self, X, y=None, **kwargs):
            return sp.csr_matrix(super().fit_transform(X, y, **kwargs))

    return MatrixOutput(n_neighbors=LEIDEN_NEIGHBOURS, metric="euclidean", random_state=seed,
                        n_trees=min(64, 5 + round(n_obs ** 0.5 / 20.0)), n_iters=max(5, round(np.log2(n_obs))))


def markers(adata, *, n_top: int = 10, groupby: str = Key.DOMAIN) -> pd.DataFrame:
    """The top `n_top` genes of each group against the rest (scanpy.tl.rank_genes_groups, t-test on
    the log-normalised expression) as a table: group, rank, gene, score, log fold change, adjusted p.

    Parameters
    ----------
    adata
        Log-normalised expression with obs[groupby].
    n_top
        Genes per group.
    groupby
        The obs column of the groups.
    """
    import scanpy as sc
    groups = [g for g, n in adata.obs[groupby].value_counts().items() if n >= 2]
    if len(groups) < 2:
        return pd.DataFrame(columns=[groupby, "rank", "gene", "score", "log2_fold_change", "p_adjusted"])
    with warnings.catch_warnings():   # scanpy builds its tables a column at a time: pandas warns per group
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(adata, groupby, groups=groups, method="t-test", n_genes=min(n_top, adata.n_vars),
                                key_added=Key.MARKERS)
    df = sc.get.rank_genes_groups_df(adata, group=None, key=Key.MARKERS)
    df = df.rename(columns={"group": groupby, "names": "gene", "scores": "score", "logfoldchanges": "log2_fold_change",
                            "pvals_adj": "p_adjusted"})
    df.insert(1, "rank", df.groupby(groupby, observed=True).cumcount() + 1)
    return df[[groupby, "rank", "gene", "score", "log2_fold_change", "p_adjusted"]]
