#!/usr/bin/env python
"""Where training time goes: times a few epochs of one state on a prepared directory (stages 1-4
done) and prints torch.profiler's top operators and the spot-epochs per second.

    python bench/profile_training.py --directory bench/data/medium --epochs 3 [HISTEX options...]

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
from utils.superres.config import HistexConfig  # noqa: E402
from utils.superres.inputs import training_data  # noqa: E402
from utils.superres.train import train_state  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directory", type=Path, required=True)
    p.add_argument("--profile", action="store_true", help="also run torch.profiler over one epoch")
    p.add_argument("--name", default=None, help="result name (default: the model name)")
    own, rest = p.parse_known_args()
    a = vars(HISTEX.build_parser().parse_args(["--directory", str(own.directory)] + rest))
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    d = own.directory
    spots = anndata.read_h5ad(d / "spots.h5ad")
    hr = anndata.read_h5ad(d / "hr-spots.h5ad")
    from utils.core.layout import load_mask
    mask = load_mask(d)
    t0 = time.time()
    config = HistexConfig.from_options(a)
    td = training_data(d, config, spots, hr, mask.shape)
    cfg, data = td.cfg, td.data
    t_prep = time.time() - t0
    device = resolve_device(a["device"])
    T = (2 * cfg["half"] + 1) ** 2
    train_state({**cfg, "epochs": 1}, data, 0, device, progress=False)  # warm-up
    t0 = time.time()
    _, info = train_state(cfg, data, 0, device, progress=False)
    dt = time.time() - t0
    rate = info["train_spots"] * info["epochs_run"] / dt  # held-out spots (--val-fraction) are only evaluated
    res = {"directory": str(d), "model": config.run_name, "spots": int(spots.n_obs), "genes": cfg["n_genes"],
           "window_tokens": T, "footprint_tokens_mean": float(data["fp"].sum(1).mean()),
           "epochs": info["epochs_run"], "train_spots": info["train_spots"], "seconds": dt, "spot_epochs_per_second": rate,
           "prepare_seconds": t_prep, "threads": torch.get_num_threads(), "device": str(device),
           "minutes_per_100_epochs_5_states": info["train_spots"] * 100 * 5 / rate / 60}
    print(f"{res['model']}: {info['train_spots']} training spots x {T} window tokens ({res['footprint_tokens_mean']:.1f} in footprint), "
          f"{cfg['n_genes']} genes: {rate:.0f} spot-epochs/s on {torch.get_num_threads()} thread(s); "
          f"5 states x 100 epochs take {res['minutes_per_100_epochs_5_states']:.1f} min")
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
