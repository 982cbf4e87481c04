"""Fidelity metrics, one implementation each: PSNR, SSIM (Wang et al. 2004), relative L2, SQNR.

numpy only (inputs may be jax arrays: they are converted), so every layer that may import support modules uses
these (quantization, evaluation, training, benchmarks). They return Python floats, except `sqnr_db` and `relative_l2`
with ``axis``, which return float64 arrays.

Videos are ``[F, H, W, C]`` (or one image ``[H, W, C]``), uint8 (peak 255) or float with an explicit
``data_range``.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["gaussian_window", "psnr", "relative_l2", "sqnr_db", "ssim"]


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
    """PSNR in dB over all elements, ``10 log10(peak^2 / MSE)``; ``inf`` for identical inputs. The peak is
    ``data_range``, or 255 for uint8 ``a``."""
    a, b = _check(a, b, "psnr")
    peak = _peak(a, data_range)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(peak * peak / mse))


def relative_l2(a, ref, *, axis=None, floor: float | None = None, nonfinite: str = "nan"):
    """``||a - ref|| / ||ref||`` in float64: Frobenius over all elements (a float), or over ``axis`` (an int or a
    tuple; a float64 array of the other axes, e.g. one ratio per attention head).

    ``floor``: None raises ``ValueError`` for an all-zero reference (whole-array form); a number divides by
    ``max(||ref||, floor)`` instead (benchmarks: ``1e-30``). ``nonfinite="inf"`` gives ``inf`` when ``a`` has a NaN
    or Inf (a kernel that wrote garbage reads as infinitely wrong; whole-array form); ``"nan"`` (default) lets NaN
    propagate.
    """
    if nonfinite not in ("nan", "inf"):
        raise ValueError(f"relative_l2: nonfinite must be 'nan' or 'inf', got {nonfinite!r}")
    a, ref = _check(a, ref, "relative_l2")
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    if axis is not None:
        num = np.sqrt(np.sum((a - ref) ** 2, axis=axis))
        den = np.sqrt(np.sum(ref * ref, axis=axis))
        return num / (den if floor is None else np.maximum(den, floor))
    if nonfinite == "inf" and not np.all(np.isfinite(a)):
        return float("inf")
    den = float(np.linalg.norm(ref))
    if floor is not None:
        den = max(den, floor)
    elif den == 0.0:
        raise ValueError("relative_l2: the reference is all zeros")
    return float(np.linalg.norm(a - ref) / den)


def sqnr_db(signal_energy, error_energy, floor: float = 1e-300):
    """Signal-to-quantization-noise ratio in dB, ``10 log10(signal / error)``, from energies (sums of squares, e.g.
    ``sum ||y_ref||^2`` and ``sum ||y_q - y_ref||^2``); both clamped below at ``floor`` (an exact layer gives a
    large finite number, not ``inf``). Elementwise: a numpy array of the broadcast shape (float64)."""
    s = np.asarray(signal_energy, np.float64)
    e = np.asarray(error_energy, np.float64)
    return 10.0 * np.log10(np.maximum(s, floor) / np.maximum(e, floor))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian of ``size`` taps (the separable SSIM window)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """'valid' separable filtering of ``x [N, H, W, C]`` over H and W."""
    x = sliding_window_view(x, g.size, axis=1) @ g  # [N, H', W, C]
    return sliding_window_view(x, g.size, axis=2) @ g  # [N, H', W', C]


def ssim(
    a, b, data_range: float | None = None, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> float:
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
