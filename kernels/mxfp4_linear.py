"""The MXFP4 W4A4 linears below the routing: activation quantization, operand checks, the kernel paths' glue.

``kernels.dispatch.mxfp4_matmul`` / ``mxfp4_linear`` / ``mxfp4_linear_fp8`` choose among these:

* :func:`mxfp4_act_quant` - MXFP4 activation quantization to decoded operands (values, block exponents), exactly
  ``wanjax.numerics.fp4.quantize_mxfp4`` then ``mxfp4_decode``;
* :func:`pallas_matmul` - the FP8 re-encoding + FP8 ``wgmma`` GEMM (``kernels.mxfp4_gpu``), M padded for the kernel;
* :func:`nan_rows` - blocks with the E8M0 NaN exponent make their output row (x) or column (w) NaN;
* :func:`act_to_fp8_fused` / :func:`act_to_fp8_xla` - the activation side of the prepared-weights path
  (one Triton kernel, ``kernels.mxfp4_act_gpu``; or the XLA ``mxfp4_gpu.act_to_fp8`` and a separate low-rank GEMM);
* :func:`fp8_gpu_matmul` / :func:`fp8_tpu_matmul` - the FP8 GEMM on e4m3 rows and row scales (GPU / TPU7x);
* the XLA dots are in ``kernels.xla_paths``.
"""

from __future__ import annotations

import jax.numpy as jnp

from wanjax.numerics.fp4 import MX_NAN_EXP, mxfp4_decode, quantize_mxfp4
from wanjax.numerics.table import MX_BLOCK_SIZE

from . import mxfp4_act_gpu, reference

__all__ = [
    "MXFP4_BLOCK",
    "MX_NAN_EXP",
    "act_to_fp8_fused",
    "act_to_fp8_xla",
    "check_fp8_weights",
    "check_operands",
    "fp8_gpu_matmul",
    "fp8_tpu_matmul",
    "mxfp4_act_quant",
    "mxfp4_decode",
    "nan_rows",
    "pallas_matmul",
]

MXFP4_BLOCK = MX_BLOCK_SIZE  # 32


def mxfp4_act_quant(x, smooth=None, clip=1.0, exp_offset=0, *, scale_rule: str = "safe_ceil", block: int = MXFP4_BLOCK):
    """MXFP4 activation quantization of ``x [M, K]`` (after ``/ smooth``): (values f32 [M, K], exps int32 [M, K/block]).

    Exactly ``wanjax.numerics.fp4.quantize_mxfp4`` (``nonfinite="nan"``: a block with a non-finite input gets exponent
    128, which makes its output row NaN as in fake mode); ``clip`` and ``exp_offset`` may be traced.
    """
    xs = reference.smooth_act(x, smooth)
    qt = quantize_mxfp4(xs, scale_rule=scale_rule, exp_offset=exp_offset, clip=clip, block_size=block, nonfinite="nan")
    return mxfp4_decode(qt.codes, qt.scales, block)


