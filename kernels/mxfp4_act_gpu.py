"""MXFP4 activation quantization straight into the FP8 GEMM's operand, as one Pallas (Triton) kernel.

Same numbers as :func:`kernels.mxfp4_gpu.act_to_fp8` (the XLA version): per block of 32 elements along K, the shared
exponent of ``wanjax.numerics.fp4.mx_shared_exponent`` (from the bits of ``amax * clip``), E2M1 rounding (ties to
the even code, saturating at 6), then each token re-encoded as e4m3 values times one power-of-two row scale
``2**max_block_exp`` (exact while a block's exponent is within 8 of the row's largest; rows with a rounded element are
counted). A block with a non-finite input gets exponent -126 and zero elements, and its row a NaN scale.

Per ``block_rows`` tokens the kernel walks K twice in chunks: pass 1 finds the block abs-maxes, the row's largest
block exponent and (``down`` given) the rank-r projection ``bf16(x) @ bf16(down / smooth)`` on the tensor cores; pass
2 re-reads the chunk, rounds to E2M1 and writes the e4m3 codes. The XLA version needs separate passes over x for the
block reduction, the row reduction and the element pass (timings of both: docs/BENCHMARKS.md, "The
activation-quantization kernels are instruction-bound").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from wanjax.numerics.codecs import E2M1_THRESHOLDS as _E2M1_THRESHOLDS
from wanjax.numerics.codecs import exp2_int as _exp2  # exact f32 2**n from the exponent bits
from wanjax.numerics.table import E2M1_MAX, MX_BLOCK_SIZE as MX_BLOCK

from .act_quant_gpu import _RNE_MAGIC

SCALE_RULES = ("safe_ceil", "ocp_floor")

# Tuning defaults: 64-row blocks, K in chunks of 128, 8 warps, 3 stages, chosen by the sweeps in docs/BENCHMARKS.md
# ("The activation-quantization kernels are instruction-bound"; chunk 64 measured about as fast).
BLOCK_ROWS, CHUNK, WARPS, STAGES = 64, 128, 8, 3
# the dispatcher's keyword options of act_to_fp8_pallas (block_rows, chunk, num_warps, ... may be added)
OPTIONS = {"fast": True}


def _block_exponent(amax, clip, exp_offset, safe_ceil: bool):
    """``mx_shared_exponent`` on int32 bit operations (amax >= 0 f32)."""
    bits = lax.bitcast_convert_type(amax * clip, jnp.int32)
    f = (bits >> 23) - 127
    e = f - 2
    if safe_ceil:
        e = e + ((bits & 0x7FFFFF) > 0x400000).astype(jnp.int32)
    e = jnp.clip(e + exp_offset, -126, 127)
    return jnp.where(f <= -127, -126, e)


def _e2m1_round(y):
    """Nearest E2M1 value of ``y`` (|y| <= 6), ties to the even code; the sign of y is kept."""
    mag = jnp.abs(y)
    idx = jnp.zeros(y.shape, jnp.float32)
    for t, inclusive in _E2M1_THRESHOLDS:
        idx = idx + ((mag >= t) if inclusive else (mag > t)).astype(jnp.float32)
    v = jnp.where(idx <= 4.0, idx * 0.5, jnp.where(idx == 5.0, 3.0, jnp.where(idx == 6.0, 4.0, 6.0)))
    return jnp.where(y < 0, -v, v)


def _e2m1_round_fast(y, magic=_RNE_MAGIC):
    """:func:`_e2m1_round` by rounding on the grid of y's binade: steps of 0.5 below 2, 1 below 4, 2 up to 6; ties to
    even multiples of the step are exactly E2M1's ties to the even code. ``magic`` (1.5 * 2**23) should be a run-time
    value inside jitted code: XLA folds ``(u + C) - C`` for a constant C."""
    mag = jnp.abs(y)
    lo, mid = mag < 2.0, mag < 4.0
    step = jnp.where(lo, 0.5, jnp.where(mid, 1.0, 2.0))
    inv_step = jnp.where(lo, 2.0, jnp.where(mid, 1.0, 0.5))  # selected, not divided (a division costs a MUFU op)
    v = ((mag * inv_step + magic) - magic) * step
    return jnp.where(y < 0, -v, v)


def supports(m: int, k: int, r: int, block_rows: int = BLOCK_ROWS, chunk: int = CHUNK) -> bool:
    """Whether :func:`act_to_fp8_pallas` handles this shape: M >= block_rows, chunk (a power of two, a multiple of
    32) dividing K, r = 0 or a power of two >= 16."""
    return (
        m >= block_rows
        and chunk % MX_BLOCK == 0
        and chunk & (chunk - 1) == 0
        and k % chunk == 0
        and (r == 0 or (r >= 16 and r & (r - 1) == 0))
    )


def _kernel(
    x_ref,
    sm_ref,
    dn_ref,
    clip_ref,
    off_ref,
    q_ref,
    s_ref,
    bad_ref,
    lr_ref,
    *,
    m,
    k,
    bm,
    ck,
    r,
    safe_ceil,
    reverse,
    programs,
    fast,
):
    """Row blocks of ``bm`` rows: one per program, or (``programs`` > 0) a persistent grid walking blocks pid,
    pid + programs, ... (trailing iterations redo the last block with identical values)."""
    import jax.experimental.pallas as pl

    body = functools.partial(
        _rows,
        x_ref,
        sm_ref,
        dn_ref,
        clip_ref,
        off_ref,
        q_ref,
        s_ref,
        bad_ref,
        lr_ref,
        k=k,
        bm=bm,
        ck=ck,
        r=r,
        safe_ceil=safe_ceil,
        reverse=reverse,
        fast=fast,
    )
    nblocks = -(-m // bm)
    pid = pl.program_id(0)
    if not programs:
        body(jnp.minimum(pid * bm, m - bm))  # the last block is shifted back to end at row M
        return

    def step(t, carry):
        body(jnp.minimum(jnp.minimum(pid + t * programs, nblocks - 1) * bm, m - bm))
        return carry

    lax.fori_loop(0, -(-nblocks // programs), step, 0)


def _rows(
    x_ref,
    sm_ref,
    dn_ref,
    clip_ref,
    off_ref,
    q_ref,
    s_ref,
    bad_ref,
    lr_ref,
    r0,
    *,
    k,
    bm,
    ck,
    r,
    safe_ceil,
    reverse,
    fast,
):
    """Rows [r0, r0 + bm): pass 1 (block exponents, row maximum, x_lr), pass 2 (E2M1 rounding, e4m3 codes)."""
    import jax.experimental.pallas as pl

    rows = pl.ds(r0, bm)
    nk, nb = k // ck, ck // MX_BLOCK
    clip, off, magic = clip_ref[0], off_ref[0], clip_ref[1]

    def blocks(j):
        """Chunk j: (raw x [bm, ck], smoothed x [bm, nb, 32] f32, block exponent [bm, nb], bad block [bm, nb])."""
        xc = x_ref[rows, pl.ds(j * ck, ck)]
        sm = sm_ref[pl.ds(j * ck, ck)][None, :]  # 1 / smooth with `fast` (a multiply, not a division)
        xs = (xc.astype(jnp.float32) * sm if fast else xc.astype(jnp.float32) / sm).reshape(bm, nb, MX_BLOCK)
        fin = jnp.isfinite(xs)
        amax = jnp.max(jnp.where(fin, jnp.abs(xs), 0.0), axis=2)
        bad = jnp.max(jnp.where(fin, 0, 1), axis=2) > 0
        e = jnp.where(bad, -126, _block_exponent(amax, clip, off, safe_ceil))
        return xc, xs, e, bad

    def pass1(j, carry):
        row_e, row_bad, acc = carry
        xc, _, e, bad = blocks(j)
        row_e = jnp.maximum(row_e, jnp.max(e, axis=1))
        row_bad = jnp.maximum(row_bad, jnp.max(bad.astype(jnp.int32), axis=1))
        if r:
            acc = acc + jnp.dot(
                xc.astype(jnp.bfloat16), dn_ref[pl.ds(j * ck, ck), :], preferred_element_type=jnp.float32
            )
        return row_e, row_bad, acc

    init = (jnp.full((bm,), -126, jnp.int32), jnp.zeros((bm,), jnp.int32), jnp.zeros((bm, max(r, 16)), jnp.float32))
    row_e, row_bad, acc = lax.fori_loop(0, nk, pass1, init)

    def pass2(i, inexact):
        j = nk - 1 - i if reverse else i  # reverse: the chunks pass 1 read last are the likeliest still in L2
        _, xs, e, bad = blocks(j)
        neg = -e[..., None]
        half = neg >> 1  # 2**-e applied in two halves: exact wherever the result is a normal f32
        y = jnp.clip(xs * _exp2(half) * _exp2(neg - half), -E2M1_MAX, E2M1_MAX)
        v = jnp.where(bad[..., None], 0.0, _e2m1_round_fast(y, magic) if fast else _e2m1_round(y))
        shift = jnp.maximum(e - row_e[:, None], -126)
        y8 = v * _exp2(shift)[..., None]
        f8 = y8.astype(jnp.float8_e4m3fn)
        miss = jnp.max(jnp.max(jnp.where(f8.astype(jnp.float32) != y8, 1, 0), axis=2), axis=1)
        q_ref[rows, pl.ds(j * ck, ck)] = f8.reshape(bm, ck)
        return jnp.maximum(inexact, miss)

    inexact = lax.fori_loop(0, nk, pass2, jnp.zeros((bm,), jnp.int32))
    s_ref[rows] = jnp.where(row_bad > 0, jnp.float32(jnp.nan), _exp2(row_e))
    bad_ref[rows] = jnp.where(row_bad > 0, 0, inexact)
    if r:
        lr_ref[rows, :] = acc.astype(lr_ref.dtype)


def act_to_fp8_pallas(
    x,
    smooth=None,
    down=None,
    clip=1.0,
    exp_offset=0,
    *,
    scale_rule: str = "safe_ceil",
    block_rows: int = BLOCK_ROWS,
    chunk: int = CHUNK,
    num_warps: int = WARPS,
    num_stages: int = STAGES,
    reverse: bool = False,
    programs: int = 0,
    fast: bool = False,
    interpret: bool = False,
):
    """MXFP4 activation quantization into the FP8 kernel's operand in one Pallas (Triton) kernel.

    Args:
      x: activations [M, K] (bf16 or f32); smooth: optional [K] divisor; down: optional [K, r] low-rank down
        projection (r = 0 or a power of two >= 16).
      clip, exp_offset: block abs-max multiplier and MX exponent offset (scalars, may be traced).
      scale_rule: "safe_ceil" (the seed's, no saturation) or "ocp_floor".
      block_rows, chunk, num_warps, num_stages, reverse, programs: tuning (see the module docstring); ``reverse``
        walks pass 2 backwards over K, ``programs`` > 0 runs a persistent grid of that many programs; ``fast``
        multiplies by ``1 / smooth`` instead of dividing (block exponents can then differ where x / smooth lies
        within an ulp of a power of two) and rounds to E2M1 by the 1.5 * 2**23 trick (same results).
    Returns:
      (x8 float8_e4m3fn [M, K], s_x f32 [M], inexact_rows int32 (finite rows the e4m3 re-encoding rounded),
      x_lr bf16 [M, r] = bf16(x) @ bf16(down / smooth) or None).
    """
    import jax.experimental.pallas as pl
    from jax.experimental.pallas import triton as pltriton

    if scale_rule not in SCALE_RULES:
        raise ValueError(f"act_to_fp8_pallas: scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
    if x.ndim != 2:
        raise ValueError(f"act_to_fp8_pallas: x must be [M, K], got shape {x.shape}")
    m, k = x.shape
    r = 0 if down is None else down.shape[1]
    if smooth is not None and smooth.shape != (k,):
        raise ValueError(f"act_to_fp8_pallas: smooth must be [K={k}], got {smooth.shape}")
    if down is not None and down.shape[0] != k:
        raise ValueError(f"act_to_fp8_pallas: down must be [K={k}, r], got {down.shape}")
    if not supports(m, k, r, block_rows, chunk):
        raise ValueError(
            f"act_to_fp8_pallas: unsupported shape M={m}, K={k}, r={r} (needs M >= {block_rows}, K a "
            f"multiple of the chunk {chunk}, r = 0 or a power of two >= 16)"
        )
    sm = jnp.ones((k,), jnp.float32) if smooth is None else smooth.astype(jnp.float32)
    dn = (down.astype(jnp.float32) / sm[:, None]).astype(jnp.bfloat16) if r else jnp.zeros((k, 16), jnp.bfloat16)
    if fast:
        sm = 1.0 / sm
    clip_a = jnp.stack(
        [jnp.asarray(clip, jnp.float32).reshape(()), jnp.float32(_RNE_MAGIC)]
    )  # [clip, run-time 1.5*2**23]
    off_a = jnp.reshape(jnp.asarray(exp_offset, jnp.int32), (1,))
    nblocks = pl.cdiv(m, block_rows)
    progs = min(programs, nblocks) if programs > 0 else 0
    kern = functools.partial(
        _kernel,
        m=m,
        k=k,
        bm=block_rows,
        ck=chunk,
        r=r,
        safe_ceil=scale_rule == "safe_ceil",
        reverse=reverse,
        programs=progs,
        fast=fast,
    )
    x8, s, bad, lr = pl.pallas_call(
        kern,
        grid=(progs or nblocks,),
        out_shape=[
            jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((m,), jnp.float32),
            jax.ShapeDtypeStruct((m,), jnp.int32),
            jax.ShapeDtypeStruct((m, max(r, 16)), jnp.bfloat16),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(x, sm, dn, clip_a, off_a)
    return x8, s, jnp.sum(bad), (lr if r else None)
