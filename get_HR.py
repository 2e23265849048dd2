#!/usr/bin/env python
"""Stage 2: spot counts, gene selection and HR pseudo-spots (see docs/ARCHITECTURE.md)."""
from utils.core.cli import POSITIVE_INT, check_directory, make_parser, run, setup_logging, text_file


def build_parser():
    p = make_parser(
        "Stage 2 of TriHRGE: read the spot counts (cnts.tsv/.tsv.gz/.csv/.h5ad) and locations, select genes, "
        "record the per-gene min-max scaling used as the training target, derive the spot lattice from the "
        "coordinates (hexagonal, square or irregular) and add HR pseudo-spots at half spacing.",
        epilog="Needs image_calibration.py first. Writes spots.h5ad, hr-spots.h5ad, genes.tsv, lattice.json, "
               "hr-spots.png and manifests/get_HR.json.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--n-genes", type=POSITIVE_INT, default=None,
                   help="number of genes to keep, the most variable across spots (default: 1000 as iStar, "
                        "or all genes of a smaller panel)")
    g.add_argument("--gene-list", type=text_file, default=None, help="text file with one gene name per line to use instead")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    from utils.stages.get_hr import build_hr
    build_hr(check_directory(args.directory), n_genes=args.n_genes, gene_list=args.gene_list, force=args.force)


if __name__ == "__main__":
    run(main)