def check_operands(xv, xe, wv, we, block):
    """Shapes of decoded MXFP4 operands: xv [M, K], xe [M, K/block], wv [N, K], we [N, K/block]."""
    (m, k), n = xv.shape, wv.shape[0]
    if wv.shape[1] != k or xe.shape != (m, k // block) or we.shape != (n, k // block):
        raise ValueError(
            f"mxfp4_matmul: xv [M, K], xe [M, K/{block}], wv [N, K], we [N, K/{block}] expected, got "
            f"{xv.shape}, {xe.shape}, {wv.shape}, {we.shape}"
        )


def pallas_matmul(xv, xe, wv, we, x_lr, up, bias, *, config=None, interpret: bool = False):
    """The ``kernels.mxfp4_gpu`` path: (y f32 [M, N] before the NaN rows, inexact rows int32)."""
    from .mxfp4_gpu import mxfp4_matmul_gpu
    from .w4a4_gpu import DEFAULT_CONFIG

    m = xv.shape[0]
    # the Mosaic GPU GEMM needs M >= tile_m and (lowering for CUDA) M % 8 == 0: pad with zero rows (exact, not
    # counted), cut them off after
    mp = max((config or DEFAULT_CONFIG).tile_m, -(-m // 8) * 8)
    pad = ((0, mp - m), (0, 0))
    xv_p, xe_p = jnp.pad(xv, pad), jnp.pad(xe, pad, constant_values=-126)
    x_lr_p = None if x_lr is None else jnp.pad(x_lr, pad)
    y, bad_x, bad_w = mxfp4_matmul_gpu(
        xv_p, xe_p, wv, we, x_lr_p, up, bias, out_dtype=jnp.float32, config=config, interpret=interpret
    )
    return y[:m], (bad_x + bad_w).astype(jnp.int32)


def nan_rows(y, xe, we):
    """``y`` with NaN where a block of x (row) or of w (column) carries the E8M0 NaN exponent."""
    nan_x = jnp.any(xe >= MX_NAN_EXP, axis=1)
    nan_w = jnp.any(we >= MX_NAN_EXP, axis=1)
    return jnp.where(nan_x[:, None] | nan_w[None, :], jnp.float32(jnp.nan), y)


def check_fp8_weights(w8, s_w, k: int) -> None:
    """Prepared weights: w8 float8_e4m3fn [N, K] and s_w [N] (from ``mxfp4_gpu.prepare_weights``)."""
    n = w8.shape[0]
    if w8.ndim != 2 or w8.shape[1] != k or w8.dtype != jnp.float8_e4m3fn or s_w.shape != (n,):
        raise ValueError(
            f"mxfp4_linear_fp8: w8 float8_e4m3fn [N, K={k}] and s_w [N] expected (from "
            f"mxfp4_gpu.prepare_weights), got w8 {w8.dtype} {w8.shape}, s_w {s_w.shape}"
        )


def act_to_fp8_fused(x2, smooth, down, clip, exp_offset, scale_rule):
    """One Triton kernel: block exponents, E2M1 rounding, e4m3 re-encoding and the rank-r projection
    -> (x8, s_x, inexact, x_lr). x_lr = bf16(x) @ bf16(down / smooth): bf16 rounding away from the reference's
    bf16(x / smooth) @ down."""
    return mxfp4_act_gpu.act_to_fp8_pallas(
        x2, smooth, down, clip, exp_offset, scale_rule=scale_rule, **mxfp4_act_gpu.OPTIONS
    )


def act_to_fp8_xla(x2, smooth, down, clip, exp_offset, scale_rule):
    """The XLA ``mxfp4_gpu.act_to_fp8`` and a separate low-rank GEMM -> (x8, s_x, inexact, x_lr)."""
    from .mxfp4_gpu import act_to_fp8

    x8, s_x, inexact = act_to_fp8(x2, smooth, clip, exp_offset, scale_rule=scale_rule)
    x_lr = None if down is None else reference.lowrank_down(x2, down, smooth)
    return x8, s_x, inexact, x_lr


def fp8_gpu_matmul(x8, s_x, w8, s_w, x_lr, up, bias, out_dtype):
    """The FP8 ``wgmma`` kernel of ``w4a4_gpu`` on e4m3 rows and row scales."""
    from .w4a4_gpu import w4a4_matmul_gpu_any_m

    return w4a4_matmul_gpu_any_m(x8, s_x, w8, s_w, x_lr, up, bias, out_dtype=out_dtype, weights="fp8")


def fp8_tpu_matmul(x8, s_x, w8, s_w, x_lr, up, bias, out_dtype):
    """TPU7x: the FP8 MXU (``w4a4_tpu`` "fp8") on the same e4m3 rows and row scales."""
    from .w4a4_tpu import w4a4_matmul_tpu

    return w4a4_matmul_tpu(x8, s_x, w8, s_w, x_lr, up, bias, out_dtype=out_dtype, mode="fp8")
