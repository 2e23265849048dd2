#!/usr/bin/env python
"""The CPU path before and after: HISTEX.py of an earlier commit and of this tree on the same data
directory, one after the other in the same session, with wall time per phase (from the log lines'
timestamps, 1 s resolution), peak memory (RSS of the process tree) and, on a protocol folder
(utils.protocols make ...), the median held-out Pearson r.

    python bench/cpu_path.py --directory DIR --before c50e705 --seeds 0 2 [HISTEX options...]

DIR: stages 1-4 done; runs go to DIR/results/cpu-<before|after>-s<seed> (--retrain: nothing reused).
The earlier commit is exported with `git archive` into a temporary folder (no worktree is made).
Prints one table and writes bench/results/cpu_path.json or --out (runs of other seeds on the same data kept)."""
import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from pipeline import timed  # noqa: E402

# (phase, the log line that ends it); the last line matching each marker counts
PHASES = (("read + training", r"INFO state \d+/\d+: "), ("out-of-fold + inference", r"INFO predicted \d+ super-pixels"),
          ("consistency + fusion + CV", r"INFO spot consistency: "), ("outputs (h5ad, maps, report)", r"INFO wrote "))


def export(rev: str, into: Path) -> Path:
    """The files of commit `rev` in `into` (git archive; no worktree, no change to the repository)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(into)], input=archive, check=True)
    return into


def phase_seconds(log: Path, t_start: float, t_end: float) -> dict:
    """Seconds per PHASES entry from the log's HH:MM:SS stamps, plus the rest up to the exit."""
    day = datetime.fromtimestamp(t_start).date()
    ends = {}
    for line in log.read_text(errors="replace").replace("\r", "\n").splitlines():
        stamp = re.search(r"(\d\d:\d\d:\d\d) INFO", line)   # after a progress bar's text
        for name, marker in PHASES:
            if stamp and re.search(marker, line):
                ends[name] = datetime.combine(day, datetime.strptime(stamp[1], "%H:%M:%S").time()).timestamp()
    out, last = {}, t_start
    for name, _ in PHASES:
        if name in ends:
            out[name] = round(max(0.0, ends[name] - last), 1)
            last = ends[name]
    out["exit"] = round(max(0.0, t_end - last), 1)
    return out


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (with the workers they waited for):
    less sensitive than wall time to other jobs on the cores."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(code: Path, directory: Path, name: str, seed: int, extra) -> dict:
    out = directory / "results" / name
    log = REPO / "bench" / "results" / "logs" / f"cpu_path-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.time(), _children_cpu()
    dt, peak = timed([sys.executable, str(code / "HISTEX.py"), "--directory", str(directory), "--out", str(out),
                      "--retrain", "--seed", str(seed), *extra], log)
    states = [json.loads(p.read_text()) for p in sorted((out / "states").glob("state-*.json"))]
    res = {"start": t0, "seconds": round(dt, 1), "cpu_seconds": round(_children_cpu() - cpu0, 1), "peak_rss_mb": round(peak / 2**20), "phases": phase_seconds(log, t0, t0 + dt),
           "epochs_run": [s["epochs_run"] for s in states], "state_seconds": [round(s["seconds"], 1) for s in states]}
    if (directory / "protocol.json").is_file():
        from utils.evaluation.heldout import score
        res["heldout_median_r"] = round(score([out])[1][name]["median"], 4)
    print(f"{name}: {res}", flush=True)
    return res


def table(runs: dict) -> str:
    names = list(next(iter(runs.values()))["phases"])
    lines = ["| run | " + " | ".join(names) + " | total s | CPU s | peak RSS MB | epochs | held-out r |",
             "|---" * (len(names) + 6) + "|"]
    for k, v in runs.items():
        lines.append(f"| {k} | " + " | ".join(str(v["phases"].get(n, "-")) for n in names)
                     + f" | {v['seconds']} | {v['cpu_seconds']} | {v['peak_rss_mb']} | {sum(v['epochs_run'])} | {v.get('heldout_median_r', '-')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directory", type=Path, required=True)
    p.add_argument("--before", default="HEAD", help="the earlier commit (default HEAD: uncommitted changes vs HEAD)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu_path.json",
                   help="the JSON result (the large demo's: bench/results/cpu_path-large.json)")
    own, extra = p.parse_known_args()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="cpu-path-") as tmp:
        before = export(own.before, Path(tmp) / "before")
        for seed in own.seeds:
            for which, code in (("before", before), ("after", REPO)):
                runs[f"{which}-s{seed}"] = run_one(code, own.directory.resolve(), f"cpu-{which}-s{seed}", seed, extra)
    for seed in own.seeds:
        b, a = runs[f"before-s{seed}"], runs[f"after-s{seed}"]
        print(f"seed {seed}: {b['seconds']} s -> {a['seconds']} s ({b['seconds'] / a['seconds']:.2f} x), CPU "
              f"{b['cpu_seconds']} -> {a['cpu_seconds']} s ({b['cpu_seconds'] / a['cpu_seconds']:.2f} x); "
              + ", ".join(f"{n} {b['phases'].get(n, 0)} -> {a['phases'].get(n, 0)}" for n in a["phases"]))
    print(table(runs))
    res = own.out
    earlier = json.loads(res.read_text()) if res.is_file() else {}
    if earlier.get("directory") != str(own.directory) or earlier.get("before") != own.before:
        earlier = {}                          # the runs of other seeds are kept, of other data not
    res.write_text(json.dumps({"directory": str(own.directory), "before": own.before, "histex_args": extra,
                               "runs": {**earlier.get("runs", {}), **runs}}, indent=1))


if __name__ == "__main__":
    main()
