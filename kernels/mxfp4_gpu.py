"""MXFP4 W4A4 on Hopper: exact re-encoding of MXFP4 rows into FP8 e4m3 plus one power-of-two scale per row, then the
FP8 ``wgmma`` GEMM of ``kernels.w4a4_gpu`` (``weights="fp8"``) with the same epilogue.

MXFP4 (OCP MX): E2M1 elements {0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6} and one E8M0 scale 2**e per block of 32 along
K. H100 has no FP4 tensor cores, but every E2M1 value times 2**-d is exactly representable in e4m3 for 0 <= d <= 8
(the smallest, 0.5 * 2**-8 = 2**-9, is e4m3's smallest subnormal). So each row (token, or output channel) is
re-encoded with the row scale 2**max_block_exp: element -> e2m1 * 2**(e_block - e_row) in e4m3, exact while every
block's exponent is within 8 of the row's largest; blocks further below are rounded by the e4m3 cast (counted and
reported by :func:`reencode_rows`). The GEMM is then fp8 x fp8 -> f32 with scales 2**e_row_x[m] * 2**e_row_w[n].

Inputs here are the decoded E2M1 element values (f32) and the integer block exponents; ``wanjax.numerics.fp4``
produces both (``quantize_mxfp4``, then ``mxfp4_decode``).

Status: reference and re-encoding verified on CPU; the FP8 GEMM is the int8 kernel with f32 accumulation, checked in
the Mosaic GPU interpreter and lowered for CUDA on CPU, and run on a GPU end to end through
``dispatch.mxfp4_linear`` against the exact f32 reference (accuracy, rounded rows and timings: docs/BENCHMARKS.md,
"MXFP4 on the GPU" and "MXFP4 with the weights re-encoded once").
Caveat: Hopper's FP8 ``wgmma`` accumulates with reduced precision (DeepSeek measured ~14 kept mantissa bits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from wanjax.numerics.codecs import e2m1_decode, e2m1_encode, ldexp_exact
from wanjax.numerics.fp4 import mx_shared_exponent, mxfp4_decode
from wanjax.numerics.groups import group_amax as _group_amax
from wanjax.numerics.table import E2M1_MAX, MX_BLOCK_SIZE as MX_BLOCK

from . import reference

MAX_EXACT_SHIFT = 8  # e4m3 holds e2m1 * 2**-d exactly for d <= 8


def exp2_exact(n: jax.Array) -> jax.Array:
    """Exact float32 ``2**n`` for integer ``n`` in [-126, 127] from the exponent bits (``jnp.exp2`` is not exact on
    CPU: it is off by ulps for most |n| >= 13 and gives 0 for n = -126). Values outside are clamped."""
    n = jnp.clip(jnp.asarray(n).astype(jnp.int32), -126, 127)
    return lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def reencode_rows(values: jax.Array, block_exp: jax.Array, block: int = MX_BLOCK):
    """MXFP4 rows -> (fp8 e4m3 [R, K], row exponent int32 [R], number of rows not exactly representable).

    Args:
      values: f32 [R, K] decoded E2M1 element values (multiples of 0.5 in [-6, 6]).
      block_exp: int [R, K // block] block scale exponents (scale = 2**block_exp).
    """
    r, k = values.shape
    if k % block or block_exp.shape != (r, k // block):
        raise ValueError(
            f"reencode_rows: values [R, K] with K % {block} == 0 and block_exp [R, K/{block}] expected, "
            f"got {values.shape} and {block_exp.shape}"
        )
    e = block_exp.astype(jnp.int32)
    row_exp = jnp.max(e, axis=1)
    shift = e - row_exp[:, None]  # <= 0
    shift = jnp.maximum(shift, -126)  # 2**-126 and below flush every E2M1 value out of e4m3 anyway (counted inexact)
    y = values.astype(jnp.float32).reshape(r, k // block, block) * exp2_exact(shift)[..., None]
    y = y.reshape(r, k)
    f8 = y.astype(jnp.float8_e4m3fn)
    inexact_rows = jnp.sum(jnp.any(f8.astype(jnp.float32) != y, axis=1).astype(jnp.int32))
    return f8, row_exp, inexact_rows


def dequantize(values, block_exp, block: int = MX_BLOCK):
    """Exact f32 value of MXFP4 rows: values * 2**block_exp (per block)."""
    r, k = values.shape
    e = block_exp.astype(jnp.int32)[..., None]
    half = e >> 1  # two halves: exact also where 2**e alone would be subnormal (the result stays normal)
    v = values.astype(jnp.float32).reshape(r, k // block, block)
    return (v * exp2_exact(half) * exp2_exact(e - half)).reshape(r, k)


def mxfp4_matmul_reference(xv, xe, wv, we, x_lr=None, up=None, bias=None, out_dtype=jnp.bfloat16):
    """Reference MXFP4 W4A4 GEMM: dequantize both operands exactly, f32 dot (HIGHEST), same epilogue as W4A4."""
    x = dequantize(xv, xe)
    w = dequantize(wv, we)
    acc = lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )
    ones_m = jnp.ones((x.shape[0],), jnp.float32)
    ones_n = jnp.ones((w.shape[0],), jnp.float32)
    return reference.w4a4_epilogue(acc, ones_m, ones_n, x_lr, up, bias, out_dtype)


def mxfp4_matmul_gpu(
    xv, xe, wv, we, x_lr=None, up=None, bias=None, *, out_dtype=jnp.bfloat16, config=None, interpret=False
):
    """MXFP4 W4A4 GEMM on Hopper: re-encode both operands to (e4m3, 2**row_exp) and run the FP8 Mosaic GPU GEMM.

    Returns (out [M, N], inexact_rows_x, inexact_rows_w). In production the weights are re-encoded once at load time.
    """
    from .w4a4_gpu import DEFAULT_CONFIG, w4a4_matmul_gpu

    x8, ex, bad_x = reencode_rows(xv, xe)
    w8, ew, bad_w = reencode_rows(wv, we)
    out = w4a4_matmul_gpu(
        x8,
        exp2_exact(ex),
        w8,
        exp2_exact(ew),
        x_lr,
        up,
        bias,
        out_dtype=out_dtype,
        weights="fp8",
        config=config or DEFAULT_CONFIG,
        interpret=interpret,
    )
    return out, bad_x, bad_w


# ------------------------------------------------------------------------------ load-time weights, fused activations
def _rows_to_fp8(values, block_exp, bad_rows, block):
    """(e4m3 [R, K], row scale f32 [R] = 2**max block exp, NaN on ``bad_rows``, inexact row count)."""
    f8, row_exp, inexact = reencode_rows(values, block_exp, block)
    return f8, jnp.where(bad_rows, jnp.float32(jnp.nan), exp2_exact(row_exp)), inexact


@jax.jit
def prepare_weights(codes, scales):
    """MXFP4 weights -> what the FP8 kernel reads, computed once at load time (pure function).

    Args:
      codes: uint8 E2M1 codes [N, K/2] (``numerics.pack`` nibble layout) or [N, K].
      scales: uint8 E8M0 scale codes [N, K/32] (255 = NaN block).
    Returns:
      (w8 float8_e4m3fn [N, K], s_w f32 [N] (2**row exponent; NaN for a row with a NaN block), inexact_rows int32:
      finite rows the e4m3 re-encoding rounded).
    """
    values, exps = mxfp4_decode(codes, scales, MX_BLOCK)
    nan_block = exps >= 128
    r, k = values.shape
    values = jnp.where(nan_block[..., None], 0.0, values.reshape(r, k // MX_BLOCK, MX_BLOCK)).reshape(r, k)
    exps = jnp.where(nan_block, -126, exps)  # the row is NaN anyway: its NaN blocks must not shift the others
    return _rows_to_fp8(values, exps, jnp.any(nan_block, axis=1), MX_BLOCK)


@functools.partial(jax.jit, static_argnames=("scale_rule", "block"))
def act_to_fp8(x, smooth=None, clip=1.0, exp_offset=0, *, scale_rule: str = "safe_ceil", block: int = MX_BLOCK):
    """MXFP4 activation quantization straight into the FP8 kernel's operand: (x8 e4m3 [M, K], s_x f32 [M],
    inexact_rows int32).

    The same numbers as ``mxfp4_linear.mxfp4_act_quant`` followed by :func:`reencode_rows` (block exponents, E2M1 rounding
    and E8M0 range of ``wanjax.numerics.fp4.quantize_mxfp4`` with ``nonfinite="nan"``; a row with a non-finite input
    gets a NaN scale), written as one chain of element-wise ops after two small reductions (block abs-max, row max)
    so XLA fuses it into few passes over x with no f32 intermediate in memory.
    """
    m, k = x.shape
    xg = reference.smooth_act(x, smooth).reshape(m, k // block, block)
    amax, bad = _group_amax(xg)
    e = mx_shared_exponent(amax, scale_rule, exp_offset, clip)
    y = jnp.clip(ldexp_exact(xg, -e[..., None]), -E2M1_MAX, E2M1_MAX)
    v = jnp.where(bad[..., None], 0.0, e2m1_decode(e2m1_encode(y)))
    e = jnp.where(bad, -126, e)  # a non-finite block makes its row NaN; it must not shift the row's other blocks
    return _rows_to_fp8(v.reshape(m, k), e, jnp.any(bad, axis=1), block)
