#!/usr/bin/env python
"""A prepared GPU check, a few minutes on one CUDA GPU: how fast the two GPU-heavy parts run.

    python bench/gpu_check.py                      # medium demo under bench/data/medium
    python bench/gpu_check.py --size large         # the 6.5 mm demo (its simulation takes minutes)
    python bench/gpu_check.py --directory DIR      # any section; stages 1-4 are run when not current

(a) UNI-shaped feature extraction: ViT-L/16 (timm vit_large_patch16_224, UNI's settings, random
    weights), bf16 autocast, channels-last input, large batches; tiles read from the memory-mapped
    calibrated H&E in a background thread into pinned memory while the GPU computes. Reported: the
    network alone (tiles/s; against the GPU's ViT-L forward limit, its dense bf16 peak / 61 GFLOP a
    tile), the reading alone, and Histology_Extractor's own tile loop (extract_tiles, 4 shifted passes
    plus macro windows) on the section.
(b) HISTEX: one TriHRGE state trained on the section (spot-epochs/s after a warm-up epoch) and the
    inference over every tissue super-pixel with --n-states copies of it (super-pixels/s).
(c) peak GPU memory of each part.

Prints one table and writes bench/results/gpu_check.json. Without a CUDA GPU it prints one line
and exits 0, writing nothing."""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # profile_training, when imported from elsewhere (the tests)

VIT_L_FLOP_PER_TILE = 61e9   # UNI (ViT-L/16, 224 px, 197 tokens): ~61 GFLOP a forward pass (2 x multiply-adds)
# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s; the SXM parts
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
NO_GPU = ("gpu_check: no CUDA GPU is visible to PyTorch on this machine; nothing measured, no results written "
          "(run it on a GPU machine)")


def bf16_peak(gpu_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU known by name (e.g. 'NVIDIA H100 80GB HBM3'), else None."""
    return next((flops for key, flops in BF16_PEAK.items() if key in gpu_name.upper()), None)


# ---------------------------------------------------------------------------------------------
# the section

def prepare_section(directory: Path, *, size: str) -> Path:
    """A section with stages 1-4 current: the demo tissue simulated when DIR has no raw data,
    then the stages the cohort runner finds out of date (logs in DIR/logs)."""
    from utils.cohort.runner import StagePlan, run_section
    from utils.core.manifest import STAGES
    if not any(directory.glob("cnts.*")):
        print(f"simulating the {size} demo tissue into {directory} (not timed)", flush=True)
        subprocess.run([sys.executable, "-m", "utils.simulate", "--directory", str(directory), "--size", size,
                        "--seed", "0", "-q"], cwd=REPO, check=True)
    result = run_section(directory, [StagePlan(s) for s in list(STAGES)[:-1]])
    if result.status == "failed":
        sys.exit(f"gpu_check: {result.failed_stage} failed on {directory}: {result.error} (see {directory}/logs)")
    return directory


# ---------------------------------------------------------------------------------------------
# (a) the tile network

def tile_corners(shape, px: int, n: int) -> list:
    """n tile corners (y, x) inside an image of `shape`, row by row, starting over when used up."""
    grid = [(y, x) for y in range(0, shape[0] - px + 1, px) for x in range(0, shape[1] - px + 1, px)]
    return [grid[i % len(grid)] for i in range(n)]


class PinnedBatches:
    """Batches of tiles read from the (memory-mapped) image into a ring of page-locked buffers,
    so the copy to the GPU is a DMA that overlaps compute. The ring has prefetch depth + 2 slots:
    the queue holds `depth` loaded batches, the reader fills one more and the GPU holds one, which
    is free again once its results are back on the host (the caller synchronises per batch)."""

    def __init__(self, img, corners, *, px: int, batch: int, depth: int, pin: bool):
        import torch
        self.img, self.corners, self.px, self.batch = img, corners, px, batch
        self.slots = [torch.empty((batch, px, px, 3), dtype=torch.uint8, pin_memory=pin) for _ in range(depth + 2)]

    def __len__(self) -> int:
        return -(-len(self.corners) // self.batch)

    def load(self, b: int):
        from utils.histology.tile_features import read_window
        part = self.corners[b * self.batch:(b + 1) * self.batch]
        buf = self.slots[b % len(self.slots)]
        host = buf.numpy()
        for k, (y, x) in enumerate(part):
            host[k] = read_window(self.img, y, x, self.px, self.px)
        return buf[:len(part)]


def embed(tm, x):
    """Summary features of a uint8 NHWC batch already on the device: normalised there, channels-last
    (for the patch-embedding convolution), under the tile model's autocast on the GPU."""
    import torch
    x = ((x.permute(0, 3, 1, 2).float() - tm._mean_t) / tm._std_t).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=tm.autocast_dtype or torch.float32,
                        enabled=x.is_cuda and tm.autocast_dtype is not None):
        return tm.model.forward_head(tm.model.forward_features(x), pre_logits=True)


