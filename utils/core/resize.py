"""Scaling an H&E image by a factor, row band by row band, with OpenCV's geometry and filters.

`scaled_bands` gives the rows of `cv2.resize(img, None, fx=scale, fy=scale)` (INTER_AREA to shrink,
INTER_CUBIC to enlarge; pixel i covers [i, i + 1), so x_out = scale * x_in) from consecutive row
bands of the input, holding only a few bands at once: a 20 mm section scanned at
0.25 um/px (80,000 px, 19 GB as RGB) goes to 0.5 um/px without ever being in memory whole.

- A whole factor (scale = 1/k): each band of k-row blocks is cv2.resize'd as it is, which gives
  the whole image's pixels exactly (OpenCV averages each k x k block on its own); the last rows, a
  partial block, are averaged over the rows there are, as OpenCV does.
- Any other factor below 1: OpenCV's area weights (computeResizeAreaTab) applied by rows here, after
  cv2.resize along the rows (fy = 1) in float32, in OpenCV's order of float operations, then
  rounded as OpenCV rounds: the whole-image call's pixels exactly (tests/test_resize.py). This
  resize costs about 1.5 x cv2's on the whole image, but stage 1 as a whole (reading, which the
  bands overlap, and writing) takes 0.9-1.2 x its whole-image time at an eighth of the memory
  (bench/stage1_memory.py, 32,000 px).
- Enlarging (a raw image coarser than the target): OpenCV's bicubic filter band by band
  (utils/core/cubic.py), its pixels to within 1 in about 1 value in 10,000.
- A factor below 1 within half a pixel of 1 on the width is one cv2.resize of the whole image."""
from typing import Iterable, Iterator

import numpy as np

EPS = np.finfo(np.float64).eps   # OpenCV's test for a whole factor (DBL_EPSILON)


def scaled_shape(shape: tuple, scale: float) -> tuple:
    """(rows, cols) of cv2.resize(fx=fy=scale): each side times scale, rounded half to even."""
    return tuple(int(np.rint(n * scale)) for n in shape[:2])


def scaled_bands(bands: Iterable[np.ndarray], shape: tuple, scale: float) -> Iterator[np.ndarray]:
    """Consecutive uint8 (rows, cols, 3) bands of the image scaled by `scale`, from consecutive
    uint8 (rows, W, 3) bands of an image of `shape` (H, W)."""
    import cv2
    out = scaled_shape(shape, scale)
    if out == tuple(shape[:2]):           # OpenCV copies an image whose size does not change
        yield from bands
    elif scale > 1.0:
        from .cubic import cubic_bands  # numba's import only where an image is enlarged
        yield from cubic_bands(bands, shape, out, scale)
    elif out[1] == shape[1]:              # rows whose width cv2 would keep as they are
        yield cv2.resize(np.concatenate(list(bands)), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    elif abs(1.0 / scale - round(1.0 / scale)) < EPS:
        yield from _block_means(bands, shape, scale, round(1.0 / scale))
    else:
        yield from _area_bands(bands, shape, scale)


def _block_means(bands, shape, scale, k):
    """Whole factor 1/k: cv2.resize on bands of whole k-row blocks; the last, partial block by hand."""
    import cv2
    held = np.empty((0, shape[1], 3), np.uint8)
    for band in bands:
        held = np.concatenate([held, band]) if len(held) else band
        whole = len(held) - len(held) % k
        if whole:
            yield cv2.resize(held[:whole], None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            held = held[whole:]
    if len(held) and scaled_shape(shape, scale)[0] * k > shape[0] - len(held):
        yield _partial_block(held, scaled_shape(shape, scale)[1], k)


def _partial_block(rows, out_cols, k):
    """One output row from the image's last r < k rows: each k-column block (the last one partial)
    averaged over the pixels there are, as OpenCV's area filter does at the image's edge."""
    cumulative = np.concatenate([np.zeros((1, 3), np.int64), rows.astype(np.int64).sum(axis=0).cumsum(axis=0)])
    starts = np.arange(out_cols) * k
    ends = np.minimum(starts + k, rows.shape[1])
    total = cumulative[ends] - cumulative[starts]
    count = (ends - starts) * len(rows)
    mean = total.astype(np.float32) / count[:, None].astype(np.float32)
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)[None]


def area_weights(n_in: int, n_out: int, scale: float) -> list[tuple[int, int, np.float32]]:
    """OpenCV's area table for one axis: (output index, input index, weight) in its order. Output i
    covers input [i / scale, (i + 1) / scale), clipped at the image's end; weights sum to 1."""
    step, table = 1.0 / scale, []
    for i in range(n_out):
        f1 = i * step
        f2 = f1 + step
        cell = min(step, n_in - f1)
        s1, s2 = int(np.ceil(f1)), min(int(np.floor(f2)), n_in - 1)
        s1 = min(s1, s2)
        if s1 - f1 > 1e-3:
            table.append((i, s1 - 1, np.float32((s1 - f1) / cell)))
        table += [(i, s, np.float32(1.0 / cell)) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            table.append((i, s2, np.float32(min(min(f2 - s2, 1.0), cell) / cell)))
    return table


def _area_bands(bands, shape, scale):
    """Any factor below 1: rows shrunk by cv2 (fy = 1, in float32), then OpenCV's row weights
    applied here tap by tap in its order; an output row is written once its last input row arrived."""
    import cv2
    n_out = scaled_shape(shape, scale)[0]
    taps = area_weights(shape[0], n_out, scale)
    last_input = np.zeros(n_out, np.int64)
    for i, s, _ in taps:
        last_input[i] = s                     # the table runs through each output's inputs in order
    wide = held = None
    first, done, t = 0, 0, 0                  # held: the shrunk input rows [first, first + len(held))
    for band in bands:
        if wide is None or wide.shape != band.shape:
            wide = np.empty(band.shape, np.float32)   # reused: a fresh 64 MB buffer a band cost its page faults
        np.copyto(wide, band, casting="unsafe")
        narrow = cv2.resize(wide, None, fx=scale, fy=1.0, interpolation=cv2.INTER_AREA)
        held = narrow if held is None else np.concatenate([held, narrow])
        ready = int(np.searchsorted(last_input, first + len(held), side="left"))   # all inputs arrived
        if ready > done:
            out, term = np.zeros((ready - done, *held.shape[1:]), np.float32), np.empty(held.shape[1:], np.float32)
            while t < len(taps) and taps[t][0] < ready:
                i, s, w = taps[t]
                out[i - done] += np.multiply(held[s - first], w, out=term)   # in place: 5 x faster than fancy indexing
                t += 1
            yield np.clip(np.rint(out), 0, 255).astype(np.uint8)
            done = ready
            keep = taps[t][1] if t < len(taps) else first + len(held)   # the next output row's first input row
            held, first = held[keep - first:], keep
