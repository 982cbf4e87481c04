"""Plain-jnp references for the W4A4 kernels (the ground truth every fast kernel is tested against).

Conventions (shared with ``wanjax.numerics``, which owns the int4 packing and the format table):

* int4 values are two's-complement codes in [-8, 7]; symmetric quantization uses [-7, 7].
* Packed weights: ``uint8`` array ``[N, K // 2]`` (K-major per output channel n). Byte ``j`` of a row holds
  ``k = 2j`` in the LOW nibble and ``k = 2j + 1`` in the HIGH nibble. This is the same bit layout as a little-endian
  packed ``jnp.int4`` array of shape ``[N, K]``.
* Activations: int4 values stored one per byte in ``int8`` ``[M, K]``, with one float32 scale per token ``s_x [M]``.
* W4A4 linear::

      out[m, n] = acc[m, n] * s_x[m] * s_w[n] + (x_lr @ up)[m, n] + bias[n]
      acc = sum_k q_x[m, k] * q_w[n, k]           (exact int32)
      x_lr = (x / smooth) @ down                  (low-rank branch, [M, r])

Numerics of the activation quantizer (the fast kernels reproduce this op sequence exactly):

    x_s   = f32(x) / f32(smooth)                  (skipped without smoothing)
    amax  = max_k |x_s|                           (per token)
    scale = amax * clip / qmax  (dynamic)  or  static_scale (static);  scale = 1 where it would be 0
    q     = clip(round_half_even(x_s / scale), -qmax, qmax)   -> int8
    x_lr  = bf16(dot(bf16(x_s), bf16(down), f32 accumulate))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from wanjax.numerics.pack import pack_int4, packed_as_int4, unpack_int4  # noqa: F401  (public names of the references)
from wanjax.numerics.table import INT4_QMAX  # symmetric int4 grid [-7, 7]

# int4 packing (pack_int4 / unpack_int4 / packed_as_int4) is owned by wanjax.numerics.pack: re-exported here, the
# references' public names.


# ----------------------------------------------------------------------------------------------------------------
# weight quantization (for tests and benchmarks; the production quantizer lives in wanjax.quant)
# ----------------------------------------------------------------------------------------------------------------
def quantize_weight_int4(w: jax.Array, qmax: int = INT4_QMAX) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel int4 RTN of ``w`` [N, K] -> (packed uint8 [N, K/2], s_w f32 [N])."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=1)
    s = jnp.where(amax > 0, amax / qmax, 1.0)
    q = jnp.clip(jnp.round(w / s[:, None]), -qmax, qmax).astype(jnp.int8)
    return pack_int4(q), s


# ----------------------------------------------------------------------------------------------------------------
# activation quantization
# ----------------------------------------------------------------------------------------------------------------
def smooth_act(x: jax.Array, smooth: jax.Array | None) -> jax.Array:
    """f32(x) / smooth (f32); identity cast without a smoothing vector."""
    xf = x.astype(jnp.float32)
    if smooth is None:
        return xf
    return xf / smooth.astype(jnp.float32)


def act_scale(x_s: jax.Array, clip=1.0, static_scale=None, qmax: int = INT4_QMAX) -> jax.Array:
    """Per-token scale [M] (f32) of smoothed activations ``x_s`` [M, K].

    ``clip`` (scalar, may be traced) multiplies the per-token abs-max; ``static_scale`` (scalar), when given, replaces
    the dynamic scale for every token.
    """
    m = x_s.shape[0]
    if static_scale is not None:
        s = jnp.broadcast_to(jnp.asarray(static_scale, jnp.float32), (m,))
    else:
        amax = jnp.max(jnp.abs(x_s), axis=1)
        s = amax * jnp.asarray(clip, jnp.float32) / jnp.float32(qmax)
    return jnp.where(s > 0, s, jnp.float32(1.0))


def quantize_act_int4(
    x: jax.Array,
    smooth: jax.Array | None = None,
    clip=1.0,
    static_scale=None,
    qmax: int = INT4_QMAX,
) -> tuple[jax.Array, jax.Array]:
    """Per-token symmetric int4 quantization of x [M, K] -> (q int8 [M, K] in [-qmax, qmax], s_x f32 [M])."""
    x_s = smooth_act(x, smooth)
    s = act_scale(x_s, clip, static_scale, qmax)
    q = jnp.clip(jnp.round(x_s / s[:, None]), -qmax, qmax).astype(jnp.int8)
    return q, s


def lowrank_down(x: jax.Array, down: jax.Array | None, smooth: jax.Array | None = None) -> jax.Array | None:
    """x_lr = bf16(bf16(x / smooth) @ bf16(down)) with f32 accumulation; ``down`` is [K, r]. None if no branch."""
    if down is None or down.shape[1] == 0:
        return None
    x_s = smooth_act(x, smooth).astype(jnp.bfloat16)
    y = lax.dot_general(x_s, down.astype(jnp.bfloat16), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(jnp.bfloat16)


def act_quant(
    x: jax.Array,
    smooth: jax.Array | None = None,
    down: jax.Array | None = None,
    clip=1.0,
    static_scale=None,
    qmax: int = INT4_QMAX,
):
    """The fused activation-quantization contract: returns (q_x int8 [M,K], s_x f32 [M], x_lr bf16 [M,r] or None)."""
    q, s = quantize_act_int4(x, smooth, clip, static_scale, qmax)
    return q, s, lowrank_down(x, down, smooth)


# ----------------------------------------------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------------------------------------------
def int_matmul_nt(q_x: jax.Array, q_w: jax.Array) -> jax.Array:
    """Exact int32 product q_x [M, K] (int8) x q_w [N, K] (int8)^T -> [M, N] int32 (upcast first: CPU-safe)."""
    return lax.dot_general(
        q_x.astype(jnp.int32),
        q_w.astype(jnp.int32),
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.int32,
    )


def w4a4_epilogue(acc, s_x, s_w, x_lr=None, up=None, bias=None, out_dtype=jnp.bfloat16):
    """acc(int32) * s_x[m] * s_w[n] + x_lr @ up + bias, in f32, cast to ``out_dtype``."""
    y = acc.astype(jnp.float32) * s_x.astype(jnp.float32)[:, None] * s_w.astype(jnp.float32)[None, :]
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    if x_lr is not None and up is not None and up.shape[0] > 0:
        y = y + lax.dot_general(
            x_lr.astype(jnp.bfloat16),
            up.astype(jnp.bfloat16),
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
    return y.astype(out_dtype)


def w4a4_matmul(q_x, s_x, w_packed, s_w, x_lr=None, up=None, bias=None, out_dtype=jnp.bfloat16):
    """Reference W4A4 GEMM: q_x int8 [M,K], s_x [M], w_packed uint8 [N,K/2], s_w [N], x_lr [M,r], up [r,N], bias [N]."""
    acc = int_matmul_nt(q_x, unpack_int4(w_packed))
    return w4a4_epilogue(acc, s_x, s_w, x_lr, up, bias, out_dtype)


def w4a4_linear(
    x,
    w_packed,
    s_w,
    smooth=None,
    down=None,
    up=None,
    bias=None,
    clip=1.0,
    static_scale=None,
    out_dtype=jnp.bfloat16,
):
    """Reference W4A4 linear layer end to end: act quant (+ low-rank down) then the W4A4 GEMM."""
    q, s, x_lr = act_quant(x, smooth, down, clip, static_scale)
    return w4a4_matmul(q, s, w_packed, s_w, x_lr, up, bias, out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# group-scaled weights (one scale per output channel and group of `group_size` along K)
# ----------------------------------------------------------------------------------------------------------------
def quantize_weight_int4_grouped(w: jax.Array, group_size: int = 128, qmax: int = INT4_QMAX):
    """Symmetric int4 RTN of ``w`` [N, K] with one scale per (channel, group of ``group_size`` along K)
    -> (packed uint8 [N, K/2], s_w f32 [N, K/group_size])."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"quantize_weight_int4_grouped: K={k} is not a multiple of group_size={group_size}")
    wg = w.astype(jnp.float32).reshape(n, k // group_size, group_size)
    amax = jnp.max(jnp.abs(wg), axis=2)
    s = jnp.where(amax > 0, amax / qmax, 1.0)
    q = jnp.clip(jnp.round(wg / s[..., None]), -qmax, qmax).astype(jnp.int8).reshape(n, k)
    return pack_int4(q), s


def int_matmul_nt_grouped(q_x: jax.Array, q_w: jax.Array, group_size: int = 128) -> jax.Array:
    """Exact int32 per-group products: [G, M, N] with [g] = q_x[:, group g] @ q_w[:, group g]^T (G = K/group_size)."""
    m, k = q_x.shape
    n = q_w.shape[0]
    g = k // group_size
    xg = q_x.astype(jnp.int32).reshape(m, g, group_size)
    wg = q_w.astype(jnp.int32).reshape(n, g, group_size)
    return lax.dot_general(xg, wg, (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32)


def group_scaled_acc(q_x, q_w, s_w, group_size: int = 128, int_dot=int_matmul_nt):
    """f32 [M, N] = sum_g f32(q_x[:, g] @ q_w[:, g]^T) * s_w[:, g], groups accumulated in order g = 0, 1, ... (the
    kernel's order). ``int_dot`` computes one group's exact int32 product (default: the int32-upcast reference dot)."""
    m, k = q_x.shape
    n = q_w.shape[0]
    ng = k // group_size
    if k % group_size or s_w.shape != (n, ng):
        raise ValueError(
            f"group_scaled_acc: K={k} must be a multiple of group_size={group_size} and s_w [N={n}, {ng}], "
            f"got s_w {s_w.shape}"
        )
    xg = jnp.moveaxis(q_x.reshape(m, ng, group_size), 1, 0)  # [G, M, g]
    wg = jnp.moveaxis(q_w.reshape(n, ng, group_size), 1, 0)  # [G, N, g]
    swt = s_w.astype(jnp.float32).T  # [G, N]

    def step(acc, xs):
        xq, wq, s = xs
        return acc + int_dot(xq, wq).astype(jnp.float32) * s[None, :], None

    acc, _ = lax.scan(step, jnp.zeros((m, n), jnp.float32), (xg, wg, swt))
    return acc


def w4a4_g128_reference(q_x, s_x, w, s_w, x_lr=None, up=None, bias=None, out_dtype=jnp.bfloat16, group_size=128):
    """Reference group-scaled W4A4 GEMM::

        out[m, n] = s_x[m] * sum_g s_w[n, g] * (sum_{k in g} q_x[m, k] q_w[n, k]) + (x_lr @ up)[m, n] + bias[n]

    q_x int8 [M, K] (int4 values), s_x [M], w packed uint8 [N, K/2] or int8 [N, K] (int4 values), s_w [N, K/group_size],
    x_lr [M, r], up [r, N], bias [N]. f32 math (exact int32 per group), cast to ``out_dtype``.
    """
    q_w = unpack_int4(w) if w.dtype == jnp.uint8 else w
    acc = group_scaled_acc(q_x, q_w, s_w, group_size)
    return w4a4_epilogue(acc, s_x, jnp.ones((q_w.shape[0],), jnp.float32), x_lr, up, bias, out_dtype)