def vit_throughput(tm, img, *, n_tiles: int, batch: int, depth: int = 2) -> dict:
    """Tiles/s of the network alone on tiles streamed from `img` (reading overlapped), and of the
    reading alone; the summary vectors come back to the host as Histology_Extractor needs them."""
    import torch

    from utils.histology.tile_features import _prefetch
    cuda = tm.device.type == "cuda"
    tm.model.to(memory_format=torch.channels_last)
    batches = PinnedBatches(img, tile_corners(img.shape, tm.input_px, n_tiles), px=tm.input_px, batch=batch,
                            depth=depth, pin=cuda)
    t0 = time.perf_counter()
    for b in range(min(len(batches), 4)):
        batches.load(b)
    read_rate = min(n_tiles, 4 * batch) / (time.perf_counter() - t0)
    with torch.inference_mode():
        embed(tm, batches.load(0).to(tm.device))   # kernels chosen, memory pools grown
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _, host in _prefetch(list(range(len(batches))), batches.load, depth=depth):
            embed(tm, host.to(tm.device, non_blocking=True)).float().cpu()  # synchronises: frees the slot
        dt = time.perf_counter() - t0
    return {"tiles": n_tiles, "batch": batch, "seconds": dt, "tiles_per_second": n_tiles / dt,
            "read_tiles_per_second": read_rate, "precision": tm.precision, "input_px": tm.input_px}


def stage_loop(tm, img, grid: tuple, *, batch: int, shifts: int = 4) -> dict:
    """Histology_Extractor's own tile loop (utils.histology.tile_features.extract_tiles) over the
    whole section, into arrays in memory instead of the staged memmaps."""
    from utils.histology.tile_features import extract_tiles
    out = [np.empty((*grid, d), np.float16) for d in (tm.dim, tm.summary_dim, tm.summary_dim)]
    stats = extract_tiles(img, grid, tm, *out, shifts=shifts, batch_size=batch)
    return {"tiles": stats["n_tiles"], "shifts": shifts, "batch": batch, "seconds": stats["loop_seconds"],
            "model_seconds": stats["model_seconds"], "tiles_per_second": stats["n_tiles"] / stats["loop_seconds"]}


# ---------------------------------------------------------------------------------------------
# (b) HISTEX

def histex_throughput(directory: Path, *, epochs: int, n_states: int, batch_windows: int, device: str) -> dict:
    """Training spot-epochs/s of one state (bench/profile_training.py) and inference super-pixels/s
    over the tissue with n_states copies of it (the median over states as HISTEX.py predicts)."""
    from profile_training import load_training, time_training

    from models import build_model
    from utils.superres.consistency import tissue_index
    from utils.superres.predict import predict_tissue
    config, td, mask = load_training(directory, ["--device", device, "--epochs", str(epochs)])
    cfg = td.cfg
    train, state = time_training(cfg, td.data, device)
    model = build_model(cfg["model"], cfg["dims"], cfg["n_genes"], 2 * cfg["half"] + 1, **cfg["model_opts"])
    model.load_state_dict(state)
    model = model.to(device).eval()
    rows, cols = tissue_index(mask)
    t0 = time.perf_counter()
    predict_tissue([model] * n_states, cfg, td.maps, td.tokens, rows, cols, device, batch=batch_windows,
                   progress=False)   # returns host arrays: synchronous
    dt = time.perf_counter() - t0
    return {"model": config.run_name, "spots": int(len(td.data["target"])), "genes": cfg["n_genes"],
            "train_spots": train["train_spots"], "epochs": train["epochs_run"], "train_seconds": train["seconds"],
            "spot_epochs_per_second": train["spot_epochs_per_second"], "superpixels": int(len(rows)),
            "n_states": n_states, "batch_windows": batch_windows, "predict_seconds": dt,
            "superpixels_per_second": len(rows) / dt, "feature_dims": cfg["dims"]}


# ---------------------------------------------------------------------------------------------

