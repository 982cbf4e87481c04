"""A simple tracker of the synthetic object of `wanjax.data.procedural` clips (the motion-direction metric).

The object has a saturated colour and the backgrounds are muted, so the object is segmented per frame by hue and
saturation (`object_mask`), followed through its centroid (`track_centroids`), and the net displacement from the
first to the last frame where it is seen gives the direction (`motion_direction`): ``"left"``, ``"right"``,
``"up"``, ``"down"`` or ``"none"`` (moved less than ``min_disp`` pixels, or not found).
"""

from __future__ import annotations

import numpy as np

from wanjax.data.procedural import COLOURS, colour_hue

__all__ = [
    "rgb_to_hsv",
    "object_mask",
    "track_centroids",
    "motion_direction",
    "direction_accuracy",
    "template_track",
    "template_direction",
]


def _to_unit(video) -> np.ndarray:
    v = np.asarray(video)
    if v.dtype == np.uint8:
        return v.astype(np.float32) / 255.0
    v = v.astype(np.float32)
    return (v + 1.0) * 0.5 if v.min() < -1e-3 else v  # [-1, 1] -> [0, 1]


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised RGB [..., 3] in [0, 1] -> (hue in [0, 1), saturation, value)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = rgb.max(-1)
    mn = rgb.min(-1)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(c > 0, h / 6.0, 0.0) % 1.0
    s = np.where(mx > 0, c / np.where(mx > 0, mx, 1.0), 0.0)
    return h, s, mx


def object_mask(video, colour: str, hue_tol: float = 0.04, min_sat: float = 0.45, min_val: float = 0.2) -> np.ndarray:
    """Boolean [F, H, W]: pixels whose hue is within ``hue_tol`` of ``colour`` (a `COLOURS` name) and that are
    saturated. ``video``: [F, H, W, 3] uint8, or float in [-1, 1] / [0, 1]."""
    if colour not in COLOURS:
        raise ValueError(f"object_mask: unknown colour {colour!r}; expected one of {sorted(COLOURS)}")
    v = _to_unit(video)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"object_mask: expected a video [F, H, W, 3], got shape {v.shape}")
    h, s, val = rgb_to_hsv(v)
    dh = np.abs(h - colour_hue(colour))
    dh = np.minimum(dh, 1.0 - dh)
    return (dh < hue_tol) & (s > min_sat) & (val > min_val)


def track_centroids(video, colour: str, min_pixels: int = 12, **mask_kw) -> np.ndarray:
    """Centroid (x, y) in pixels of the object per frame, [F, 2] (NaN where fewer than ``min_pixels`` match)."""
    m = object_mask(video, colour, **mask_kw)
    f, hgt, wid = m.shape
    ys, xs = np.arange(hgt, dtype=np.float64) + 0.5, np.arange(wid, dtype=np.float64) + 0.5
    n = m.sum(axis=(1, 2)).astype(np.float64)
    cx = (m.sum(axis=1) * xs[None, :]).sum(-1) / np.maximum(n, 1)
    cy = (m.sum(axis=2) * ys[None, :]).sum(-1) / np.maximum(n, 1)
    out = np.stack([cx, cy], -1)
    out[n < min_pixels] = np.nan
    return out


def motion_direction(video, colour: str, min_disp: float = 4.0, **kw) -> tuple[str, np.ndarray]:
    """Dominant direction of the object's net displacement between the first and last frame it is seen in.

    Returns (direction, displacement (dx, dy)); direction is ``"none"`` if the object is seen in fewer than two
    frames or moved less than ``min_disp`` pixels.
    """
    return _direction(track_centroids(video, colour, **kw), min_disp)


def direction_accuracy(videos, colours, directions, **kw) -> tuple[float, list[str]]:
    """Fraction of videos whose tracked direction equals the planted one, and the tracked directions."""
    got = [motion_direction(v, c, **kw)[0] for v, c in zip(videos, colours)]
    if not got:
        raise ValueError("direction_accuracy: no videos")
    return float(np.mean([g == d for g, d in zip(got, directions)])), got


