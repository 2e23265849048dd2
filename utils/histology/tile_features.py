"""Tile backbones (ViT / CNN) streamed over the calibrated slide, one row of tiles at a time.

Geometry (all in super-pixels of 16 px; g = tokens per tile side = 14 for UNI, 16 for UNI2-h):
- micro: pass k reads tiles whose corners sit at (g j - sy_k, g i - sx_k) super-pixels, (sy_k, sx_k) =
  shift of the pass (always whole super-pixels, so every token stays exactly one super-pixel). Each
  super-pixel takes a weighted mean of its tokens over the passes, the weight a tent that is highest
  at the tile centre and small (never zero) at its border: where one pass has a tile border another
  has a tile interior, so tokens that saw a cut-off context count little and borders do not show as
  a grid. (With one pass the weights cancel: plain tokens.)
- meso: the summary (CLS / pooled) feature of each tile of each pass is a sample at the tile
  centre; it is interpolated bilinearly to every super-pixel centre (no blocks, no hard edges)
  and averaged over the passes.
- macro: one lattice of windows 4 tiles wide centred on each g x g block (896 px = 448 um for UNI),
  shrunk to the network input, summary feature interpolated bilinearly the same way.
Reading runs one tile row ahead in a thread; tile rows no longer needed are dropped, so memory
stays at a few tile rows whatever the slide size.
"""
import logging
import math
import queue
import threading
import time

import numpy as np

from ..core import geometry as geo

log = logging.getLogger("trihrge")

SP = geo.SUPER_PIXEL_PX
MACRO_FACTOR = 4          # macro context = 4 x 4 tiles


def shift_offsets(n, grid):
    """(dy, dx) offsets in super-pixels of n passes. A square number k*k of passes uses the k x k grid
    of offsets (i grid/k, j grid/k), which covers both axes evenly (4 passes = the classic half-tile
    shifts); any other n shifts diagonally by k grid/n."""
    n = max(1, int(n))
    k = int(round(math.sqrt(n)))
    if k * k == n and k > 1:
        steps = [int(math.floor(i * grid / k + 0.5)) % grid for i in range(k)]
        out = [(a, b) for a in steps for b in steps]
    else:
        out = [(int(math.floor(i * grid / n + 0.5)) % grid,) * 2 for i in range(n)]
    return list(dict.fromkeys(out))


def tent_weights(grid):
    """Blending weight of token position p in a tile of grid tokens: 1 at the centre, 0.5/(grid/2) at
    the border (never zero, so a super-pixel covered only by border tokens still gets their mean)."""
    p = np.arange(grid) + 0.5
    return (1.0 - np.abs(p - grid / 2.0) / (grid / 2.0)).astype(np.float32)


def read_window(img, y0, x0, h, w):
    """img[y0:y0+h, x0:x0+w] with white outside the image (uint8 RGB)."""
    out = np.full((h, w, 3), 255, np.uint8)
    H, W = img.shape[:2]
    ya, yb, xa, xb = max(0, y0), min(H, y0 + h), max(0, x0), min(W, x0 + w)
    if ya < yb and xa < xb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = img[ya:yb, xa:xb]
    return out


def lattice_weights(n, n_lattice, spacing, first_centre):
    """Bilinear weights from a 1-D lattice (centres first_centre + spacing * j, j < n_lattice) to the
    super-pixel centres i + 0.5, i < n; constant beyond the outermost centres. -> (j0, j1, w1)."""
    t = (np.arange(n) + 0.5 - first_centre) / spacing
    j0 = np.floor(t).astype(np.int64)
    w1 = t - j0
    below, above = j0 < 0, j0 >= n_lattice - 1
    j0 = np.clip(j0, 0, n_lattice - 1)
    j1 = np.minimum(j0 + 1, n_lattice - 1)
    w1 = np.where(below | above, 0.0, w1)
    return j0, j1, w1.astype(np.float32)


