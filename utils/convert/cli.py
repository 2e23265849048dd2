"""Convert 10x Genomics outputs into TriHRGE's raw layout (README, sections "Inputs" and "Converting 10x data").

    python -m utils.convert visium    OUTS     --directory DIR --image FULLRES_HE
    python -m utils.convert visium-hd OUTS     --directory DIR --image FULLRES_HE [--bin-size 8|2]
    python -m utils.convert xenium    XENIUM   --directory DIR --image POST_XENIUM_HE --alignment MATRIX.csv
    python -m utils.convert h5ad      FILE.h5ad --directory DIR --image FULLRES_HE

Every converter writes he-raw.<ext> (a hard link to, or copy of, the given image), pixel-size-raw.txt,
cnts.tsv.gz or cnts.h5ad, locs-raw.tsv, radius-raw.txt and section.json; visium-hd and xenium also write the
8 um ground truth (truth/super.h5ad, truth/mask.png) and pseudo-Visium spots summed from it. Everything is
written atomically inside the stage runner (utils/core/stage.py). The readers live in visium.py and
xenium.py; tables.py, tenx_matrix.py, he_image.py, affine.py, raw_layout.py and truth_layout.py hold what they
share.
"""
import textwrap

from ..core.cli import POSITIVE, SEED, HelpFormatter, Number, Parser, output_directory, path_arg, setup_logging
from ..core.geometry import SUPER_PIXEL_UM
from ..core.raw_io import RADIUS_RANGE_UM

DESCRIPTION = __doc__.split("\n\n")[0] + """

Space Ranger 1.x-3.x (Visium: spatial/tissue_positions_list.csv, tissue_positions.csv or .parquet;
Visium HD: Space Ranger >= 3.0 binned_outputs/), Xenium Onboard Analysis 1.x-2.x outputs, and scanpy
Visium objects saved as .h5ad. Run `python -m utils.convert COMMAND --help` for each command's options."""


def _wrap(text, width=100):
    """Wrap each paragraph of a description (the formatter keeps line breaks as written)."""
    return "\n\n".join(textwrap.fill(par, width) for par in text.split("\n\n"))


def _skip_image_check(p):
    p.add_argument("--skip-image-check", action="store_true",
                   help="do not check --image against tissue_hires_image.png and tissue_hires_scalef")


# the spot radius stage 1 takes (raw_io.RADIUS_RANGE_UM), as a diameter: refused here, not a stage later
SPOT_DIAMETER_UM = Number(float, lo=2 * RADIUS_RANGE_UM[0], hi=2 * RADIUS_RANGE_UM[1])


# the boundary raster: finer than 0.1 um (6,400 sub-pixels per super-pixel) only costs time, coarser than a
# super-pixel cannot split a cell over them
RASTER_UM = Number(float, lo=0.1, hi=SUPER_PIXEL_UM, note="it must divide 8")


def _spot_diameter(p):
    p.add_argument("--spot-diameter-um", type=SPOT_DIAMETER_UM, default=55.0,
                   help=f"physical spot diameter written as radius-raw.txt (Visium: 55; ST: 100; "
                        f"{SPOT_DIAMETER_UM.lo:g}-{SPOT_DIAMETER_UM.hi:g})")


def _common(p, image_help, matrix=True):
    p.add_argument("--directory", "-d", required=True, type=output_directory,
                   help="output folder for the raw layout (created if missing); files of an earlier conversion are "
                        "replaced, raw-layout files of another data set make it refuse")
    p.add_argument("--image", type=path_arg, required=True, help=image_help)
    p.add_argument("--pixel-size", type=POSITIVE, default=None, metavar="UM",
                   help="um per pixel of --image, overriding the value derived from the data (see the command's "
                        "description for how it is derived)")
    p.add_argument("--image-mode", choices=["hardlink", "copy", "symlink"], default="hardlink",
                   help="how he-raw.<ext> is made from --image: a hard link (no extra disk space; falls back to a copy "
                        "across file systems), a copy, or a symbolic link to the absolute path")
    p.add_argument("--counts-format", choices=["auto", "tsv", "h5ad"], default="auto",
                   help="cnts.tsv.gz (dense, iStar-compatible) or cnts.h5ad (sparse); auto picks tsv up to "
                        "20 million spot x gene values")
    if matrix:
        p.add_argument("--matrix", type=path_arg, default=None,
                       help="feature-barcode matrix to read instead of the one found in SOURCE (.h5 or a Matrix "
                            "Market folder)")
    p.add_argument("--tissue", default="", help="free-text tissue description recorded in section.json")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors in the log")