def template_track(video, mask0: np.ndarray, search: int = 8, margin: int = 1, min_score: float = 0.5) -> np.ndarray:
    """Follow the object by its pixel pattern: it needs no particular colour, so it also works on grey or
    desaturated videos (with less contrast to use).

    ``mask0`` [H, W] (bool) marks the object in frame 0 (e.g. `object_mask` of the colour condition frame). The
    template is frame 0's RGB over the mask's bounding box (+ ``margin`` px); in each next frame it is matched by
    zero-mean normalised cross-correlation at integer shifts within ``search`` px of the previous position. Returns
    the object's centre (x, y) per frame, [F, 2]; NaN from the first frame whose best score is below ``min_score``
    (object lost) on.
    """
    y = _to_unit(video)
    if y.ndim != 4 or y.shape[-1] != 3:
        raise ValueError(f"template_track: expected a video [F, H, W, 3], got shape {y.shape}")
    y = y.transpose(0, 3, 1, 2)  # [F, 3, H, W]: channels matched together
    m = np.asarray(mask0, bool)
    if m.shape != y.shape[2:]:
        raise ValueError(f"template_track: mask0 shape {m.shape} does not match the frames {y.shape[2:]}")
    out = np.full((y.shape[0], 2), np.nan)
    if not m.any():
        return out
    hgt, wid = m.shape
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    y0, y1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, hgt)
    x0, x1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, wid)
    tmpl = y[0, :, y0:y1, x0:x1]
    th, tw = tmpl.shape[1:]
    centre = np.array([(cols[0] + cols[-1] + 1) / 2.0, (rows[0] + rows[-1] + 1) / 2.0])
    out[0] = centre
    oy, ox = y0, x0
    tz = tmpl - tmpl.mean(axis=(1, 2), keepdims=True)
    tn = np.sqrt((tz * tz).sum())
    for f in range(1, y.shape[0]):
        # every window within `search` px of the last position (clipped to the frame), scored at once
        ya, xa = max(oy - search, 0), max(ox - search, 0)
        yb, xb = min(oy + search + th, hgt), min(ox + search + tw, wid)
        region = y[f, :, ya:yb, xa:xb]
        if region.shape[1] < th or region.shape[2] < tw:
            break
        win = np.lib.stride_tricks.sliding_window_view(region, (th, tw), axis=(1, 2))  # [3, ny, nx, th, tw]
        wz = win - win.mean(axis=(3, 4), keepdims=True)
        num = np.einsum("cyxhw,chw->yx", wz, tz)
        den = np.sqrt(np.einsum("cyxhw,cyxhw->yx", wz, wz)) * tn
        score = np.where(den > 1e-12, num / np.maximum(den, 1e-12), 0.0)
        iy, ix = np.unravel_index(np.argmax(score), score.shape)
        if score[iy, ix] < min_score:
            break
        oy, ox = ya + iy, xa + ix
        out[f] = centre + np.array([ox - x0, oy - y0])
    return out


def template_direction(video, mask0: np.ndarray, min_disp: float = 4.0, **kw) -> tuple[str, np.ndarray]:
    """`motion_direction` by `template_track` (colour-free): direction of the net displacement between frame 0
    and the last frame where the object is still matched."""
    return _direction(template_track(video, mask0, **kw), min_disp)


def _direction(c: np.ndarray, min_disp: float) -> tuple[str, np.ndarray]:
    ok = np.flatnonzero(np.isfinite(c[:, 0]))
    if len(ok) < 2:
        return "none", np.zeros(2)
    d = c[ok[-1]] - c[ok[0]]
    if np.hypot(*d) < min_disp:
        return "none", d
    if abs(d[0]) >= abs(d[1]):
        return ("right" if d[0] > 0 else "left"), d
    return ("down" if d[1] > 0 else "up"), d
