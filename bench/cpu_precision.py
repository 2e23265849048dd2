#!/usr/bin/env python
"""What bfloat16 buys on this CPU (--precision auto picks bf16 where the CPU has AMX units):

(a) UNI-shaped feature extraction: ViT-L/16 (UNI's settings, random weights) through
    Histology_Extractor's tile model, tiles/s in fp32 and bf16, and the cosine similarity of the
    bf16 patch tokens to the fp32 ones;
(b) HISTEX training: one TriHRGE state on a prepared directory, spot-epochs/s in fp32 and bf16 on
    one thread (as each training worker runs), after a warm-up epoch;
(c) HISTEX inference: super-pixels/s of --n-states copies of that state in fp32 and bf16, and how
    far the bf16 predictions are from the fp32 ones.

    python bench/cpu_precision.py --directory bench/data/her2st/C2-leave-out [--tiles 8] [--epochs 20]

DIR: stages 1-4 done. The scores of whole runs are bench/cpu_path.py's and bench/her2st.py's. Prints
one table and writes bench/results/cpu_precision.json."""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PRECISIONS = ("fp32", "bf16")


def tile_network(n_tiles: int, threads: int) -> dict:
    """Tiles/s of the ViT-L/16 tile model per precision and the bf16 tokens' cosine to fp32's."""
    import torch

    from utils.histology.backbones import build_tile_model, resolve_weights
    torch.set_num_threads(threads)
    tiles = np.random.default_rng(0).integers(0, 255, (n_tiles, 224, 224, 3), dtype=np.uint8)
    res, tokens = {}, {}
    for precision in PRECISIONS:
        tm = build_tile_model("uni", resolve_weights("uni", random_init=True), device="cpu", precision=precision)
        tm._forward(tiles[:1])                                  # warm-up: kernels chosen
        t0 = time.perf_counter()
        tokens[precision], _ = tm._forward(tiles)
        res[f"{precision}_tiles_per_second"] = n_tiles / (time.perf_counter() - t0)
    a, b = (torch.from_numpy(tokens[p].reshape(-1, tokens[p].shape[-1])) for p in PRECISIONS)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {**res, "tiles": n_tiles, "token_cosine_min": float(cos.min()), "token_cosine_median": float(cos.median())}


def histex_parts(directory: Path, epochs: int, threads: int, histex_args) -> dict:
    """Training spot-epochs/s (one thread) and inference super-pixels/s (`threads`) per precision."""
    import torch
    from profile_training import load_training, time_training

    from utils.superres.predict import predict_tissue
    from utils.superres.states import load_state
    res, preds = {}, {}
    for precision in PRECISIONS:
        config, td, mask = load_training(directory, ["--precision", precision, "--epochs", str(epochs), *histex_args])
        torch.set_num_threads(1)
        info, state = time_training(td.cfg, td.data, "cpu")
        res[f"{precision}_spot_epochs_per_second"] = info["spot_epochs_per_second"]
        torch.set_num_threads(threads)
        path = directory / f".cpu_precision-{precision}.pt"
        torch.save(state, path)
        model = load_state(td.cfg, path, "cpu")
        path.unlink()
        rows, cols = np.nonzero(mask)
        t0 = time.perf_counter()
        preds[precision] = predict_tissue([model] * config.n_states, td.cfg, td.maps, td.tokens, rows, cols, "cpu",
                                          progress=False)
        res[f"{precision}_superpixels_per_second"] = len(rows) / (time.perf_counter() - t0)
    rel = np.abs(preds["bf16"] - preds["fp32"]).max() / max(1e-12, float(np.abs(preds["fp32"]).max()))
    res["note"] = "bf16 and fp32 states are trained separately (same seed); their predictions differ by training"
    res["bf16_vs_fp32_prediction_max_relative_difference"] = float(rel)
    res["superpixels"] = int(len(rows))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directory", type=Path, required=True)
    p.add_argument("--tiles", type=int, default=8, help="ViT-L tiles per precision")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per precision")
    p.add_argument("--threads", type=int, default=0, help="tile network and inference threads (0: available CPUs)")
    own, rest = p.parse_known_args()
    import torch

    from utils.core.device import available_cpus, resolve_precision
    threads = own.threads or available_cpus()
    out = {"cpu": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__,
           "auto_precision": resolve_precision("auto", "cpu"), "directory": str(own.directory)}
    out["tile_network"] = tile_network(own.tiles, threads)
    out["histex"] = histex_parts(own.directory, own.epochs, threads, rest)
    t, h = out["tile_network"], out["histex"]
    rows = [("ViT-L/16 tiles/s", "tiles_per_second", t), ("training spot-epochs/s (1 thread)", "spot_epochs_per_second", h),
            ("inference super-pixels/s", "superpixels_per_second", h)]
    print(f"CPU bf16 vs fp32 ({threads} threads; --precision auto here: {out['auto_precision']})")
    print("| part | fp32 | bf16 | bf16 / fp32 |\n|---|---|---|---|")
    for name, key, d in rows:
        a, b = d[f"fp32_{key}"], d[f"bf16_{key}"]
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {b / a:.2f} x |")
    print(f"ViT-L tokens, bf16 vs fp32 cosine: min {t['token_cosine_min']:.5f}, median {t['token_cosine_median']:.5f}")
    res = REPO / "bench" / "results" / "cpu_precision.json"
    res.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
