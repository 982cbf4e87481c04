"""The XLA paths of the quantized linears: the same math as the Pallas kernels with XLA ops (any platform).

``kernels.dispatch`` picks these on the "xla" backend, on shapes the kernels do not tile, and on platforms without
the kernels; they are fast everywhere and exact where the kernels are (integer accumulation, exact dequantization):

* :func:`w4a4_matmul` - int8 x int8 -> int32 ``dot_general`` (cuBLASLt IMMA on GPU, int8 MXU on TPU); with
  ``fp8_mxu`` (TPU7x, no integer MXU) an e4m3 x e4m3 -> f32 dot of the same int4 values; epilogue in f32;
* :func:`w4a4_grouped_matmul` - group-scaled weights: an exact int32 product per group, f32 accumulation in order;
* :func:`rotate_smoothed` - the run-time Hadamard rotation of the smoothed input as one XLA pass;
* :func:`mxfp4_matmul` - MXFP4 x MXFP4 on decoded operands: exact bf16 (or f32 for the reference) dequantization;
* :func:`fp8_matmul` - the e4m3 operands of the MXFP4 kernel path, upcast exactly to bf16 (or f32).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from wanjax.numerics.hadamard import rotate_activations_mxu

from . import reference

__all__ = [
    "fp8_matmul",
    "int8_weights",
    "mx_dequant",
    "mxfp4_matmul",
    "rotate_smoothed",
    "w4a4_grouped_matmul",
    "w4a4_matmul",
]


def int8_weights(w):
    """int4 weights as int8 [N, K]: packed uint8 [N, K/2] unpacked (one XLA pass), int8 passed through."""
    return w if w.dtype == jnp.int8 else reference.unpack_int4(w)


def w4a4_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, *, fp8_mxu: bool = False):
    """Per-channel W4A4 GEMM with XLA: exact int32 (or, ``fp8_mxu``, exact f32) accumulation, f32 epilogue."""
    q_w = int8_weights(w_packed)
    if fp8_mxu:
        # TPU7x has no integer MXU: int4 values are exact in e4m3 and their f32 sums exact below 2**24 (w4a4_tpu "fp8")
        f8 = jnp.float8_e4m3fn
        acc = lax.dot_general(
            q_x.astype(f8), q_w.astype(f8), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
    else:
        acc = lax.dot_general(q_x, q_w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return reference.w4a4_epilogue(acc, s_x, s_w, x_lr, up, bias, out_dtype)


def w4a4_grouped_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, group_size):
    """Group-scaled W4A4 GEMM with XLA (``s_w`` [N, K/group_size])."""
    # exact int32 product per group (int8 x int8 dot), f32 accumulation of the scaled groups in order
    int_dot = lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    acc = reference.group_scaled_acc(q_x, int8_weights(w_packed), s_w, group_size, int_dot=int_dot)
    return reference.w4a4_epilogue(acc, s_x, jnp.ones((acc.shape[1],), jnp.float32), x_lr, up, bias, out_dtype)


def rotate_smoothed(x, smooth, rot_signs, block: int):
    """``rotate_activations_mxu(x / smooth, rot_signs, block)``: the rotation as an XLA pass before the act quant."""
    return rotate_activations_mxu(reference.smooth_act(x, smooth), rot_signs, block)


def mx_dequant(v, e, block, dtype):
    """Exact ``v * 2**e`` per block (``mxfp4_gpu.dequantize``; NaN-block exponents clamped to 127, their rows are
    set to NaN after the dot), cast to ``dtype`` (exact for bf16/f32: E2M1 values times a power of two need 2
    significant bits)."""
    from .mxfp4_gpu import dequantize

    return dequantize(v, jnp.minimum(e, 127), block).astype(dtype)


def mxfp4_matmul(xv, xe, wv, we, x_lr, up, bias, block, *, exact: bool):
    """MXFP4 GEMM on decoded operands, f32 [M, N] before the NaN rows: ``exact`` (the reference) dequantizes to f32
    and dots at HIGHEST precision, else bf16 x bf16 -> f32 (every MXFP4 value is a bf16: products exact)."""
    m, n = xv.shape[0], wv.shape[0]
    dt = jnp.float32 if exact else jnp.bfloat16
    prec = lax.Precision.HIGHEST if exact else None
    acc = lax.dot_general(
        mx_dequant(xv, xe, block, dt),
        mx_dequant(wv, we, block, dt),
        (((1,), (1,)), ((), ())),
        precision=prec,
        preferred_element_type=jnp.float32,
    )
    return reference.w4a4_epilogue(
        acc, jnp.ones((m,), jnp.float32), jnp.ones((n,), jnp.float32), x_lr, up, bias, jnp.float32
    )


def fp8_matmul(x8, s_x, w8, s_w, x_lr, up, bias, out_dtype, *, exact: bool):
    """e4m3 x e4m3 GEMM with row scales: exact bf16 upcast (f32 HIGHEST with ``exact``), f32 accumulation."""
    dt, prec = (jnp.float32, lax.Precision.HIGHEST) if exact else (jnp.bfloat16, None)
    acc = lax.dot_general(
        x8.astype(dt), w8.astype(dt), (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
    )
    return reference.w4a4_epilogue(acc, s_x, s_w, x_lr, up, bias, out_dtype)
