#!/usr/bin/env python
"""Stage 5: train the TriHRGE network (or a baseline) and write the super-resolution maps."""
from pathlib import Path

from utils.core.cli import add_device, add_seed, check_directory, make_parser, run, setup_logging


def build_parser():
    p = make_parser(
        "Stage 5 of TriHRGE: train the network on the measured spots (the mean prediction over each spot's "
        "footprint must match its scaled counts), predict every tissue super-pixel, map the predictions back to "
        "counts and write super-res.h5ad, spot-level predictions, gene maps and, when DIR/truth exists, scores.",
        epilog="Needs stages 1-4. Writes under --out (default DIR/results/<model>): super-res.h5ad, spots-pred.h5ad, "
               "maps/<gene>.png, loss.png, states/ (trained states; a rerun reuses finished ones), run.json, "
               "metrics.json (with truth).")
    p.add_argument("--model", default="trihrge", choices=["trihrge", "mlp", "interp"],
                   help="trihrge: the TriHRGE network; mlp: iStar's per-super-pixel MLP on the same features; "
                        "interp: no image, spot counts interpolated with a Gaussian kernel")
    p.add_argument("--epochs", type=int, default=500, help="maximum training epochs per state (early stopping, see --patience, usually ends it sooner)")
    p.add_argument("--n-states", type=int, default=5, help="independently seeded models, combined by the median")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of spots each state holds out (its own seeded draw) to stop training when their loss "
                        "stops improving; the best epoch's weights are kept. 0 = no held-out spots, train all --epochs")
    p.add_argument("--patience", type=int, default=20,
                   help="early stopping: epochs without a better (by 0.1%%) held-out loss before a state stops (0 = never stop early)")
    add_seed(p)
    add_device(p)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (HISTEX/iStar used 1e-4: with early stopping, 1e-3 reaches a lower held-out loss in ~3 x fewer epochs)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    p.add_argument("--batch-size", type=int, default=0, help="spots per batch; 0 = iStar's min(128, n_spots // 16)")
    p.add_argument("--loss", default="mse", choices=["mse", "poisson"],
                   help="footprint loss on min-max scaled counts: squared error or Poisson deviance")
    g = p.add_argument_group("TriHRGE network")
    g.add_argument("--k-tokens", type=int, default=5, help="gene tokens: the k nearest HR pseudo-spots")
    g.add_argument("--token-mask", type=float, default=0.5,
                   help="training only: probability that the HR spots made from the training spot itself are hidden "
                        "from its gene tokens, so the network must use histology instead of copying its target")
    g.add_argument("--d-model", type=int, default=64, help="token width")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--depth", type=int, default=2, help="cross-attention blocks")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in the fusion")
    g.add_argument("--head-hidden", type=int, default=128, help="width of the linear feature-extraction head")
    g.add_argument("--no-macro", action="store_true", help="ablation: drop the macro (448 um) context scale")
    g.add_argument("--no-multiscale", action="store_true", help="ablation: micro features only (no meso/macro)")
    g.add_argument("--no-gene-tokens", action="store_true", help="ablation: no gene tokens / cross-attention")
    g.add_argument("--no-linear-head", action="store_true", help="ablation: one linear layer on fused tokens instead of the linear feature-extraction head")
    o = p.add_argument_group("inference and output")
    o.add_argument("--spot-consistency", default="auto", choices=["auto", "local", "global", "none"],
                   help="mapping predictions back to counts: local = smooth per-gene correction so each spot's "
                        "super-pixels sum to about its count; global = one factor per gene (iStar); "
                        "auto = local for trihrge, global for mlp, none for interp")
    o.add_argument("--sigma", type=float, default=0.5, help="Gaussian kernel width in lattice spacings (interp, local consistency)")
    o.add_argument("--stride", type=int, default=0, help="inference: spacing in super-pixels of the overlapping windows; each super-pixel is the "
                        "centre-weighted mean of the windows that cover it (smaller = smoother, slower); "
                        "0 = auto: max(3, window half-width) for trihrge (3 for Visium), no overlap for mlp (its predictions do not depend on the window)")
    o.add_argument("--batch-windows", type=int, default=64, help="inference windows per batch (bounds memory)")
    o.add_argument("--plot-genes", nargs="*", default=None, help="genes to draw as maps (default: the 4 most variable)")
    o.add_argument("--out", type=Path, default=None, help="output directory (default DIR/results/<model>)")
    o.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    o.add_argument("--retrain", action="store_true", help="retrain states even when finished ones match")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    from utils.core.errors import InputError
    if args.stride < 0:
        raise InputError(f"--stride {args.stride}: must be 0 (auto) or positive")
    for name in ("epochs", "n_states", "k_tokens", "d_model", "heads", "depth", "batch_windows"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not 0.0 <= args.val_fraction < 0.5:
        raise InputError(f"--val-fraction {args.val_fraction}: must be at least 0 and below 0.5")
    if args.patience < 0:
        raise InputError(f"--patience {args.patience}: must be 0 (never stop early) or positive")
    if not 0.0 <= args.token_mask <= 1.0:
        raise InputError(f"--token-mask {args.token_mask}: must be a probability between 0 and 1")
    if args.d_model % args.heads:
        raise InputError(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    from utils.stages.histex import run_histex
    a = vars(args)
    a["directory"] = check_directory(args.directory)
    run_histex(a["directory"], a, progress=not args.quiet)


if __name__ == "__main__":
    run(main)
