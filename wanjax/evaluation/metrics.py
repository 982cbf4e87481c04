"""Fidelity metrics of decoded videos and latents: PSNR, SSIM (Wang et al. 2004), relative L2.

All take numpy-convertible arrays and return Python floats. Videos are ``[F, H, W, C]`` (or one image
``[H, W, C]``), uint8 (peak 255) or float with an explicit ``data_range``.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["gaussian_window", "psnr", "relative_l2", "ssim"]


def _peak(a: np.ndarray, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    if a.dtype == np.uint8:
        return 255.0
    raise ValueError(f"data_range is required for {a.dtype} inputs (uint8 inputs use 255)")


def _check(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: {a.shape} vs {b.shape}")
    return a, b


def psnr(a, b, data_range: float | None = None) -> float:
    """PSNR in dB over all elements, ``10 log10(peak^2 / MSE)``; ``inf`` for identical inputs."""
    a, b = _check(a, b, "psnr")
    peak = _peak(a, data_range)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(peak * peak / mse))


def relative_l2(a, ref) -> float:
    """``||a - ref|| / ||ref||`` (Frobenius over all elements)."""
    a, ref = _check(a, ref, "relative_l2")
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    den = float(np.linalg.norm(ref))
    if den == 0.0:
        raise ValueError("relative_l2: the reference is all zeros")
    return float(np.linalg.norm(a - ref) / den)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian of ``size`` taps (the separable SSIM window)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """'valid' separable filtering of ``x [N, H, W, C]`` over H and W."""
    x = sliding_window_view(x, g.size, axis=1) @ g          # [N, H', W, C]
    return sliding_window_view(x, g.size, axis=2) @ g       # [N, H', W', C]


def ssim(a, b, data_range: float | None = None, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> float:
    """Mean SSIM over frames, channels and 'valid' window positions (Gaussian window 11 / 1.5, K1 0.01, K2 0.03,
    population statistics: the Wang et al. 2004 definition). Frames must be at least ``win_size`` on each side."""
    a, b = _check(a, b, "ssim")
    peak = _peak(a, data_range)
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"ssim: expected [F, H, W, C] or [H, W, C], got shape {a.shape}")
    if min(a.shape[1:3]) < win_size:
        raise ValueError(f"ssim: frames {a.shape[1:3]} are smaller than the {win_size}-tap window")
    x, y = a.astype(np.float64), b.astype(np.float64)
    g = gaussian_window(win_size, sigma)
    mx, my = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mx * mx
    syy = _filter(y * y, g) - my * my
    sxy = _filter(x * y, g) - mx * my
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(np.mean(s))
