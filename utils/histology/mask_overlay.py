"""The tissue-mask overlay for people: the H&E preview with the mask outline and spot footprints."""
import numpy as np

from ..core import geometry as geo


def make_overlay(rgb, mask, valid, locs, radius_px, inside, scale=None, caption=None):
    """RGB preview: the H&E (one pixel per super-pixel, enlarged `scale` times: 2 by default, 1 above
    2000 super-pixels, up to 8 for grids under 200 super-pixels), background tinted
    blue-grey, padding hatched, the tissue outline in green, spot footprints as circles (yellow
    on tissue, red off it) with a dot at each centre."""
    import cv2
    H, W = mask.shape
    if scale is None:  # 2x; 1x for very large grids; more for tiny ones so that a person can read it
        scale = 1 if max(H, W) > 2000 else max(2, min(8, int(np.ceil(400 / max(H, W)))))
    img = cv2.resize(np.ascontiguousarray(rgb), (W * scale, H * scale), interpolation=cv2.INTER_NEAREST)
    m = cv2.resize(mask.astype(np.uint8), (W * scale, H * scale), interpolation=cv2.INTER_NEAREST).astype(bool)
    v = cv2.resize(valid.astype(np.uint8), (W * scale, H * scale), interpolation=cv2.INTER_NEAREST).astype(bool)
    out = img.astype(np.float32)
    tint = np.array([70, 90, 130], np.float32)
    out[~m] = 0.55 * out[~m] + 0.45 * tint
    yy = np.arange(H * scale, dtype=np.int32)[:, None]
    xx = np.arange(W * scale, dtype=np.int32)[None, :]
    hatch = ~v & (((yy + xx) // 6) % 2 == 0)
    out[hatch] = (160, 160, 160)
    out = np.clip(out, 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 200, 0), min(2, scale), lineType=cv2.LINE_8)
    f = scale / geo.SUPER_PIXEL_PX
    r = max(1, int(round(radius_px * f)))
    for (x, y), ins in zip(np.asarray(locs[["x", "y"]], dtype=np.float64), inside):
        colour = (255, 215, 0) if ins else (255, 30, 30)
        cx, cy = int(round(x * f)), int(round(y * f))
        cv2.circle(out, (cx, cy), r, colour, 1, lineType=cv2.LINE_AA)
        cv2.circle(out, (cx, cy), min(3, scale), colour, -1)
    if caption:
        lines = [caption] if isinstance(caption, str) else list(caption)
        font = cv2.FONT_HERSHEY_SIMPLEX
        width = max(cv2.getTextSize(t, font, 1.0, 1)[0][0] for t in lines)
        size = float(np.clip(out.shape[1] * 0.45 / max(1, width), 0.3, 0.9))  # about 45% of the width
        th = max(1, int(round(size * 1.5)))
        y = 4
        for t in lines:
            (tw, tht), base = cv2.getTextSize(t, font, size, th)
            cv2.rectangle(out, (0, y - 4), (min(out.shape[1], tw + 8), y + tht + base + 2), (255, 255, 255), -1)
            cv2.putText(out, t, (4, y + tht), font, size, (0, 0, 0), th, cv2.LINE_AA)
            y += tht + base + 6
    return out
