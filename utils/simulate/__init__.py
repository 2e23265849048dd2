"""Built-in demo tissue: a simulated H&E breast-cancer section with pseudo-Visium spots and 8 um truth.

    python -m utils.simulate --directory DIR --size small|medium|large --seed N

writes a complete raw-layout data set (he-raw.tif, pixel-size-raw.txt, cnts.tsv, locs-raw.tsv,
radius-raw.txt, section.json) plus the ground truth under DIR/truth/ (super.h5ad at 8 um super-pixels,
mask.png, regions.png, regions-colour.png, cells.tsv.gz, simulation.json), so the whole pipeline runs and
is scored without downloads.

How the world is made (all lengths in um, origin at the image's top-left corner):
- region fields: smooth Gaussian random fields, thresholded by quantiles, give an irregular tissue
  outline, tumour nests, fat lobules; immune aggregates are rasterised Gaussian bumps; ducts and lobule
  acini are ellipses (an epithelial ring around a white lumen);
- cells: jittered hexagonal lattices per region (dense in tumour and immune aggregates, sparse in
  stroma, large polygonal adipocytes in fat) plus explicit epithelial rings around the ducts;
- expression: cell-type profiles (marker genes, gamma-distributed baselines, housekeeping genes) times
  four smooth spatial programmes that the image cannot see, negative-binomial counts per cell, library
  size growing with cell area;
- truth: each cell's molecules are split multinomially over the super-pixels its area overlaps (per-cell
  totals preserved exactly); spots are sums of the truth over utils.geometry.footprint;
- image: stain densities (hematoxylin, eosin) drawn with cv2 into float maps strip by strip, mixed by
  Beer-Lambert, blurred and noised, and written into an uncompressed TIFF memmap.
"""