class Lattice:
    """One set of tiles: a shifted micro/meso pass, or the macro windows."""

    def __init__(self, name, shift, grid, grid_shape, tile_px, input_px, context):
        R, C = grid_shape
        self.name, self.g = name, grid
        self.sy, self.sx = shift
        self.tile_px, self.input_px, self.context = tile_px, input_px, context
        self.nrows = -(-(R + self.sy) // grid)
        self.ncols = -(-(C + self.sx) // grid)
        self.rw = lattice_weights(R, self.nrows, grid, grid / 2.0 - self.sy)
        self.cw = lattice_weights(C, self.ncols, grid, grid / 2.0 - self.sx)
        self.tokens = context == 1          # micro tokens come from the passes only
        tent = tent_weights(grid)
        self.col_weight = tent[(np.arange(C) + self.sx) % grid]
        self.tent = tent
        self.rows = {}                      # j -> (tokens or None, column-interpolated summary)

    def needed(self, r0, r1):
        """Tile rows needed for super-pixel rows [r0, r1)."""
        j0, j1, _ = self.rw
        lo, hi = int(j0[r0:r1].min()), int(j1[r0:r1].max())
        if self.tokens:
            lo = min(lo, (r0 + self.sy) // self.g)
            hi = max(hi, (r1 - 1 + self.sy) // self.g)
        return lo, hi

    def load(self, img, j):
        """uint8 (ncols, input_px, input_px, 3) tiles of tile row j."""
        import cv2
        g, tp, ip = self.g, self.tile_px, self.input_px
        if self.context == 1:
            band = read_window(img, (g * j - self.sy) * SP, -self.sx * SP, tp, self.ncols * tp)
            if tp != ip:  # tile boundaries stay aligned: each tile shrinks on its own footprint
                band = cv2.resize(band, (self.ncols * ip, ip), interpolation=cv2.INTER_AREA)
            return np.ascontiguousarray(band.reshape(ip, self.ncols, ip, 3).transpose(1, 0, 2, 3))
        m = self.context
        half = (m - 1) * tp // 2                  # context added on each side of the g x g block
        band = read_window(img, g * j * SP - half, -half, m * tp, (self.ncols + m - 1) * tp)
        step = ip // m
        if ip % m == 0:
            small = cv2.resize(band, ((self.ncols + m - 1) * step, ip), interpolation=cv2.INTER_AREA)
            return np.stack([small[:, i * step:i * step + ip] for i in range(self.ncols)])
        return np.stack([cv2.resize(band[:, i * tp:i * tp + m * tp], (ip, ip), interpolation=cv2.INTER_AREA)
                         for i in range(self.ncols)])

    def store(self, j, tokens, summary):
        c0, c1, w = self.cw
        ci = summary[c0] * (1.0 - w)[:, None] + summary[c1] * w[:, None]
        if self.tokens:  # (ncols, g, g, D) -> (g, ncols * g, D)
            n, g, _, d = tokens.shape
            tokens = tokens.transpose(1, 0, 2, 3).reshape(g, n * g, d)
        self.rows[j] = (tokens if self.tokens else None, ci.astype(np.float32))

    def drop_below(self, j):
        for k in [k for k in self.rows if k < j]:
            del self.rows[k]

    def add_summary(self, acc, r0, r1):
        j0, j1, w = (a[r0:r1] for a in self.rw)
        for i in range(r1 - r0):
            a, b = self.rows[int(j0[i])][1], self.rows[int(j1[i])][1]
            acc[i] += a * (1.0 - w[i]) + b * w[i]

    def add_tokens(self, acc, wsum, r0, r1, C):
        """acc += weight * token, wsum += weight for super-pixel rows [r0, r1) (tent blending)."""
        g, sy, sx = self.g, self.sy, self.sx
        for j in range((r0 + sy) // g, (r1 - 1 + sy) // g + 1):
            top = g * j - sy                       # super-pixel row of the tile row's first token row
            a, b = max(r0, top), min(r1, top + g)
            w = self.tent[a - top:b - top, None] * self.col_weight[None, :]
            acc[a - r0:b - r0] += self.rows[j][0][a - top:b - top, sx:sx + C] * w[..., None]
            wsum[a - r0:b - r0] += w


def _prefetch(items, load, depth=2):
    """Yield (item, load(item)) for items in order, computed `depth` ahead in a background thread
    (depth 0: in the caller's thread; on a CPU-only machine the reader would only compete with the
    network for the same cores)."""
    if depth <= 0:
        for it in items:
            yield it, load(it)
        return
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker():
        try:
            for it in items:
                if stop.is_set():
                    return
                q.put((it, load(it), None))
        except BaseException as e:  # hand errors to the consumer
            q.put((None, None, e))

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        for _ in range(len(items)):
            it, val, err = q.get()
            if err is not None:
                raise err
            yield it, val
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def extract_tiles(img, grid_shape, tm, out_micro, out_meso, out_macro, shifts=1, batch_size=16, progress=None,
                  release=None, share=range):
    """Fill the three (R, C, D) float16 outputs from tile model tm; returns run statistics.
    share(n): the bands of tile rows (of n) this process fills, e.g. a torchrun rank's block; a
    band's values do not depend on which process computes it (the same tiles in the same batches)."""
    R, C = grid_shape
    g = tm.grid
    offsets = shift_offsets(shifts, g)
    passes = [Lattice(f"pass{k}", s, g, grid_shape, tm.tile_px, tm.input_px, 1) for k, s in enumerate(offsets)]
    macro = Lattice("macro", (0, 0), g, grid_shape, tm.tile_px, tm.input_px, MACRO_FACTOR)
    lattices = passes + [macro]
    bands = [(r0, min(R, r0 + g)) for r0 in range(0, R, g)]
    bands = [bands[i] for i in share(len(bands))]
    schedule = _schedule(bands, lattices)
    n_tiles = sum(L.ncols for L, _ in schedule)
    log.info("%d tiles of %d px (%d x %d super-pixels each): %d pass(es) with shifts %s super-pixels + "
             "macro windows of %d px, batch %d", n_tiles, tm.tile_px, g, g, len(passes),
             offsets, MACRO_FACTOR * tm.tile_px, batch_size)
    if progress is not None:
        progress.total = n_tiles
        progress.refresh()
    t0 = time.perf_counter()
    model_time = 0.0
    stream = _prefetch(schedule, lambda it: it[0].load(img, it[1]), depth=2 if tm.device.type == "cuda" else 0)
    k = 0
    for bi, (r0, r1) in enumerate(bands):
        for L in lattices:
            lo, hi = L.needed(r0, r1)
            while any(j not in L.rows for j in range(lo, hi + 1)):
                (L2, j), tiles = next(stream)
                assert L2 is schedule[k][0] and j == schedule[k][1]
                k += 1
                model_time += _tile_row(tm, L2, j, tiles, batch_size, progress)
        _write_band(tm, passes, macro, (r0, r1), C, (out_micro, out_meso, out_macro))
        if release is not None:
            for a in (out_micro, out_meso, out_macro):
                release(a, 0, r1)
            release(img, 0, max(0, r0 - 3 * g) * SP)
        if bi + 1 < len(bands):
            for L in lattices:
                L.drop_below(L.needed(*bands[bi + 1])[0])
    wall = time.perf_counter() - t0
    return {"n_tiles": n_tiles, "shift_offsets_superpixels": offsets, "loop_seconds": wall,
            "model_seconds": model_time}


def _schedule(bands, lattices) -> list:
    """[(lattice, tile row)] in the order the bands first need them (each row once): what the
    prefetcher reads, and after which band a row can go."""
    schedule, nxt = [], {id(L): 0 for L in lattices}
    for r0, r1 in bands:
        for L in lattices:
            lo, hi = L.needed(r0, r1)
            schedule += [(L, j) for j in range(max(lo, nxt[id(L)]), hi + 1)]
            nxt[id(L)] = max(nxt[id(L)], hi + 1)
    return schedule


def _tile_row(tm, lattice, j, tiles, batch_size, progress) -> float:
    """Run tm over one row of tiles in batches and store its tokens and summaries; the model's seconds."""
    t0 = time.perf_counter()
    toks, sums = [], []
    for b in range(0, len(tiles), batch_size):
        t_, s_ = tm(tiles[b:b + batch_size])
        toks.append(t_ if lattice.tokens else None)
        sums.append(s_)
        if progress is not None:
            progress.update(len(t_))
    seconds = time.perf_counter() - t0
    lattice.store(j, np.concatenate(toks) if lattice.tokens else None, np.concatenate(sums))
    return seconds


def _write_band(tm, passes, macro, rows, C, outputs):
    """Super-pixel rows [r0, r1) of the three outputs: the passes' tokens averaged where they
    overlap (micro) and their tile summaries averaged (meso); the macro windows' summaries."""
    (r0, r1), (out_micro, out_meso, out_macro) = rows, outputs
    n = r1 - r0
    micro = np.zeros((n, C, tm.dim), np.float32)
    wsum = np.zeros((n, C), np.float32)
    meso = np.zeros((n, C, tm.summary_dim), np.float32)
    for L in passes:
        L.add_tokens(micro, wsum, r0, r1, C)
        L.add_summary(meso, r0, r1)
    micro /= wsum[..., None]
    macro_acc = np.zeros((n, C, tm.summary_dim), np.float32)
    macro.add_summary(macro_acc, r0, r1)
    out_micro[r0:r1] = _f16(micro)
    out_meso[r0:r1] = _f16(meso / len(passes))
    out_macro[r0:r1] = _f16(macro_acc)


def _f16(a):
    if not np.isfinite(a).all():
        raise FloatingPointError("the backbone produced NaN/inf features; try --precision fp32")
    return np.clip(a, -65504, 65504).astype(np.float16)
