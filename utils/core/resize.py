"""Scaling an H&E image by a factor, row band by row band, with OpenCV's geometry and filters.

`scaled_bands` gives the rows of `cv2.resize(img, None, fx=scale, fy=scale)` (INTER_AREA to shrink,
INTER_CUBIC to enlarge; pixel i covers [i, i + 1), so x_out = scale * x_in) from consecutive row
bands of the input, holding only a few bands at once when shrinking: a 20 mm section scanned at
0.25 um/px (80,000 px, 19 GB as RGB) goes to 0.5 um/px without ever being in memory whole.

- A whole factor (scale = 1/k): each band of k-row blocks is cv2.resize'd as it is, which gives
  the whole image's pixels exactly (OpenCV averages each k x k block on its own); the last rows, a
  partial block, are averaged over the rows there are, as OpenCV does.
- Any other factor: OpenCV's area weights (computeResizeAreaTab) applied by rows here, after
  cv2.resize along the rows (fy = 1) in float32, then rounded as OpenCV rounds: the same pixels as
  the whole-image call up to the order of float sums (measured: at most 1 grey level, on a few
  pixels in ten thousand; tests/test_resize.py).
- Enlarging (a raw image coarser than the target, at most a quarter of the output's pixels) is
  one cv2.resize of the whole image, and so is a factor within half a pixel of 1 on the width."""
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
    elif scale > 1.0 or out[1] == shape[1]:   # enlarging; or rows whose width cv2 would keep as they are
        whole = np.concatenate(list(bands))
        yield cv2.resize(whole, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
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


def _tap_arrays(taps, n_out):
    """(input index, weight) arrays (n_out, most taps of a row) from an area table, padded with
    weight 0 on the row's last input (adding 0 leaves a float sum as it is)."""
    width = max(np.bincount([i for i, _, _ in taps], minlength=n_out))
    index, weight = np.zeros((n_out, width), np.int64), np.zeros((n_out, width), np.float32)
    slot = np.zeros(n_out, np.int64)
    for i, s, w in taps:
        index[i, slot[i]:], weight[i, slot[i]] = s, w
        slot[i] += 1
    return index, weight


def _area_bands(bands, shape, scale):
    """Any factor below 1: rows shrunk by cv2 (fy = 1), then OpenCV's row weights applied here, tap
    by tap in its order; an output row is written once the last input row it needs has arrived."""
    import cv2
    n_out = scaled_shape(shape, scale)[0]
    index, weight = _tap_arrays(area_weights(shape[0], n_out, scale), n_out)
    held, first, done = None, 0, 0          # held: the narrowed input rows [first, first + len(held))
    for band in bands:
        narrow = cv2.resize(band.astype(np.float32), None, fx=scale, fy=1.0, interpolation=cv2.INTER_AREA)
        held = narrow if held is None else np.concatenate([held, narrow])
        ready = int(np.searchsorted(index[:, -1], first + len(held), side="left"))   # rows whose inputs all arrived
        if ready > done:
            out = np.zeros((ready - done, *held.shape[1:]), np.float32)
            for slot in range(index.shape[1]):
                out += weight[done:ready, slot, None, None] * held[index[done:ready, slot] - first]
            yield np.clip(np.rint(out), 0, 255).astype(np.uint8)
            done = ready
            keep = int(index[done, 0]) if done < n_out else first + len(held)   # the next row's first input
            held, first = held[keep - first:], keep
