"""8-bit attention for TPU in Pallas (Mosaic TPU): INT8 QK^T on the MXU, f32 online softmax, FP8-rounded P and V.

The same numbers as ``attention8_reference`` (its pre-pass makes the operands; this kernel is the core): grid
(batch, head, query tile, KV tile) with the KV axis innermost ("arbitrary"); per step

* ``S = q8 @ k8^T`` as an int8 x int8 -> int32 MXU dot (v5e/v5p/v6e have an integer MXU mode), then
  ``s = float(S) * row_scale * col_scale`` with the row scale pre-multiplied by ``sm_scale * log2(e)``;
  padded keys -> -inf;
* running max / sum in f32 VMEM scratch, ``P = exp2(s - (m - log2 448))``, ``P8 = e4m3(P)``;
* PV into a fresh f32 product added into the f32 accumulator (the two-level scheme; the TPU MXU accumulates in f32,
  so there is no FP22 leak to guard against, but the order of operations is the reference's):
  - ``pv="bf16"`` (v5e/v5p/v6e, no FP8 MXU): P8 and V8 converted to bf16 -- exact, every e4m3 value is a bf16
    value -- and a bf16 x bf16 -> f32 dot: the same products as FP8;
  - ``pv="fp8"`` (TPU7x): an e4m3 x e4m3 -> f32 dot;
* the last KV step writes ``acc / l * v_scale`` in bf16.

The query and key tiles are ``config.q_block`` and ``config.kv_block`` (the reference's KV tiling, so the FP8
rounding of P sees the same running max). Scales arrive per token (f32, tiny next to the operands).

Status: verified in the Pallas interpreter on CPU against the reference and lowered for the "tpu" platform on a CPU
host; **never run on a real TPU** (none was available): MXU speed, VMEM fit and Mosaic's layout passes for the
(block, 1) statistics are unverified.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import tpu as pltpu

from wanjax.numerics.codecs import fp8_e4m3_encode

from .attention8_reference import DEFAULT, LOG2E, P_OFFSET, Attn8Config, QKV8, quantize_qkv

NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))
PV_MODES = ("bf16", "fp8")


def _kernel(q_ref, k_ref, v_ref, row_ref, col_ref, vs_ref, o_ref, m_sc, l_sc, acc_sc, *, sk, block_kv, nkv, pv, offset):
    j = pl.program_id(3)
    f32 = jnp.float32

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, f32)
        l_sc[...] = jnp.zeros(l_sc.shape, f32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, f32)

    s32 = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.int32)
    s = s32.astype(f32) * row_ref[...] * col_ref[...]
    key = j * block_kv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(key < sk, s, -jnp.inf)
    m_old = m_sc[...]
    m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp2(m_old - m_new)
    p = jnp.exp2(s - (m_new - offset))
    l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    p8 = fp8_e4m3_encode(p)
    v8 = v_ref[...]
    if pv == "bf16":
        p8, v8 = p8.astype(jnp.bfloat16), v8.astype(jnp.bfloat16)
    acc_sc[...] = acc_sc[...] * alpha + lax.dot_general(p8, v8, NN, preferred_element_type=f32)

    @pl.when(j == nkv - 1)
    def _out():
        o_ref[...] = (acc_sc[...] / l_sc[...] * vs_ref[...]).astype(o_ref.dtype)


def attention8_tpu_core(
    x: QKV8, config: Attn8Config = DEFAULT, *, pv: str = "bf16", out_dtype=jnp.bfloat16, interpret=False
) -> jax.Array:
    """The Pallas TPU core on pre-quantized operands; returns [B, Sq, N, D] in ``out_dtype``."""
    if pv not in PV_MODES:
        raise ValueError(f"attention8_tpu: pv must be one of {PV_MODES}, got {pv!r}")
    b, n, sqp, d = x.q.shape
    skp = x.k.shape[2]
    bq, bkv = config.q_block, config.kv_block
    if sqp % bq or skp % bkv:
        raise ValueError(
            f"attention8_tpu: padded lengths {sqp}, {skp} must be multiples of q_block={bq}, "
            f"kv_block={bkv} (use the pre-pass of the same config)"
        )
    nkv = skp // bkv
    row = (x.q_scale_tokens() * jnp.float32(LOG2E / math.sqrt(d)))[..., None]  # [B, N, Sq_pad, 1]
    col = x.k_scale_tokens()[:, :, None, :]  # [B, N, 1, Sk_pad]
    vs = x.v_scale[:, :, None, :]  # [B, N, 1, D]
    kern = functools.partial(
        _kernel, sk=x.sk, block_kv=bkv, nkv=nkv, pv=pv, offset=float(P_OFFSET if config.p_offset else 0.0)
    )
    if not (config.two_level and not config.fp22):
        raise ValueError("attention8_tpu: the TPU accumulates in f32; fp22 / single-level are reference-only models")
    out = pl.pallas_call(
        kern,
        grid=(b, n, sqp // bq, nkv),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), lambda i, h, qi, j: (i, h, qi, 0)),
            pl.BlockSpec((None, None, bkv, d), lambda i, h, qi, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, bkv, d), lambda i, h, qi, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda i, h, qi, j: (i, h, qi, 0)),
            pl.BlockSpec((None, None, 1, bkv), lambda i, h, qi, j: (i, h, 0, j)),
            pl.BlockSpec((None, None, 1, d), lambda i, h, qi, j: (i, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bq, d), lambda i, h, qi, j: (i, h, qi, 0)),
        out_shape=jax.ShapeDtypeStruct((b, n, sqp, d), out_dtype),
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(x.q, x.k, x.v, row, col, vs)
    return out[:, :, : x.sq].transpose(0, 2, 1, 3)


def attention8_tpu(
    q, k, v, *, config: Attn8Config = DEFAULT, pv: str = "bf16", out_dtype=jnp.bfloat16, interpret=False
) -> jax.Array:
    """Pre-pass (``attention8_reference.quantize_qkv``, plain XLA) + the Pallas TPU core."""
    return attention8_tpu_core(quantize_qkv(q, k, v, config), config, pv=pv, out_dtype=out_dtype, interpret=interpret)
