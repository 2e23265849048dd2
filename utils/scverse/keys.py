"""Every AnnData storage key and analysis file name, named once (squidpy's `_constants` style).

`obsm['spatial']` and `uns['spatial'][library]` follow scanpy's Visium layout, so that
`sc.pl.spatial(adata, color=GENE)` and `squidpy.pl.spatial_scatter(adata, color=GENE)` need no
extra arguments."""


class Key:
    """AnnData keys."""
    SPATIAL = "spatial"                  # obsm: (x, y) in he-raw pixels; uns: {library: {images, scalefactors}}
    IMAGES = "images"
    HIRES = "hires"
    LOWRES = "lowres"
    SCALEFACTORS = "scalefactors"
    HIRES_SCALEF = "tissue_hires_scalef"    # he-raw px -> hires image px
    LOWRES_SCALEF = "tissue_lowres_scalef"
    SPOT_DIAMETER = "spot_diameter_fullres"  # super-pixel side or spot diameter in he-raw px
    METADATA = "metadata"
    # spots-pred.h5ad layers
    MEASURED = "measured"                # the measured spot counts
    OUT_OF_FOLD = "out_of_fold"          # each spot's counts predicted by the state that held it out
    # analysis (utils/analysis): obs columns and uns entries
    DOMAIN = "domain"
    CELL_TYPE = "cell_type"
    CELL_TYPE_CONFIDENCE = "cell_type_confidence"
    CELL_TYPE_SCORE = "score_{}"         # per cell type
    GENE_SET_SCORE = "gene_set_{}"       # per gene set
    UNASSIGNED = "unassigned"            # a super-pixel whose best marker score is not above background
    MARKERS = "rank_genes_groups"


class File:
    """Files the analysis command writes inside RUN_DIR."""
    ANALYSIS_DIR = "analysis"            # analysis of super-res.h5ad
    ANALYSIS_SPOTS_DIR = "analysis-spots"  # analysis of spots-pred.h5ad (--input spots)
    ANALYSIS_H5AD = "analysis.h5ad"
    ANALYSIS_JSON = "analysis.json"
    DOMAIN_MAP = "domains.png"
    DOMAIN_MARKERS = "domain-markers.tsv"
    CELL_TYPE_MAP = "cell-types.png"
    CELL_TYPE_MARKERS = "cell-type-markers.tsv"   # the panel as used: found / not predicted
    GENE_SET_MAP = "gene-set-{}.png"
    SPATIALDATA = "spatialdata.zarr"
    REPORT = "report.html"
