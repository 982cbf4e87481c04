"""Linear-scale formats: symmetric INT4 / INT8 (per channel or per group) and FP8 e4m3 (per tensor or per channel).

All quantize along the last axis (K) and return a :class:`~wanjax.numerics.tensor.QuantizedTensor`.
Scale rule: ``scale = float32(amax * clip) * float32(1 / qmax)`` with ``amax`` the group's abs-max and ``qmax`` 7
(int4), 127 (int8) or 448 (fp8 e4m3). A group whose scale would be 0 (all-zero group) or subnormal gets scale 1.0,
so every scale is a normal positive float32 and the group dequantizes to exact zeros.

Elements are rounded from ``x * r`` with ``r = float32(1 / scale)``: one reciprocal per group, then a multiply per
element. XLA compiles ``x / scale`` into exactly this anyway (its algebraic simplifier rewrites division by a constant
or a broadcast value), so the definition is made explicit; see ``docs/formats.md`` ("Scale division"). The scale can
differ from ``amax / qmax`` by one ulp, and a code from a true-division reference such as PyTorch's ``x / scale``
only where ``x / scale`` lies within about one ulp of a rounding midpoint.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.numerics.checks import check_choice, check_finite, check_positive, group_count
from wanjax.numerics.codecs import fp8_e4m3_encode
from wanjax.numerics.dequant import dequantize_fp8, dequantize_int
from wanjax.numerics.groups import F32_TINY as _F32_TINY
from wanjax.numerics.groups import group_amax as _group_amax
from wanjax.numerics.groups import split_groups as _split_groups
from wanjax.numerics.table import FP8_E4M3_MAX, INT_QMAX
from wanjax.numerics.tensor import QuantizedTensor

__all__ = [
    "dequantize_fp8",
    "dequantize_int",
    "quantize_fp8",
    "quantize_int",
    "quantize_int4",
    "quantize_int8",
]


def _recip32(v: float) -> np.float32:
    """float32(1 / v), rounded once (numpy IEEE division)."""
    return np.float32(1.0) / np.float32(v)


def _safe_scale(scale: jax.Array, bad: jax.Array) -> jax.Array:
    """Replaces 0 / subnormal scales by 1.0 (a NaN scale, e.g. from a NaN clip, stays NaN) and poisons groups holding non-finite input with NaN."""
    scale = jnp.where(scale < _F32_TINY, jnp.float32(1.0), scale)  # NaN stays NaN: never repaired silently
    return jnp.where(bad, jnp.float32(jnp.nan), scale)


def quantize_int(
    x: jax.Array,
    bits: int,
    group_size: int | None = None,
    clip: jax.Array | float = 1.0,
    nonfinite: str = "raise",
) -> QuantizedTensor:
    """Symmetric signed integer RTN of ``x`` along its last axis.

    Args:
      x: float array ``[..., K]``.
      bits: 4 or 8. Codes lie in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` ([-7, 7] / [-127, 127]; -8 / -128 unused).
      group_size: ``None`` for one scale per row (per output channel / per token), or a divisor of K (e.g. 32, 64,
        128) for one scale per ``group_size`` consecutive elements.
      clip: clip ratio(s) in (0, inf), scalar or broadcastable to the scales shape ``x.shape[:-1] + (K//g,)``; may be
        traced. ``scale = amax * clip / qmax``; values beyond ``clip * amax`` saturate.
      nonfinite: ``"raise"`` or ``"nan"`` (see ``formats_checks``).

    Returns:
      ``QuantizedTensor(fmt="int4"|"int8")`` with int8 codes, float32 scales ``[..., K//g]`` and ``group_size`` = g
      (K for per channel). Rounding is round-half-to-even (``jnp.round``).
    """
    fn = f"quantize_int{bits}" if bits in (4, 8) else "quantize_int"
    check_choice(fn, "bits", bits, (4, 8))
    x = jnp.asarray(x)
    _, g = group_count(fn, x.shape, group_size)
    check_positive(fn, "clip", clip)
    check_finite(fn, x, nonfinite)
    codes, scale = _quantize_int_core(x, clip, bits=bits, group_size=g)
    return QuantizedTensor(codes=codes, scales=scale, fmt=f"int{bits}", group_size=g)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _quantize_int_core(x, clip, bits, group_size):
    qmax = float(INT_QMAX[f"int{bits}"])
    xg = _split_groups(x, x.shape[-1] // group_size, group_size)
    amax, bad = _group_amax(xg)
    scale = _safe_scale(amax * jnp.asarray(clip, jnp.float32) * _recip32(qmax), bad)
    q = jnp.clip(jnp.round(xg * (1.0 / scale)[..., None]), -qmax, qmax)
    q = jnp.where(bad[..., None], 0.0, q).astype(jnp.int8)
    return q.reshape(x.shape), scale


def quantize_int4(x, group_size=None, clip=1.0, nonfinite="raise") -> QuantizedTensor:
    """Symmetric INT4, codes in [-7, 7], per channel (``group_size=None``) or per group along K; see ``quantize_int``."""
    return quantize_int(x, 4, group_size=group_size, clip=clip, nonfinite=nonfinite)


def quantize_int8(x, group_size=None, clip=1.0, nonfinite="raise") -> QuantizedTensor:
    """Symmetric INT8, codes in [-127, 127], per channel by default; see ``quantize_int``."""
    return quantize_int(x, 8, group_size=group_size, clip=clip, nonfinite=nonfinite)


def quantize_fp8(
    x: jax.Array, granularity: str = "channel", clip: jax.Array | float = 1.0, nonfinite: str = "raise"
) -> QuantizedTensor:
    """FP8 e4m3 (float8_e4m3fn) with a float32 scale per tensor or per channel (row of the last axis).

    ``scale = float32(amax * clip) * float32(1/448)``; elements are ``x * float32(1/scale)`` rounded half-to-even to e4m3 and saturated
    at +-448.

    Args:
      x: float array ``[..., K]``.
      granularity: ``"tensor"`` (scales shape ``()``, ``group_size`` 0) or ``"channel"`` (scales ``[..., 1]``,
        ``group_size`` K).
      clip: clip ratio(s) > 0, scalar or broadcastable to the scales shape; may be traced.
      nonfinite: ``"raise"`` or ``"nan"``.
    """
    fn = "quantize_fp8"
    check_choice(fn, "granularity", granularity, ("tensor", "channel"))
    x = jnp.asarray(x)
    _, k = group_count(fn, x.shape, None)
    check_positive(fn, "clip", clip)
    check_finite(fn, x, nonfinite)
    codes, scale = _quantize_fp8_core(x, clip, per_tensor=granularity == "tensor")
    return QuantizedTensor(codes=codes, scales=scale, fmt="fp8_e4m3", group_size=0 if granularity == "tensor" else k)


@functools.partial(jax.jit, static_argnames=("per_tensor",))
def _quantize_fp8_core(x, clip, per_tensor):
    xf = jnp.asarray(x, jnp.float32)
    amax, bad = _group_amax(xf.reshape(-1) if per_tensor else xf[..., None, :])
    scale = _safe_scale(amax * jnp.asarray(clip, jnp.float32) * _recip32(FP8_E4M3_MAX), bad)
    # tensor: scale () broadcasts; channel: scale [..., 1] broadcasts over K.
    codes = fp8_e4m3_encode(jnp.where(bad, 0.0, xf * (1.0 / scale)))
    return codes, scale
