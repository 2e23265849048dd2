#!/usr/bin/env python
"""Stage 5: train the TriHRGE network (or a baseline) and write the super-resolution maps."""
import argparse

from utils.core.cli import (
    add_device,
    add_seed,
    check_directory,
    gene_name,
    make_parser,
    output_directory,
    run,
    setup_logging,
)
from utils.superres.config import CHOICES, VALIDATORS, HistexConfig

D = HistexConfig  # defaults: one place (utils/superres/config.py)
V = VALIDATORS    # the same checks whether values come from here or from code


def build_parser():
    from models import MODELS  # imports torch: here, so that a Ctrl-C meanwhile gets run()'s one line
    p = make_parser(
        "Stage 5 of TriHRGE: train the network on the measured spots (the mean prediction over each spot's "
        "footprint must match its scaled counts), predict every tissue super-pixel, map the predictions back to "
        "counts and write super-res.h5ad, spot-level predictions, gene maps and, when DIR/truth exists, scores.",
        epilog="Needs stages 1-4. Writes under --out (default DIR/results/<model>): super-res.h5ad, spots-pred.h5ad, "
               "maps/<gene>.png, loss.png, states/ (trained states; a rerun reuses finished ones), genes-accuracy.tsv "
               "(cross-validated per-gene accuracy), run.json, "
               "metrics.json (with truth).")
    p.add_argument("--model", default=D.model, choices=list(MODELS),
                   help="trihrge: the TriHRGE network; mlp: iStar's per-super-pixel MLP on the same features; "
                        "interp: no image, spot counts interpolated with a Gaussian kernel")
    p.add_argument("--epochs", type=V["epochs"], default=D.epochs, help="maximum training epochs per state (early stopping, see --patience, usually ends it sooner)")
    p.add_argument("--n-states", type=V["n_states"], default=D.n_states, help="independently seeded models, combined by the median")
    p.add_argument("--val-fraction", type=V["val_fraction"], default=D.val_fraction,
                   help="with --no-cross-fit: share of spots each state holds out (its own seeded draw) to stop "
                        "training when their loss stops improving; the best epoch's weights are kept. 0 = no held-out "
                        "spots (and no cross-validation), train all --epochs")
    p.add_argument("--no-cross-fit", dest="cross_fit", action="store_false",
                   help="by default the --n-states states partition the spots into folds and state s holds out fold s "
                        "(for early stopping and the out-of-fold accuracy estimate in run.json / genes-accuracy.tsv); "
                        "this draws --val-fraction per state instead (no accuracy estimate)")
    p.add_argument("--patience", type=V["patience"], default=D.patience,
                   help="early stopping: epochs without a better (by 0.1%%) held-out loss before a state stops (0 = never stop early)")
    add_seed(p)
    add_device(p)
    p.add_argument("--precision", default=D.precision, choices=CHOICES["precision"],
                   help="arithmetic of the networks' matrix products: bf16 (bfloat16 under torch.autocast; weights, "
                        "losses and outputs stay float32) or fp32. auto: bf16 on CPUs with AMX or AVX512-BF16 units and on GPUs "
                        "that support it, else fp32 (run.json's config records the choice)")
    p.add_argument("--lr", type=V["lr"], default=D.lr, help="Adam learning rate (HISTEX/iStar used 1e-4: with early stopping, 1e-3 reaches a lower held-out loss in ~3 x fewer epochs)")
    p.add_argument("--lr-schedule", default=D.lr_schedule, choices=CHOICES["lr_schedule"],
                   help="the learning rate over epochs, driven by the held-out loss (constant without held-out spots). "
                        "auto: x 0.3 after 3 epochs without a better held-out loss, but only while that loss is "
                        "noisy (it moves by more than 4%% between epochs beyond its trend, as on her2st's 19-spot "
                        "folds); after two cuts the next plateau stops the state. her2st trained in 35%% fewer epochs "
                        "at the same r; smooth losses (Visium-sized folds) keep the constant rate. constant: --lr "
                        "throughout. plateau: cut every plateau (torch's ReduceLROnPlateau); with --patience 10 the "
                        "fastest, but the demo lost 1.6%% in r (docs/BENCHMARKS.md)")
    p.add_argument("--weight-decay", type=V["weight_decay"], default=D.weight_decay, help="Adam weight decay")
    p.add_argument("--batch-size", type=V["batch_size"], default=D.batch_size, help="spots per batch; 0 = n_spots // 16 (iStar's rule), at most 32")
    p.add_argument("--loss", default=D.loss, choices=CHOICES["loss"],
                   help="footprint loss on min-max scaled counts: squared error or Poisson deviance")
    p.add_argument("--standardize-features", action=argparse.BooleanOptionalAction, default=D.standardize_features,
                   help="opt-in: each feature channel minus its mean, over its standard deviation (both over the "
                        "spots' footprints) before the network; it raised the iStar MLP's held-out r on her2st and "
                        "the demo but not TriHRGE's (docs/BENCHMARKS.md); the run is named <model>-std")
    g = p.add_argument_group("TriHRGE network")
    g.add_argument("--k-tokens", type=V["k_tokens"], default=D.k_tokens, help="with --gene-tokens: the k nearest HR pseudo-spots")
    g.add_argument("--token-mask", type=V["token_mask"], default=D.token_mask,
                   help="with --gene-tokens, training only: probability that the HR spots made from the training spot itself are hidden "
                        "from its gene tokens, so the network must use histology instead of copying its target")
    g.add_argument("--d-model", type=V["d_model"], default=D.d_model, help="token width")
    g.add_argument("--heads", type=V["heads"], default=D.heads, help="attention heads")
    g.add_argument("--depth", type=V["depth"], default=D.depth, help="attention blocks (cross-attention with --gene-tokens, self-attention with --window-attention)")
    g.add_argument("--dropout", type=V["dropout"], default=D.dropout, help="dropout in the fusion")
    g.add_argument("--head-hidden", type=V["head_hidden"], default=D.head_hidden, help="width of the linear feature-extraction head")
    g.add_argument("--no-macro", action="store_true", help="ablation: drop the macro (448 um) context scale")
    g.add_argument("--no-multiscale", action="store_true", help="ablation: micro features only (no meso/macro)")
    g.add_argument("--gene-tokens", action=argparse.BooleanOptionalAction, default=D.gene_tokens,
                   help="opt-in: the k nearest HR pseudo-spots' expression as gene tokens, fused with the histology by "
                        "three cross-attentions (HISTEX's design; on her2st it cost accuracy next to the local spot "
                        "consistency, docs/BENCHMARKS.md); the run is named <model>-tokens")
    g.add_argument("--no-linear-head", action="store_true", help="ablation: one linear layer on fused tokens instead of the linear feature-extraction head")
    g.add_argument("--window-attention", action=argparse.BooleanOptionalAction, default=D.window_attention,
                   help="opt-in, without gene tokens: the super-pixels of a window exchange context by --depth "
                        "self-attention blocks (by default each is predicted from its own multi-scale features, "
                        "which measured as well on her2st, and inference windows need no overlap); the run is "
                        "named <model>-attn")
    g.add_argument("--residual", action=argparse.BooleanOptionalAction, default=D.residual,
                   help="opt-in: the network predicts a signed correction to the Gaussian interpolation of the "
                        "spots (trained against each spot's leave-one-out interpolation, added to the interpolated "
                        "map at inference; it scored below the default late fusion on her2st, docs/BENCHMARKS.md); "
                        "the run is named <model>-resid")
    o = p.add_argument_group("inference and output")
    o.add_argument("--spot-consistency", default=D.spot_consistency, choices=CHOICES["spot_consistency"],
                   help="mapping predictions back to counts: local = smooth per-gene correction so each spot's "
                        "super-pixels sum to about its count; global = one factor per gene (iStar); "
                        "auto = local for trihrge, global for mlp, none for interp")
    o.add_argument("--fusion", default=D.fusion, choices=CHOICES["fusion"],
                   help="blend = per gene, mix the model's map (after spot consistency) with the "
                        "interpolation (carrying the map's within-spot detail; blend-linear: the plain interpolation) "
                        "by the weight that best predicts the held-out spots (cross-fitting; shrunk "
                        "towards one weight for all genes), so a gene the histology does not inform falls back to "
                        "smoothing; needs cross-fitting (not with --no-cross-fit or --val-fraction 0); "
                        "stack (default) = near the spots as blend, between them a per-gene stacking of the image model, the "
                        "consistent map and the interpolation fitted on the held-out spots (utils/superres/stacking.py); "
                        "none = the model's map alone")
    o.add_argument("--sigma", type=V["sigma"], default=D.sigma, help="Gaussian kernel width in lattice spacings (interp, local consistency)")
    o.add_argument("--consistency-sigma", type=V["consistency_sigma"], default=D.consistency_sigma,
                   help="kernel width in lattice spacings of the local spot consistency (0: --sigma)")
    o.add_argument("--choose-consistency-sigma", action="store_true",
                   help="choose that width per run among 0.35-2.8 spacings by the out-of-fold spots (cross-fitting); "
                        "opt-in: it helped one her2st section and hurt the other (docs/BENCHMARKS.md)")
    o.add_argument("--stride", type=V["stride"], default=D.stride, help="inference: spacing in super-pixels of the overlapping windows; each super-pixel is the "
                        "centre-weighted mean of the windows that cover it (smaller = smoother, slower); "
                        "0 = auto: no overlap where a super-pixel's prediction does not depend on its window (trihrge, mlp), "
                        "max(3, window half-width) with --gene-tokens or --window-attention (3 for Visium)")
    o.add_argument("--batch-windows", type=V["batch_windows"], default=D.batch_windows, help="inference windows per batch (bounds memory)")
    o.add_argument("--plot-genes", nargs="+", action="extend", type=gene_name, default=None, metavar="GENE",
                   help="genes to draw as maps (default: the 4 most variable); may be given more than once")
    o.add_argument("--compress", action="store_true",
                   help="store super-res.h5ad's X gzip-compressed (HDF5 shuffle + deflate level 1, on every CPU): "
                        "about a quarter smaller, but slower to write (her2st: +5 s on 2 cores) and to read one "
                        "gene from (16 x); by default X is uncompressed, as anndata writes it")
    o.add_argument("--library-id", type=V["library_id"], default=None, metavar="NAME",
                   help="the section's key in uns['spatial'] of both h5ad files (scanpy's library_id; default: "
                        "the name of DIR). Give sections that share a folder name (p1/visium, p2/visium) their "
                        "own, so that anndata.concat keeps each one's images")
    o.add_argument("--out", type=output_directory, default=None, help="output directory (default DIR/results/<model>)")
    o.add_argument("--threads", type=V["threads"], default=D.threads,
                   help="CPUs to use: up to this many states train at once (a worker process each, one thread each) "
                        "and inference runs on this many threads; results do not depend on it. 0: the CPUs this "
                        "process may run on")
    o.add_argument("--retrain", action="store_true", help="retrain states even when finished ones match")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    from utils.stages.histex import run_histex
    config = HistexConfig.from_options(vars(args))
    run_histex(check_directory(args.directory), config, force=args.force, progress=not args.quiet)


if __name__ == "__main__":
    run(main, distributed=True)  # torchrun: the ranks share the work (README, "Many GPUs and clusters")
