"""Enlarging an H&E image by OpenCV's bicubic filter, row band by row band.

`cubic_bands` gives the rows of `cv2.resize(img, None, fx=scale, fy=scale, interpolation=INTER_CUBIC)`
for scale > 1 (a raw image coarser than 0.5 um/px) from consecutive row bands of the input, holding
at most a few dozen input rows (as float32 at the output's width) besides the band being read. A
2 cm section at 1 um/px (20,000 px) becomes 40,000 px (4.8 GB as RGB) without either image ever
being in memory whole.

The filter is OpenCV's: output pixel i sits at input coordinate (i + 0.5) / scale - 0.5 (in float64,
as OpenCV 4.14 computes it), the 4 taps are Keys' cubic with a = -0.75 in OpenCV's float32 arithmetic,
and the image's edge repeats its last pixel. The sums are this module's own: along the rows in
float32 tap by tap, down the columns in float64, rounded half to even. OpenCV 4.14 sums the columns
in float32 in the vector width of the CPU it runs on (with fused multiply-adds where there are), so
its own pixels differ between machines; these differ from its by at most 1 in about 1 value in
10,000 (tests/test_resize.py) and are the same on every machine and for every band height."""
from typing import Iterable, Iterator

import numba
import numpy as np

ROWS = 32   # input rows filtered along the rows at once: the float32 buffer is ROWS x out width x 12 bytes


def cubic_taps(n_in: int, n_out: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's bicubic table for one axis: (input index (n_out, 4) int64, clipped to the image,
    weight (n_out, 4) float32) of each output pixel's four taps."""
    # the position in float64 and only its fraction in float32: a float32 position (an older OpenCV's
    # cast) changed 1.4% of the values of a 9,300 px image against cv2.resize, this 0.003%
    pos = (np.arange(n_out) + 0.5) * (1.0 / scale) - 0.5
    start = np.floor(pos)
    x = (pos - start).astype(np.float32)
    a, one = np.float32(-0.75), np.float32(1.0)
    x1, y = x + one, one - x
    # Keys' kernel as OpenCV's interpolateCubic writes it (5a, 8a, 4a, a + 2, a + 3 folded exactly)
    w0 = ((a * x1 - np.float32(-3.75)) * x1 + np.float32(-6.0)) * x1 - np.float32(-3.0)
    w1 = (np.float32(1.25) * x - np.float32(2.25)) * x * x + one
    w2 = (np.float32(1.25) * y - np.float32(2.25)) * y * y + one
    w3 = one - w0 - w1 - w2
    index = np.clip(start.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)
    return index, np.stack([w0, w1, w2, w3], axis=1).astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _along_rows(rows, index, weight, out):
    """out[r, i, c] = sum_k rows[r, index[i, k], c] * weight[i, k] in float32, taps in order."""
    for r in range(rows.shape[0]):
        for i in range(index.shape[0]):
            for c in range(3):
                v = np.float32(rows[r, index[i, 0], c]) * weight[i, 0]
                for k in range(1, 4):
                    v += np.float32(rows[r, index[i, k], c]) * weight[i, k]
                out[r, i, c] = v


@numba.njit(cache=True, nogil=True)
def _down_columns(held, first, index, weight, out):
    """out[j] = the four held rows index[j] - first weighted by weight[j], summed in float64 and
    rounded half to even into uint8; held (rows, n) and out (outputs, n) flat along the row."""
    for j in range(index.shape[0]):
        r0, r1 = held[index[j, 0] - first], held[index[j, 1] - first]
        r2, r3 = held[index[j, 2] - first], held[index[j, 3] - first]
        w0, w1 = np.float64(weight[j, 0]), np.float64(weight[j, 1])
        w2, w3 = np.float64(weight[j, 2]), np.float64(weight[j, 3])
        o = out[j]
        for i in range(held.shape[1]):
            v = np.float64(r0[i]) * w0 + np.float64(r1[i]) * w1 + np.float64(r2[i]) * w2 + np.float64(r3[i]) * w3
            o[i] = min(max(np.rint(v), 0.0), 255.0)


def cubic_bands(bands: Iterable[np.ndarray], shape: tuple, out_shape: tuple, scale: float) -> Iterator[np.ndarray]:
    """Consecutive uint8 (rows, out_shape[1], 3) bands of the image of `shape` (H, W) enlarged by
    `scale` to `out_shape`, from its consecutive uint8 (rows, W, 3) bands. An output row is written
    once its last input row has arrived; input rows no later output row reads are dropped."""
    cols, col_weight = cubic_taps(shape[1], out_shape[1], scale)
    rows, row_weight = cubic_taps(shape[0], out_shape[0], scale)
    # the filtered input rows [first, first + n); at most 3 are carried over to the next ROWS
    held = np.empty((ROWS + 4, out_shape[1], 3), np.float32)
    first, n, done = 0, 0, 0
    for band in bands:
        for r0 in range(0, len(band), ROWS):
            part = np.ascontiguousarray(band[r0:r0 + ROWS])
            _along_rows(part, cols, col_weight, held[n:n + len(part)])
            n += len(part)
            ready = int(np.searchsorted(rows[:, 3], first + n, side="left"))   # last tap arrived
            if ready > done:
                out = np.empty((ready - done, out_shape[1], 3), np.uint8)
                _down_columns(held.reshape(len(held), -1), first, rows[done:ready], row_weight[done:ready],
                              out.reshape(len(out), -1))
                yield out
                done = ready
            if done == len(rows):   # every output row written (the last reads the last input row)
                return
            if rows[done, 0] > first:   # drop the rows before the next output's first tap
                drop = int(rows[done, 0]) - first
                held[:n - drop] = held[drop:n]
                first, n = first + drop, n - drop
