#!/usr/bin/env python
"""A short HISTEX training run alone and beside a CPU-busy neighbour (a numpy matmul loop on every
core, in another process), with --threads set by utils.core.device.available_cpus() (HISTEX's
default) and by torch's own default (torch.get_num_threads() in a fresh process), and with 1.

    python bench/busy_neighbour.py --directory DIR [--epochs 6 --n-states 2]

DIR: stages 1-4 done; runs go to DIR/results/busy-<threads>-<alone|busy> (--retrain). Prints one
table and writes bench/results/busy_neighbour.json. Wall times on a shared machine are noisy: the
ratios between rows of one run are what it measures."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from pipeline import timed  # noqa: E402

from utils.core.device import available_cpus  # noqa: E402

NEIGHBOUR = ("import numpy as np, os\n"
             "a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)\n"
             "while True:\n    a = (a @ a) / np.float32(1024)\n")


def torch_default_threads() -> int:
    """torch.get_num_threads() of a fresh process (no OMP_NUM_THREADS set by us)."""
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def neighbour(cores: int):
    """A process that keeps `cores` BLAS threads busy until it is terminated."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "OPENBLAS_NUM_THREADS": str(cores),
           "MKL_NUM_THREADS": str(cores)}
    return subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env)


def run_histex(directory: Path, threads: int, label: str, budget) -> dict:
    out = directory / "results" / f"busy-{threads}-{label}"
    log = REPO / "bench" / "results" / "logs" / f"busy_neighbour-{threads}-{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    dt, _ = timed([sys.executable, "HISTEX.py", "--directory", str(directory), "--out", str(out), "--retrain",
                   "--threads", str(threads), "-q", *budget], log)
    states = [json.loads(p.read_text()) for p in sorted((out / "states").glob("state-*.json"))]
    return {"seconds": round(dt, 1), "training_state_seconds": round(sum(s["seconds"] for s in states), 1),
            "epochs_run": [s["epochs_run"] for s in states]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directory", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--n-states", type=int, default=2)
    a = p.parse_args()
    budget = ["--epochs", str(a.epochs), "--n-states", str(a.n_states), "--patience", "0"]
    cpus, default = available_cpus(), torch_default_threads()
    choices = {"available_cpus": cpus, "torch default": default, "one": 1}
    rows = {}
    for label in ("alone", "busy"):
        busy = neighbour(os.cpu_count() or 1) if label == "busy" else None
        try:
            time.sleep(1.0 if busy else 0.0)
            for name, threads in choices.items():
                key = (threads, label)
                if key not in {(r["threads"], r["neighbour"]) for r in rows.values()}:
                    rows[f"{name} ({threads}) {label}"] = {"threads": threads, "neighbour": label,
                                                           **run_histex(a.directory.resolve(), threads, label, budget)}
                    print(f"{name} ({threads}) {label}: {rows[f'{name} ({threads}) {label}']}", flush=True)
        finally:
            if busy:
                busy.terminate()
                busy.wait()
    print("\n| --threads | neighbour | HISTEX.py s | training (sum over states) s |\n|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k.rsplit(' ', 1)[0]} | {r['neighbour']} | {r['seconds']} | {r['training_state_seconds']} |")
    out = REPO / "bench" / "results" / "busy_neighbour.json"
    out.write_text(json.dumps({"directory": str(a.directory), "available_cpus": cpus, "torch_default_threads": default,
                               "cpu_count": os.cpu_count(), "budget": budget, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
