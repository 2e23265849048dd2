#!/usr/bin/env python
"""Stage 1: bring the H&E image and spot coordinates to 0.5 um/px (see docs/ARCHITECTURE.md)."""
from utils.core.cli import Number, check_directory, make_parser, run, setup_logging

# 16 px super-pixels are 8 um only at 0.5 um/px: every later stage relies on it
PIXEL_SIZE = Number(float, lo=0.5, hi=0.5, note="the super-pixel grid is 16 px = 8 um at 0.5 um/px")


def build_parser():
    p = make_parser(
        "Stage 1 of TriHRGE: rescale he-raw.* to the working resolution (default 0.5 um/px), pad it with "
        "white to a multiple of 224 px, and scale the spot locations and radius the same way.",
        epilog="Reads he-raw.*, pixel-size-raw.txt, locs-raw.tsv, radius-raw.txt. Writes he.tif (lossless, "
               "memory-mappable), he-small.png (mean colour per 8 um super-pixel), locs.tsv, radius.txt, "
               "pixel-size.txt, calibration.json (the exact raw -> calibrated transform) and "
               "manifests/image_calibration.json.")
    p.add_argument("--pixel-size", type=PIXEL_SIZE, default=0.5,
                   help="target pixel size in um/px; only 0.5 is supported (16 px = 8 um super-pixels)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    from utils.stages.image_calibration import calibrate
    calibrate(check_directory(args.directory), pixel_size_um=args.pixel_size, force=args.force,
              progress=not args.quiet)


if __name__ == "__main__":
    run(main)
