#!/usr/bin/env python
"""Stage: the tissue mask on the 8 um super-pixel grid (see utils/histology/tissue_mask.py for the method)."""
from utils.core.cli import NON_NEGATIVE, check_directory, make_parser, run, setup_logging
from utils.histology.tissue_mask import DEFAULT_FILL_HOLES_UM2, DEFAULT_MIN_REGION_UM2, OD_RANGE, TEXTURE_RANGE
from utils.stages.masking_non_tissue import BACKGROUNDS, OD_THRESHOLD, TEXTURE_THRESHOLD


def build_parser():
    p = make_parser(
        "Find the tissue on the calibrated H&E: a super-pixel is tissue when its colour absorbs (optical "
        "density relative to the glass) and its 16 x 16 px are textured (cells, fibres), so blank glass, "
        "smooth smudges, colour haze and the faint printed spot dots of ST slides are background. "
        "Thresholds are automatic (Otsu, clamped to safe ranges); then small holes are filled and small "
        "specks removed. The white padding is always background.",
        epilog="Reads he.tif, he-small.png, calibration.json, locs.tsv, radius.txt (from image_calibration.py). "
               "Writes mask.png (255 = tissue, one pixel per super-pixel), mask-overlay.png (the H&E with "
               "the mask outline, background tinted, spots yellow on / red off the tissue: look at it), "
               "mask.json (thresholds, tissue fraction and area, spots on tissue) and "
               "manifests/masking_non_tissue.json. Stops with an error when there is no tissue or no spot "
               "centre on it; warns when fewer than 90% of the spot centres are on it.")
    p.add_argument("--threshold", type=OD_THRESHOLD, default=None,
                   help="optical-density threshold for tissue, overriding the automatic one (OD = mean over "
                        "R, G, B of log10(glass/colour); glass is 0, stained tissue ~0.1-0.5; the automatic "
                        f"value is Otsu's, clamped to {OD_RANGE[0]}-{OD_RANGE[1]}). Lower it to keep pale "
                        "tissue, raise it to drop stained debris; mask.json records the value used")
    p.add_argument("--texture-threshold", type=TEXTURE_THRESHOLD, default=None,
                   help="grey-level standard deviation inside a super-pixel above which it counts as "
                        "textured, overriding the automatic one (Otsu on a log scale, clamped to "
                        f"{TEXTURE_RANGE[0]}-{TEXTURE_RANGE[1]}); lower it for blurry or heavily compressed images")
    p.add_argument("--min-region-um2", "--min-region", dest="min_region_um2", type=NON_NEGATIVE,
                   default=DEFAULT_MIN_REGION_UM2,
                   help="tissue regions smaller than this area (um^2; one super-pixel is 64 um^2) are removed "
                        "as specks of dust or debris; 0 keeps everything")
    p.add_argument("--fill-holes-um2", type=NON_NEGATIVE, default=DEFAULT_FILL_HOLES_UM2,
                   help="holes inside the tissue up to this area (um^2) are filled (small lumina, tears, fat); "
                        "larger holes stay background. Fat lobules of any size are kept as long as each fat "
                        "cell (a hole enclosed by textured membranes) is below both this and 20000 um^2; "
                        "0 fills none")
    p.add_argument("--background", default="auto", choices=BACKGROUNDS,
                   help="light: bright-field H&E on light glass; dark: inverted / dark-field image (inverted "
                        "before masking); auto: decided from whether the smooth background is brighter than "
                        "the textured tissue")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    from utils.stages.masking_non_tissue import mask_tissue
    mask_tissue(check_directory(args.directory), threshold=args.threshold, min_region_um2=args.min_region_um2,
                fill_holes_um2=args.fill_holes_um2, texture_threshold=args.texture_threshold,
                background=args.background, force=args.force)


if __name__ == "__main__":
    run(main)
