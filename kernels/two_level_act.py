"""Activation quantization to carried int8 codes of two-level integer group scales (XLA / jnp only).

``x [M, K]`` (smoothed, optionally rotated, as ``dispatch.act_quant`` does) is quantized per token with
``wanjax.numerics.two_level`` (one unit ``u_x`` per token, an integer multiplier ``m <= L`` per group of K) and
returned as the carried int8 values ``c_x = q * m`` with the per-token scale ``u_x``: the operands of the
per-channel int8 GEMM (``dispatch.w4a4_matmul(c_x, u_x, ..., a_qmax=127)``), which then computes the
group-scaled product exactly.

There is no Pallas version: the fused Triton act-quant kernel (``act_quant_gpu``) emits per-token INT4 / INT8 codes
with one scale a token and cannot produce the group multipliers, so this runs as one jitted XLA function on every
backend (``reference`` included: it is its own reference, the numerics quantizer).
"""

from __future__ import annotations

import functools

import jax

from wanjax.numerics.two_level import quantize_int4_two_level

from . import reference

__all__ = ["two_level_act_quant"]


def two_level_act_quant(x, smooth=None, down=None, clip=1.0, *, group_size: int, levels: int):
    """``x [M, K]`` -> ``(c_x int8 [M, K], u_x f32 [M], x_lr bf16 [M, r] or None)``.

    ``c_x = q * m``: INT4 codes times their group multipliers (|c_x| <= 7 * levels <= 126), ``u_x`` the token units
    (``clip`` multiplies them; may be traced), ``x_lr = bf16(bf16(x / smooth) @ bf16(down))`` as in
    ``kernels.reference.act_quant``. Rows with non-finite input get ``u_x`` NaN (their outputs NaN).
    """
    return _two_level_act_quant(x, smooth, down, clip, group_size=group_size, levels=levels)


@functools.partial(jax.jit, static_argnames=("group_size", "levels"))
def _two_level_act_quant(x, smooth, down, clip, group_size, levels):
    x_s = reference.smooth_act(x, smooth)
    tl = quantize_int4_two_level(x_s, group_size, levels, clip=clip, nonfinite="nan")
    return tl.carried(), tl.unit[:, 0], reference.lowrank_down(x, down, smooth)
