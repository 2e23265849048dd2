"""After the maps: `python -m utils.analysis RUN_DIR` on super-res.h5ad (or spots-pred.h5ad).

Modules, each one job, each a scanpy-style function over one AnnData:
    preprocess.py  normalise, log1p (the matrix every step below reads)
    domains.py     PCA, optional spatial smoothing, k-means or Leiden -> obs['domain'], marker genes
    celltypes.py   marker panels (a user TSV or the built-in breast panel) -> scores, label, confidence
    genesets.py    any list of genes -> a score per observation
    maps.py        the pictures: labels or scores next to the H&E
    cli.py         the command: read, run the steps, write atomically into RUN_DIR/analysis/"""
