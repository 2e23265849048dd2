#!/usr/bin/env python
"""Stage 3: multi-scale histology features per 8 um super-pixel (micro / meso / macro + extra)."""
import argparse
import os

from utils.core.cli import POSITIVE_INT, add_device, check_directory, make_parser, path_arg, run, setup_logging
from utils.histology.backbones import BACKBONES

EPILOG = """\
backbones:
  stain        weights-free: hematoxylin/eosin densities (colour deconvolution), nuclei (LoG blobs),
               gradients, structure tensor and ridges at 1 um/px, pooled over 112 um and 448 um;
               24/29/29 channels; a 6.5 x 6.5 mm slide takes 15-30 s on 2 CPU cores
  stain-nuclei stain plus nuclear morphology of a hematoxylin segmentation (count, area, eccentricity,
               extent, chromatin mean / spread, clumped fraction per super-pixel); 31/36/36 channels;
               level with stain on her2st (docs/BENCHMARKS.md), so not the default
  uni          UNI ViT-L/16 (1024-d), gated: request access at https://huggingface.co/MahmoodLab/UNI, then
               --login TOKEN (or HF_TOKEN) to download, or --weights /path/to/pytorch_model.bin
  uni2-h       UNI2-h ViT-H/14 + 8 register tokens (1536-d); 256 px tiles resized to 224
               (https://huggingface.co/MahmoodLab/UNI2-h)
  timm:NAME    any timm ViT or CNN with --weights PATH (a state dict: .bin/.pth/.safetensors);
               settings the name does not imply go in --timm-kwargs '{"init_values": 1e-5}'

shifts: micro tokens are averaged over N passes of tiles offset by whole super-pixels (N = k*k: the
k x k grid of offsets i/k of a tile, e.g. 4 = half-tile shifts in both axes; other N: diagonal steps
of 1/N tile), weighted towards tile centres, so tile borders do not show; meso/macro summaries are
interpolated bilinearly between tile centres. Default: 4 passes on a GPU, 1 on the CPU (a ViT on the
CPU is slow); stain has no tiles and needs none.

Reads he.tif, he-small.png, calibration.json (from image_calibration.py). Writes features/micro.npy,
meso.npy, macro.npy, extra.npy (float16, grid_rows x grid_cols x channels), features/features.json
and manifests/Histology_Extractor.json. The Hugging Face token is never written or logged."""


def build_parser():
    p = make_parser("Stage 3 of TriHRGE: histology features for every 8 um super-pixel at three scales "
                    "(the super-pixel, its 112 um tile, a 448 um context) plus mean colour and position.",
                    epilog=EPILOG)
    p.add_argument("--backbone", default=None,
                   help=" | ".join(BACKBONES) + "; default: uni when --weights or --login is given, else stain")
    p.add_argument("--weights", type=path_arg, default=None, metavar="PATH",
                   help="local checkpoint: pytorch_model.bin / .pth (loaded with weights_only=True) or .safetensors")
    p.add_argument("--login", default=None, metavar="TOKEN",
                   help="Hugging Face token to download gated weights (or set HF_TOKEN); never stored")
    p.add_argument("--shifts", type=POSITIVE_INT, default=None,
                   help="passes of shifted tiling for tile backbones (default 4 on GPU, 1 on CPU)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="tiles per forward pass (default 64 on GPU, 16 on CPU)")
    add_device(p)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="tile network autocast precision. GPU auto: bf16 where supported, else fp16; CPU auto: bf16 on CPUs with "
                        "AMX or AVX512-BF16 units (2-4 x faster than fp32 for a ViT-L), else fp32; fp16 is GPU only")
    p.add_argument("--band-rows", type=POSITIVE_INT, default=32,
                   help="stain backbone: super-pixel rows per band (memory vs. speed; the result does not depend on it)")
    p.add_argument("--timm-kwargs", default=None, metavar="JSON",
                   help="extra keyword arguments for timm.create_model with --backbone timm:NAME")
    # random weights, for benchmarks and tests only (hidden from --help)
    p.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    token = args.login or os.environ.get("HF_TOKEN") or None
    if not token:
        # no token: never touch the network (no minute-long retries when the weights are not there)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from utils.histology.backbones import parse_timm_kwargs
    from utils.stages.histology_extractor import extract_features
    timm_kwargs = parse_timm_kwargs(args.timm_kwargs)
    extract_features(check_directory(args.directory), backbone=args.backbone, weights=args.weights, token=token,
                     shifts=args.shifts, batch_size=args.batch_size, device=args.device, precision=args.precision,
                     band_rows=args.band_rows, timm_kwargs=timm_kwargs,
                     random_init=args.random_init, force=args.force, quiet=args.quiet)


if __name__ == "__main__":
    run(main, distributed=True)  # torchrun: the ranks share the work (README, "Many GPUs and clusters")
