"""A simple tracker of the synthetic object of `wanjax.data.procedural` clips (the motion-direction metric).

The object has a saturated colour and the backgrounds are muted, so the object is segmented per frame by hue and
saturation (`object_mask`), followed through its centroid (`track_centroids`), and the net displacement from the
first to the last frame where it is seen gives the direction (`motion_direction`): ``"left"``, ``"right"``,
``"up"``, ``"down"`` or ``"none"`` (moved less than ``min_disp`` pixels, or not found).
"""
from __future__ import annotations

import numpy as np

from wanjax.data.procedural import COLOURS, colour_hue

__all__ = ["rgb_to_hsv", "object_mask", "track_centroids", "motion_direction", "direction_accuracy"]


def _to_unit(video) -> np.ndarray:
    v = np.asarray(video)
    if v.dtype == np.uint8:
        return v.astype(np.float32) / 255.0
    v = v.astype(np.float32)
    return (v + 1.0) * 0.5 if v.min() < -1e-3 else v      # [-1, 1] -> [0, 1]


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
    c = track_centroids(video, colour, **kw)
    ok = np.flatnonzero(np.isfinite(c[:, 0]))
    if len(ok) < 2:
        return "none", np.zeros(2)
    d = c[ok[-1]] - c[ok[0]]
    if np.hypot(*d) < min_disp:
        return "none", d
    if abs(d[0]) >= abs(d[1]):
        return ("right" if d[0] > 0 else "left"), d
    return ("down" if d[1] > 0 else "up"), d


def direction_accuracy(videos, colours, directions, **kw) -> tuple[float, list[str]]:
    """Fraction of videos whose tracked direction equals the planted one, and the tracked directions."""
    got = [motion_direction(v, c, **kw)[0] for v, c in zip(videos, colours)]
    if not got:
        raise ValueError("direction_accuracy: no videos")
    return float(np.mean([g == d for g, d in zip(got, directions)])), got
