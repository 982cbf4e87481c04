"""FP4 (E2M1) block formats: MXFP4 (OCP MX, E8M0 scale per 32) and NVFP4 (e4m3 scale per 16 + fp32 tensor scale).

Both quantize along the last axis (K) and return a :class:`~wanjax.numerics.tensor.QuantizedTensor` with
uint8 E2M1 codes (see ``wanjax.numerics.codecs``). Elements are ``x / scale`` rounded to the E2M1 grid half-to-even
and saturated at +-6. ``mxfp4_decode`` turns MXFP4 codes into the kernels' operands (E2M1 values, block exponents).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.numerics.checks import check_choice, check_finite, check_positive, group_count, is_traced
from wanjax.numerics.codecs import (
    E8M0_NAN_CODE,
    e2m1_decode,
    e2m1_encode,
    e8m0_encode,
    floor_log2,
    fp8_e4m3_encode,
    ldexp_exact,
)
from wanjax.numerics.dequant import dequantize_mxfp4, dequantize_nvfp4
from wanjax.numerics.groups import F32_TINY as _F32_TINY
from wanjax.numerics.groups import group_amax as _group_amax
from wanjax.numerics.groups import split_groups as _split_groups
from wanjax.numerics.pack import unpack_nibbles
from wanjax.numerics.table import E2M1_MAX, FP8_E4M3_MAX, MX_BLOCK_SIZE, MX_SCALE_RULES, NVFP4_BLOCK_SIZE
from wanjax.numerics.tensor import QuantizedTensor

__all__ = [
    "MX_BLOCK_SIZE",
    "MX_EXP_MAX",
    "MX_EXP_MIN",
    "MX_NAN_EXP",
    "MX_SCALE_RULES",
    "NVFP4_BLOCK_SIZE",
    "dequantize_mxfp4",
    "dequantize_nvfp4",
    "mx_shared_exponent",
    "mxfp4_decode",
    "nvfp4_tensor_scale",
    "quantize_mxfp4",
    "quantize_nvfp4",
]

#: Range of shared exponents we produce: E8M0 codes 1..254. Code 0 (2**-127, a float32 subnormal) is never produced.
MX_EXP_MIN = -126
MX_EXP_MAX = 127
#: E8M0 NaN code 255 (a block with a non-finite input) as an exponent, as :func:`mxfp4_decode` returns it.
MX_NAN_EXP = E8M0_NAN_CODE - 127

_FP8_E4M3_MIN_SUBNORMAL = 2.0**-9


def mx_shared_exponent(
    amax: jax.Array, scale_rule: str = "ocp_floor", exp_offset: jax.Array | int = 0, clip: jax.Array | float = 1.0
) -> jax.Array:
    """Shared power-of-two exponent ``e`` (int32) of MX blocks with abs-max ``amax``, computed exactly.

    With ``a = float32(amax * clip)``:

    * ``ocp_floor``: ``e = floor(log2(a)) - 2 + exp_offset``  (OCP MX rule; ``a / 2**e`` in [4, 8) for offset 0, so
      block values in (6, 8) * 2**e saturate to 6);
    * ``safe_ceil``: ``e = ceil(log2(a / 6)) + exp_offset``, i.e. the smallest ``e`` with ``a <= 6 * 2**e`` for
      offset 0 (no saturation). Evaluated exactly from the bits of ``a`` (no float log2 rounding), so it can differ
      from a float ``ceil(log2(a/6))`` only when ``a/6`` is within a few ulp above a power of two.

    The result is clamped to [MX_EXP_MIN, MX_EXP_MAX] = [-126, 127] (E8M0 codes 1..254); a block with ``a`` zero or
    subnormal gets ``MX_EXP_MIN``. ``exp_offset`` and ``clip`` may be traced and broadcast against ``amax``.
    """
    check_choice("mx_shared_exponent", "scale_rule", scale_rule, MX_SCALE_RULES)
    a = jnp.asarray(amax, jnp.float32) * jnp.asarray(clip, jnp.float32)
    f, mant = floor_log2(a)
    e = f - 2
    if scale_rule == "safe_ceil":
        # a = 2**f * m with m in [1, 2): a <= 6 * 2**(f-2) = 1.5 * 2**f  <=>  m <= 1.5  <=>  mant <= 0x400000.
        e = e + (mant > 0x400000).astype(jnp.int32)
    e = e + jnp.asarray(exp_offset).astype(jnp.int32)
    e = jnp.clip(e, MX_EXP_MIN, MX_EXP_MAX)
    return jnp.where(f <= -127, MX_EXP_MIN, e).astype(jnp.int32)


def quantize_mxfp4(
    x: jax.Array,
    scale_rule: str = "ocp_floor",
    exp_offset: jax.Array | int = 0,
    clip: jax.Array | float = 1.0,
    block_size: int = MX_BLOCK_SIZE,
    nonfinite: str = "raise",
) -> QuantizedTensor:
    """MXFP4 (OCP MX v1.0): E2M1 elements with one E8M0 power-of-two scale per ``block_size`` (32) elements of K.

    Args:
      x: float array ``[..., K]`` with K divisible by ``block_size``.
      scale_rule: ``"ocp_floor"`` (OCP / the seed's weight rule) or ``"safe_ceil"`` (the seed's activation rule); see
        :func:`mx_shared_exponent`.
      exp_offset: the seed's exponent offset delta (int, e.g. -1/0/+1), scalar or per block; may be traced.
      clip: clip ratio(s) > 0 multiplied into the block abs-max before the rule; may be traced.
      block_size: 32 for OCP MXFP4 (other sizes give an MX-like format).
      nonfinite: ``"raise"`` or ``"nan"`` (NaN blocks get E8M0 code 255).

    Returns:
      ``QuantizedTensor(fmt="mxfp4")``: uint8 E2M1 codes ``[..., K]``, uint8 E8M0 scale codes ``[..., K/32]``
      (``scale = 2**(code - 127)``), ``group_size=block_size``. Elements: ``E2M1(clip(x / 2**e, -6, 6))``.
    """
    fn = "quantize_mxfp4"
    check_choice(fn, "scale_rule", scale_rule, MX_SCALE_RULES)
    x = jnp.asarray(x)
    _, g = group_count(fn, x.shape, block_size, arg="block_size")
    check_positive(fn, "clip", clip)
    check_finite(fn, x, nonfinite)
    codes, scales = _quantize_mxfp4_core(x, exp_offset, clip, scale_rule=scale_rule, block_size=g)
    return QuantizedTensor(codes=codes, scales=scales, fmt="mxfp4", group_size=g)


@functools.partial(jax.jit, static_argnames=("scale_rule", "block_size"))
def _quantize_mxfp4_core(x, exp_offset, clip, scale_rule, block_size):
    xg = _split_groups(x, x.shape[-1] // block_size, block_size)
    amax, bad = _group_amax(xg)
    e = mx_shared_exponent(amax, scale_rule, exp_offset, clip)
    y = jnp.clip(ldexp_exact(xg, -e[..., None]), -E2M1_MAX, E2M1_MAX)
    codes = jnp.where(bad[..., None], jnp.uint8(0), e2m1_encode(y))
    scales = jnp.where(bad, jnp.uint8(E8M0_NAN_CODE), e8m0_encode(e))
    return codes.reshape(x.shape), scales


def mxfp4_decode(codes, scales, block: int = MX_BLOCK_SIZE):
    """MXFP4 codes -> (E2M1 element values f32 [R, K], block exponents int32 [R, K/block]).

    ``codes``: uint8 E2M1 codes, packed two per byte ``[R, K/2]`` (``wanjax.numerics.pack``) or one per byte
    ``[R, K]`` (told apart by their width against ``scales``, K = scales.shape[-1] * block); ``scales``: uint8 E8M0
    codes ``[R, K/block]`` (exponent = code - 127; code 255 = NaN block, exponent ``MX_NAN_EXP`` = 128).
    """
    codes = jnp.asarray(codes)
    scales = jnp.asarray(scales)
    k = scales.shape[-1] * block
    if codes.shape[-1] * 2 == k:
        codes = unpack_nibbles(codes, signed=False)
    if codes.shape[-1] != k or codes.shape[:-1] != scales.shape[:-1]:
        raise ValueError(
            f"mxfp4_decode: codes [R, K/2] (packed) or [R, K] and E8M0 scales [R, K/{block}] expected, got "
            f"{codes.shape} and {scales.shape}"
        )
    return e2m1_decode(codes), scales.astype(jnp.int32) - 127


def nvfp4_tensor_scale(x: jax.Array, clip: jax.Array | float = 1.0) -> jax.Array:
    """Default NVFP4 per-tensor float32 scale ``float32(amax(x) * clip) * float32(1 / 2688)`` (2688 = 6 * 448).

    1.0 for an all-zero tensor.

    Non-finite values are ignored here (the quantizer applies the non-finite policy).
    """
    xf = jnp.asarray(x, jnp.float32)
    amax = jnp.max(jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0))
    ts = amax * jnp.asarray(clip, jnp.float32) * (np.float32(1.0) / np.float32(E2M1_MAX * FP8_E4M3_MAX))
    return jnp.where(ts >= _F32_TINY, ts, jnp.float32(1.0))


def quantize_nvfp4(
    x: jax.Array,
    tensor_scale: jax.Array | float | None = None,
    clip: jax.Array | float = 1.0,
    block_size: int = NVFP4_BLOCK_SIZE,
    nonfinite: str = "raise",
) -> QuantizedTensor:
    """NVFP4: E2M1 elements, float8_e4m3fn scale per ``block_size`` (16) elements of K, and a float32 tensor scale.

    ``ts = tensor_scale`` (default :func:`nvfp4_tensor_scale`, i.e. amax/(6*448); pass a calibrated value for static
    activation scales). Block scale ``s_b = e4m3(amax_b * clip * float32(1 / (6 * ts)))``, rounded half-to-even and
    saturated at 448; a block whose ``s_b`` rounds to 0 (all-zero block or underflow) gets the smallest e4m3 subnormal 2**-9.
    Elements ``E2M1(clip(x * float32(1 / (s_b * ts)), -6, 6))`` (reciprocal per block, as in ``formats_int``);
    dequantization is ``E2M1(code) * (s_b * ts)`` with the same float32 product. Tensors with abs-max below ~1e-30
    may underflow to zeros.

    Returns:
      ``QuantizedTensor(fmt="nvfp4")``: uint8 E2M1 codes ``[..., K]``, float8_e4m3fn scales ``[..., K/16]``,
      ``tensor_scale`` float32 ``()``, ``group_size=block_size``.
    """
    fn = "quantize_nvfp4"
    x = jnp.asarray(x)
    _, g = group_count(fn, x.shape, block_size, arg="block_size")
    check_positive(fn, "clip", clip)
    check_positive(fn, "tensor_scale", tensor_scale)
    check_finite(fn, x, nonfinite)
    if tensor_scale is not None and not is_traced(tensor_scale) and jnp.ndim(tensor_scale) != 0:
        raise ValueError(f"{fn}: tensor_scale must be a scalar, got shape {tuple(jnp.shape(tensor_scale))}")
    codes, s_b, ts = _quantize_nvfp4_core(x, tensor_scale, clip, block_size=g)
    return QuantizedTensor(codes=codes, scales=s_b, tensor_scale=ts, fmt="nvfp4", group_size=g)


@functools.partial(jax.jit, static_argnames=("block_size",))
def _quantize_nvfp4_core(x, tensor_scale, clip, block_size):
    ts = nvfp4_tensor_scale(x) if tensor_scale is None else jnp.asarray(tensor_scale, jnp.float32)
    xg = _split_groups(x, x.shape[-1] // block_size, block_size)
    amax, bad = _group_amax(xg)
    s_b = fp8_e4m3_encode(amax * jnp.asarray(clip, jnp.float32) * (1.0 / (E2M1_MAX * ts)))
    s_b = jnp.where(s_b.astype(jnp.float32) > 0, s_b, jnp.asarray(_FP8_E4M3_MIN_SUBNORMAL, jnp.float8_e4m3fn))
    s_b = jnp.where(bad, jnp.asarray(jnp.nan, jnp.float8_e4m3fn), s_b)
    eff = jnp.maximum(s_b.astype(jnp.float32) * ts, _F32_TINY)
    y = jnp.clip(xg * (1.0 / eff)[..., None], -E2M1_MAX, E2M1_MAX)
    codes = jnp.where(bad[..., None], jnp.uint8(0), e2m1_encode(y))
    return codes.reshape(x.shape), s_b, ts