def _pseudo(p):
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the pseudo-Visium lattice offset (and of the multinomial split of Xenium cells); "
                        "the same seed gives the same spots")


FULLRES = ("the full-resolution H&E given to Space Ranger (its --image: TIFF/OME-TIFF/BigTIFF, JPEG or PNG); NOT "
           "spatial/tissue_hires_image.png or tissue_lowres_image.png, which are far too coarse")


def build_parser():
    p = Parser(prog="python -m utils.convert", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{visium,visium-hd,xenium,h5ad}", parser_class=Parser)
    sub.required = True

    v = sub.add_parser(
        "visium", formatter_class=HelpFormatter, help="Space Ranger Visium outs/ folder",
        description=_wrap("Visium (Space Ranger 1.x-3.x outs/): in-tissue spots of filtered_feature_bc_matrix.h5 (or "
                    "raw_feature_bc_matrix.h5, filtered by in_tissue), positions from spatial/"
                    "tissue_positions.parquet, tissue_positions.csv (2.x+, header) or tissue_positions_list.csv (1.x, "
                    "no header): x = pxl_col_in_fullres, y = pxl_row_in_fullres.\n\nPixel size: an affine fit of "
                    "the spot positions on the 100 um hexagonal array (array_row/array_col), which needs no scale "
                    "factor; spot_diameter_fullres is only cross-checked (Space Ranger documents it as a theoretical "
                    "65 um spot). radius-raw.txt = 27.5 um / pixel size."))
    v.add_argument("source", type=path_arg, help="Space Ranger outs/ folder (holding spatial/ and the matrix)")
    _common(v, FULLRES)
    _spot_diameter(v)
    _skip_image_check(v)

    h = sub.add_parser(
        "visium-hd", formatter_class=HelpFormatter, help="Space Ranger (>= 3.0) Visium HD outs/ folder",
        description=_wrap("Visium HD (Space Ranger >= 3.0): the bins of binned_outputs/square_008um (or square_002um) "
                    "become the 8 um super-pixel truth (each bin goes to the super-pixel of --image that holds its "
                    "centre; truth/super.h5ad, truth/mask.png), and pseudo-Visium spots (55 um, 100 um hexagonal "
                    "lattice) summed from it become cnts/locs-raw.\n\nPixel size: microns_per_pixel of "
                    "spatial/scalefactors_json.json, cross-checked against the bin lattice."))
    h.add_argument("source", type=path_arg, help="Space Ranger outs/ folder (holding binned_outputs/), or a "
                                             "binned_outputs/square_NNNum folder")
    _common(h, FULLRES)
    h.add_argument("--bin-size", type=int, choices=[8, 2], default=8,
                   help="bins to build the truth from: 8 um bins map one-to-one onto super-pixels only when the bin "
                        "grid is aligned with the image; 2 um bins (16 per super-pixel) avoid that aliasing at more "
                        "memory")
    _skip_image_check(h)
    _pseudo(h)

    x = sub.add_parser(
        "xenium", formatter_class=HelpFormatter, help="Xenium output folder + aligned post-Xenium H&E",
        description=_wrap("Xenium (Onboard Analysis 1.x-2.x): cells.parquet or cells.csv.gz (cell_id, x_centroid, "
                    "y_centroid in um), cell_feature_matrix.h5 (Gene Expression features only), optionally "
                    "cell_boundaries.parquet (cell_id, vertex_x, vertex_y in um), plus a post-Xenium H&E and the "
                    "alignment matrix Xenium Explorer exports for it. Cells are split into the H&E's 8 um "
                    "super-pixels by boundary overlap (else by centroid) into truth/super.h5ad; pseudo-Visium "
                    "spots are summed from it.\n\nAlignment: the exported 3 x 3 matrix maps H&E pixels to Xenium "
                    "morphology-image pixels (pixel_size of experiment.xenium, 0.2125 um); Xenium um go to H&E "
                    "pixels by its inverse, and the H&E pixel size is 0.2125 * sqrt(|det|) um/px. If your file maps "
                    "the other way or into microns, use --invert-alignment / --alignment-units microns (the converter "
                    "checks that cells land on the image and names the reading that fits)."))
    x.add_argument("source", type=path_arg, help="Xenium output folder (holding experiment.xenium, cells.parquet, "
                                             "cell_feature_matrix.h5, cell_boundaries.parquet)")
    _common(x, "the post-Xenium H&E image of the same section (TIFF/OME-TIFF, JPEG or PNG), the one the alignment "
               "was made for")
    x.add_argument("--alignment", type=path_arg, required=True,
                   help="alignment CSV from Xenium Explorer: the 3 x 3 transformation matrix (H&E px -> Xenium px), "
                        "or a keypoints CSV with columns fixedX, fixedY (Xenium px), alignmentX, alignmentY (H&E px)")
    x.add_argument("--invert-alignment", action="store_true",
                   help="the matrix maps Xenium -> H&E instead of H&E -> Xenium")
    x.add_argument("--alignment-units", choices=["pixels", "microns"], default="pixels",
                   help="units of the Xenium side of the alignment: Xenium morphology-image pixels (Xenium "
                        "Explorer's matrix and keypoints exports) or microns")
    x.add_argument("--xenium-pixel-size", type=POSITIVE, default=None, metavar="UM",
                   help="um per Xenium morphology pixel (default: pixel_size of SOURCE/experiment.xenium, else 0.2125)")
    x.add_argument("--boundaries", type=path_arg, default=None,
                   help="cell boundary table to use instead of SOURCE/cell_boundaries.parquet")
    x.add_argument("--assign", choices=["auto", "boundaries", "centroids"], default="auto",
                   help="split cells over super-pixels by boundary overlap, or put each wholly at its centroid; auto "
                        "uses boundaries when the file exists")
    x.add_argument("--raster-um", type=RASTER_UM, default=0.5,
                   help=f"sub-grid (um) on which cell polygons are rasterised to measure their overlap with the 8 um "
                        f"super-pixels; must divide 8 ({RASTER_UM.lo:g}-{RASTER_UM.hi:g})")
    _pseudo(x)

    a = sub.add_parser(
        "h5ad", formatter_class=HelpFormatter, help="AnnData .h5ad of a scanpy Visium object",
        description=_wrap("AnnData (a scanpy Visium object saved with write_h5ad): spot centres from "
                    "obsm['spatial'] (full-resolution pixels, x = column, y = row), raw counts from "
                    "layers['counts'], else X, else raw.X (they must be integers), in-tissue spots when "
                    "obs['in_tissue'] exists, 'Gene Expression' features when var['feature_types'] exists.\n\n"
                    "Pixel size: affine fit on obs array_row/array_col when present, else the nearest-neighbour "
                    "spacing of a hexagonal lattice (100 um), else spot_diameter_fullres / 65 um from "
                    "uns['spatial'][library]['scalefactors']."))
    a.add_argument("source", type=path_arg, help="the .h5ad file")
    _common(a, FULLRES, matrix=False)
    a.add_argument("--spatial-key", default="spatial", help="obsm key of the spot centres in full-resolution pixels")
    a.add_argument("--library-id", default=None, help="library in uns['spatial'] when it holds several")
    _spot_diameter(a)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    if args.command == "visium":
        from .visium import convert_visium as convert
    elif args.command == "visium-hd":
        from .visium import convert_visium_hd as convert
    elif args.command == "xenium":
        from .xenium import convert_xenium as convert
    else:
        from .h5ad import convert_h5ad as convert
    convert(args)
    return 0

