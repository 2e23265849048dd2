"""Stage 1's memory on a large scan: image_calibration.py on a synthetic H&E TIFF of --side px at
--pixel-size um/px (a 40x scan is 0.25), for each --layouts, with this checkout's code and,
with --before REV, with the code of commit REV (a git worktree) on the same files, back to back.

    python bench/stage1_memory.py --side 32000 --before 7ae4632

Prints, per run, the seconds and the peak memory of the stage's process, sampled every 50 ms from
/proc: VmRSS (what `top` shows: it includes the pages of he.tif being written, a memory map the
kernel can write back and drop) and RssAnon (memory that is the process's own: image copies,
arrays). Writes bench/results/stage1_memory.json. Linux only."""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "bench" / "data" / "stage1"
LAYOUTS = ("tiled-jpeg", "contiguous", "jpeg")


def _tiles(side, tile, seed=0):
    """Tissue-like tiles (smooth colour with pixel noise), row by row, never the whole image."""
    rng = np.random.default_rng(seed)
    base = np.array([225, 190, 215], np.int16)
    for r in range(0, side, tile):
        for c in range(0, side, tile):
            shade = rng.integers(-60, 20, 3, dtype=np.int16)
            noise = rng.integers(-12, 13, (tile, tile, 3), dtype=np.int16)
            yield np.clip(base + shade + noise, 0, 255).astype(np.uint8)


def make_section(side, pixel_size, layout) -> Path:
    """DIR in the raw layout with he-raw.tif (he-raw.jpg for a plain JPEG) of this layout and a few spots
    (made once)."""
    import tifffile
    d = DATA / f"{layout}-{side}-{pixel_size}"
    image = d / ("he-raw.jpg" if layout == "jpeg" else "he-raw.tif")
    if image.is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (image.name + ".part")
    if layout == "jpeg":   # a plain JPEG (made whole here: JPEG encoders take the whole image)
        import cv2
        whole = np.empty((side, side, 3), np.uint8)
        tiles = _tiles(side, 256)
        for r in range(0, side, 256):
            for c in range(0, side, 256):
                whole[r:r + 256, c:c + 256] = next(tiles)[:min(256, side - r), :min(256, side - c)]
        ok, buf = cv2.imencode(".jpg", whole, [cv2.IMWRITE_JPEG_QUALITY, 90])
        del whole
        tmp.write_bytes(buf.tobytes())
    elif layout == "tiled-jpeg":
        tifffile.imwrite(tmp, _tiles(side, 256), shape=(side, side, 3), dtype=np.uint8, tile=(256, 256),
                         photometric="rgb", compression="jpeg")
    else:
        mm = tifffile.memmap(tmp, shape=(side, side, 3), dtype=np.uint8, photometric="rgb")
        tiles = _tiles(side, 256)
        for r in range(0, side, 256):
            for c in range(0, side, 256):
                t = next(tiles)
                mm[r:r + 256, c:c + 256] = t[:min(256, side - r), :min(256, side - c)]
        mm.flush()
        del mm
    tmp.rename(image)
    xy = np.linspace(side * 0.1, side * 0.9, 5)
    (d / "locs-raw.tsv").write_text("spot\tx\ty\n" + "".join(f"s{i}\t{x:.1f}\t{x:.1f}\n" for i, x in enumerate(xy)))
    (d / "pixel-size-raw.txt").write_text(f"{pixel_size}\n")
    (d / "radius-raw.txt").write_text(f"{27.5 / pixel_size}\n")
    return d


def _status_kb(pid, key):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_stage(code: Path, directory: Path) -> dict:
    """image_calibration.py of `code` on DIR (--force: the same work every time)."""
    cmd = [sys.executable, str(code / "image_calibration.py"), "--directory", str(directory), "--force", "-q"]
    t0, peak_rss, peak_anon = time.monotonic(), 0, 0
    proc = subprocess.Popen(cmd, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        peak_rss = max(peak_rss, _status_kb(proc.pid, "VmRSS"))
        peak_anon = max(peak_anon, _status_kb(proc.pid, "RssAnon"))
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode:
        sys.exit(f"{code.name}: image_calibration.py failed on {directory}:\n{err[-2000:]}")
    return {"seconds": round(time.monotonic() - t0, 1), "peak_rss_mb": peak_rss // 1024, "peak_anon_mb": peak_anon // 1024}


def worktree(rev: str) -> Path:
    path = Path("/tmp") / f"trihrge-{rev}"
    if not path.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=32000, help="raw image side in px")
    p.add_argument("--pixel-size", type=float, default=0.25, help="raw um/px (0.25: 40x; 0.2738: a non-whole factor)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--before", metavar="REV", help="also run the code of this commit (a git worktree in /tmp)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stage1_memory.json")
    a = p.parse_args()
    codes = {"now": REPO, **({f"before ({a.before})": worktree(a.before)} if a.before else {})}
    results = []
    for layout in a.layouts:
        d = make_section(a.side, a.pixel_size, layout)
        for name, code in codes.items():
            r = {"layout": layout, "side": a.side, "pixel_size": a.pixel_size, "code": name, **run_stage(code, d)}
            results.append(r)
            print(f"{layout:11s} {a.side} px at {a.pixel_size} um/px  {name:22s} {r['seconds']:7.1f} s  "
                  f"VmRSS {r['peak_rss_mb']:6d} MB  RssAnon {r['peak_anon_mb']:6d} MB", flush=True)
    old = json.loads(a.out.read_text()) if a.out.is_file() else []
    keep = [r for r in old if (r["side"], r["pixel_size"], r["layout"]) not in
            {(a.side, a.pixel_size, layout) for layout in a.layouts}]
    a.out.write_text(json.dumps(keep + results, indent=1) + "\n")


if __name__ == "__main__":
    main()