def with_peak_memory(fn, *args, **kwargs) -> dict:
    """fn's result dict plus the peak GPU memory it allocated (GiB)."""
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    res = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return {**res, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def table(res: dict) -> str:
    vit, loop, hx = res["vit"], res["stage_loop"], res["histex"]
    limit = res["vit_forward_limit_tiles_per_second"]
    rows = [("GPU", res["gpu"], f"torch {res['torch']}, CUDA {res['cuda']}"),
            ("ViT-L/16 network, bf16", f"{vit['tiles_per_second']:,.0f} tiles/s",
             f"{vit['tiles']} tiles, batch {vit['batch']}, {vit['peak_gpu_gib']:.1f} GiB peak"),
            ("  forward limit (bf16 peak / 61 GFLOP)", f"{limit:,.0f} tiles/s" if limit else "unknown GPU",
             f"limit / measured = {res['ratio_to_limit']:.2f} (aim: under 3)" if limit else ""),
            ("  tile reading alone (1 thread)", f"{vit['read_tiles_per_second']:,.0f} tiles/s", "memory-mapped he.tif"),
            ("Histology_Extractor tile loop", f"{loop['tiles_per_second']:,.0f} tiles/s",
             f"{loop['tiles']} tiles ({loop['shifts']} passes + macro), network {loop['model_seconds']:.1f} of "
             f"{loop['seconds']:.1f} s, {loop['peak_gpu_gib']:.1f} GiB"),
            ("HISTEX training", f"{hx['spot_epochs_per_second']:,.0f} spot-epochs/s",
             f"{hx['train_spots']} spots x {hx['epochs']} epochs, {hx['genes']} genes"),
            ("HISTEX inference", f"{hx['superpixels_per_second']:,.0f} super-pixels/s",
             f"{hx['superpixels']:,} super-pixels, {hx['n_states']} states, {hx['peak_gpu_gib']:.1f} GiB")]
    w = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{a.ljust(w[0])}  {b.rjust(w[1])}  {c}" for a, b, c in rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directory", type=Path, default=None,
                   help="the section to measure on (default: bench/data/<size>, simulated when missing); stages "
                        "1-4 are run on it when they are not current")
    p.add_argument("--size", default="medium", choices=["small", "medium", "large"],
                   help="demo tissue when --directory is not given (default: medium; large = 6.5 mm, as the issue's "
                        "section, adds minutes of simulation)")
    p.add_argument("--tiles", type=int, default=16384, help="tiles through the bare network (default: 16384)")
    p.add_argument("--batch", type=int, default=256, help="tiles per batch on the GPU (default: 256)")
    p.add_argument("--epochs", type=int, default=20, help="timed HISTEX training epochs, after one warm-up (default: 20)")
    p.add_argument("--n-states", type=int, default=5, help="states in the timed inference (default: 5, HISTEX's)")
    p.add_argument("--batch-windows", type=int, default=64, help="windows per inference batch (default: 64, HISTEX's)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json", help="the JSON result")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    from utils.core import layout as L
    from utils.core.cli import setup_logging
    from utils.histology.backbones import build_tile_model, resolve_weights
    setup_logging()
    t_start = time.time()
    torch.backends.cudnn.benchmark = True
    d = prepare_section(args.directory or REPO / "bench" / "data" / args.size, size=args.size)
    cal = L.load_calibration(d)
    img = L.open_calibrated_image(d, cal)
    tm = build_tile_model("uni", resolve_weights("uni", random_init=True), device="cuda", precision="bf16")
    name = torch.cuda.get_device_name()
    res = {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
           "section": str(d), "image_px": list(img.shape[:2])}
    res["vit"] = with_peak_memory(vit_throughput, tm, img, n_tiles=args.tiles, batch=args.batch)
    res["stage_loop"] = with_peak_memory(stage_loop, tm, img, L.grid_of(cal), batch=args.batch)
    del tm
    torch.cuda.empty_cache()
    res["histex"] = with_peak_memory(histex_throughput, d, epochs=args.epochs, n_states=args.n_states,
                                     batch_windows=args.batch_windows, device="cuda")
    peak = bf16_peak(name)
    res["bf16_peak_flops"] = peak
    res["vit_forward_limit_tiles_per_second"] = peak / VIT_L_FLOP_PER_TILE if peak else None
    res["ratio_to_limit"] = peak / VIT_L_FLOP_PER_TILE / res["vit"]["tiles_per_second"] if peak else None
    res["peak_gpu_gib"] = max(res[k]["peak_gpu_gib"] for k in ("vit", "stage_loop", "histex"))
    res["seconds"] = time.time() - t_start
    print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {args.out} ({res['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
