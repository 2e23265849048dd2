#!/usr/bin/env python
"""Where training time goes: times a few epochs of one state on a prepared directory (stages 1-4
done) and prints torch.profiler's top operators and the spot-epochs per second.

    python bench/profile_training.py --directory bench/data/medium --epochs 3 [HISTEX options...]
    python bench/profile_training.py --directory DIR --epochs 8 --threads 1 --unfused   # before/after

--unfused also times the unfused output layer (the (B, M, G) predictions, then their footprint
mean: the path before models/layers.footprint_output), in the same process, and prints the ratio.

Any HISTEX.py option (--model, --d-model, --no-gene-tokens, ...) can follow; the run writes nothing
into the directory. Results go to bench/results/profile_training-<name>.json."""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import anndata  # noqa: E402
import torch  # noqa: E402

import HISTEX  # noqa: E402
from utils.core.device import resolve_device  # noqa: E402
from utils.core.malloc import keep_freed_memory  # noqa: E402
from utils.superres import train  # noqa: E402
from utils.superres.config import HistexConfig  # noqa: E402
from utils.superres.inputs import training_data  # noqa: E402
from utils.superres.train import train_state  # noqa: E402


def load_training(directory: Path, histex_args) -> tuple:
    """(HistexConfig, TrainingData, tissue mask) of DIR (stages 1-4 done), built from HISTEX.py
    options exactly as HISTEX.py builds them; nothing is written."""
    from utils.core.layout import load_mask
    options = vars(HISTEX.build_parser().parse_args(["--directory", str(directory), *histex_args]))
    config = HistexConfig.from_options(options)
    spots = anndata.read_h5ad(directory / "spots.h5ad")
    hr = anndata.read_h5ad(directory / "hr-spots.h5ad")
    mask = load_mask(directory)
    return config, training_data(directory, config, spots, hr, mask.shape), mask


def time_training(cfg: dict, data: dict, device) -> tuple:
    """One warm-up epoch, then one state trained as cfg says: (train_state's info plus seconds and
    spot_epochs_per_second, the trained state dict)."""
    train_state({**cfg, "epochs": 1}, data, 0, device, progress=False)
    t0 = time.time()
    state, info = train_state(cfg, data, 0, device, progress=False)  # .item() per batch: synchronous
    dt = time.time() - t0
    # held-out spots (--val-fraction) are only evaluated, so they do not count as trained
    return {**info, "seconds": dt, "spot_epochs_per_second": info["train_spots"] * info["epochs_run"] / dt}, state


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directory", type=Path, required=True)
    p.add_argument("--profile", action="store_true", help="also run torch.profiler over one epoch")
    p.add_argument("--name", default=None, help="result name (default: the model name)")
    p.add_argument("--unfused", action="store_true", help="also time the unfused output layer (before/after)")
    own, rest = p.parse_known_args()
    keep_freed_memory()  # as HISTEX.py and its training workers: steps without page faults (core.malloc)
    t0 = time.time()
    config, td, _ = load_training(own.directory, rest)
    if config.threads:
        torch.set_num_threads(config.threads)
    cfg, data = td.cfg, td.data
    t_prep = time.time() - t0
    device = resolve_device(config.device)
    T = (2 * cfg["half"] + 1) ** 2
    if own.unfused:
        fused = train.spot_means
        train.spot_means = train.predicted_means
        before, _ = time_training(cfg, data, device)
        train.spot_means = fused
    info, _ = time_training(cfg, data, device)
    dt, rate = info["seconds"], info["spot_epochs_per_second"]
    res = {"directory": str(own.directory), "model": config.run_name, "spots": int(len(data["target"])),
           "genes": cfg["n_genes"], "window_tokens": T, "footprint_tokens_mean": float(data["fp"].sum(1).mean()),
           "epochs": info["epochs_run"], "train_spots": info["train_spots"], "seconds": dt, "spot_epochs_per_second": rate,
           "prepare_seconds": t_prep, "threads": torch.get_num_threads(), "device": str(device),
           "minutes_per_100_epochs_5_states": info["train_spots"] * 100 * 5 / rate / 60}
    print(f"{res['model']}: {info['train_spots']} training spots x {T} window tokens ({res['footprint_tokens_mean']:.1f} in footprint), "
          f"{cfg['n_genes']} genes: {rate:.0f} spot-epochs/s on {torch.get_num_threads()} thread(s); "
          f"5 states x 100 epochs take {res['minutes_per_100_epochs_5_states']:.1f} min")
    if own.unfused:
        res["unfused_spot_epochs_per_second"] = before["spot_epochs_per_second"]
        print(f"unfused output layer: {before['spot_epochs_per_second']:.0f} spot-epochs/s; fused "
              f"{rate / before['spot_epochs_per_second']:.2f} x as fast")
    if own.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_state({**cfg, "epochs": 1}, data, 0, device, progress=False)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(table)
        res["profile_top"] = table
    out = REPO / "bench" / "results" / f"profile_training-{own.name or res['model']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
