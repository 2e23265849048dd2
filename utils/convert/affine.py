"""Affine geometry: least-squares fits between coordinate frames and the pixel size from a spot lattice."""
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger("trihrge")


def fit_affine(src, dst):
    """Least-squares dst = src @ A.T + t. Returns (A (2x2), t (2,), rms residual in dst units)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    D = np.column_stack([src, np.ones(len(src))])
    B, *_ = np.linalg.lstsq(D, dst, rcond=None)
    res = dst - D @ B
    return B[:2].T, B[2], float(np.sqrt(np.mean(np.sum(res ** 2, axis=1))))


def affine_scale(A):
    """(geometric mean scale sqrt|det A|, anisotropy = ratio of singular values)."""
    s = np.linalg.svd(np.asarray(A, dtype=np.float64), compute_uv=False)
    return float(math.sqrt(abs(np.linalg.det(A)))), float(s[0] / s[1]) if s[1] > 0 else float("inf")


def collinear(points, rtol=1e-6) -> bool:
    """Whether 2-d points lie on one line (or one point), up to rounding: an affine fit to them is undetermined."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 3:
        return True
    s = np.linalg.svd(pts - pts.mean(0), compute_uv=False)
    return bool(s[1] <= rtol * s[0])


def lattice_pixel_size(col, row, x, y, dx_um, dy_um, path, what):
    """um/px from an array lattice: column step dx_um, row step dy_um (physical) vs their pixel positions.

    Returns (pixel size, report dict) or (None, reason) when the array does not determine it."""
    col = np.asarray(col, dtype=np.float64)
    row = np.asarray(row, dtype=np.float64)
    uv = np.column_stack([col * dx_um, row * dy_um])
    if collinear(uv):
        return None, {"reason": "fewer than 3 non-collinear array positions"}
    A, t, rms_px = fit_affine(uv, np.column_stack([x, y]))
    px_per_um, aniso = affine_scale(A)
    ps = 1.0 / px_per_um
    rotation = math.degrees(math.atan2(A[1, 0], A[0, 0]))
    rep = {"pixel_size_um": ps, "anisotropy": aniso, "rotation_deg": rotation, "rms_residual_um": rms_px * ps,
           "n_points": int(len(uv))}
    if aniso > 1.03:
        log.warning("%s: the %s lattice is stretched by %.1f%% between its axes in the image; the pixel size is "
                    "their geometric mean", Path(path).name, what, (aniso - 1) * 100)
    if rms_px * ps > 0.1 * min(dx_um, dy_um):
        log.warning("%s: the %s positions deviate from a regular lattice by %.1f um (rms); check that the positions "
                    "and the image belong together", Path(path).name, what, rms_px * ps)
    return ps, rep
