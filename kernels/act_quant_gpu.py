"""Fused activation quantization for the W4A4 linear on GPU (and any XLA backend).

One jitted XLA function: smoothing divide, per-token abs-max x clip (or a static scale), round to int4 values in
int8, and the low-rank down projection ``x_lr = bf16(x / smooth) @ down``. XLA fuses the divide, the row reduction
and the quantize into one or two loop fusions over x, and the rank-r projection into one GEMM over the same x.

It follows exactly the op sequence of :func:`kernels.reference.act_quant` (same f32 divides and round-half-even), so
q_x and s_x are bit-identical to the reference on every backend that implements IEEE f32 division (measured on the
H100 by ``bench/kernels.py``). The measured H100 cost is reported in docs/BENCHMARKS.md ("Kernels"); a hand-written
Pallas kernel for this memory-bound pass was not written (see the report there for why and what it would save).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import reference


@functools.partial(jax.jit, static_argnames=("qmax", "fold_smooth"))
def act_quant_fused(x, smooth=None, down=None, clip=1.0, static_scale=None, qmax: int = reference.INT4_QMAX,
                    fold_smooth: bool = False):
  """(q_x int8 [M, K], s_x f32 [M], x_lr bf16 [M, r] or None) from x [M, K]; see ``reference.act_quant``.

  ``clip`` and ``static_scale`` may be traced scalars (e.g. indexed by a traced timestep bin), so changing them
  never recompiles. With ``fold_smooth`` the low-rank projection is computed as ``bf16(x) @ bf16(down / smooth)``
  (the GEMM then reads x directly instead of a materialized x / smooth); q_x and s_x are unchanged (bit-exact), x_lr
  differs from the reference by bf16 rounding only.
  """
  if x.ndim != 2:
    raise ValueError(f"act_quant_fused: x must be [M, K], got shape {x.shape}")
  if smooth is not None and smooth.shape != (x.shape[1],):
    raise ValueError(f"act_quant_fused: smooth must be [K={x.shape[1]}], got {smooth.shape}")
  if down is not None and down.shape[0] != x.shape[1]:
    raise ValueError(f"act_quant_fused: down must be [K={x.shape[1]}, r], got {down.shape}")
  if fold_smooth and smooth is not None and down is not None and down.shape[1] > 0:
    q, s = reference.quantize_act_int4(x, smooth, clip, static_scale, qmax)
    down_f = down.astype(jnp.float32) / smooth.astype(jnp.float32)[:, None]
    return q, s, reference.lowrank_down(x, down_f, None)
  return reference.act_quant(x, smooth, down, clip, static_scale, qmax)
