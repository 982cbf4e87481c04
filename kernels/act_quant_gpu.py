"""Fused activation quantization for the W4A4 linear on GPU (and any XLA backend).

Three implementations of ``kernels.reference.act_quant`` (smoothing divide, per-token abs-max x clip or a static
scale, round half-even to int4 values in int8, low-rank down projection ``x_lr = bf16(x / smooth) @ down``):

* :func:`act_quant_fused` - one jitted XLA function (the default). On a GPU XLA makes it a row-reduction pass and a
  quantize pass over x plus one rank-r GEMM over x. It follows the reference's op sequence: checked on a GPU, the
  codes were identical to the CPU reference on the rows compared and the scales within 1 ulp (XLA backends may fold
  the constant divide differently). ``fold_smooth=True`` computes x_lr as ``bf16(x) @ bf16(down / smooth)`` so the
  GEMM reads x directly instead of a smoothed copy (faster; x_lr changes by bf16 rounding only).
* :func:`act_quant_pallas` - a single-pass Pallas quantizer (:func:`quantize_rows_pallas`, Triton backend: one row
  block in registers, read x once, write the codes once) plus the folded XLA GEMM. Faster than the XLA version at
  K=5120, slower at K=13824 (docs/BENCHMARKS.md, "Kernels"); Triton's f32 division is not correctly rounded, so
  ~1e-7 of the codes differ by one from the reference at exact rounding ties.
* :func:`act_quant_lowrank_pallas` - everything in one Pallas (Triton) kernel: per 64-row block, one pass over K for
  the abs-max and the rank-r projection on the tensor cores, a second pass for the codes. The dispatcher's default on
  a GPU, with ``fast=True`` (reciprocal multiplies, rounding by 1.5 * 2**23), the fastest of the three. The kernel
  is bound by instruction issue, not HBM, which is why ``fast`` and ``int_round`` pay (docs/BENCHMARKS.md, "The
  activation-quantization kernels are instruction-bound").

Timings of all three: docs/BENCHMARKS.md ("Activation quantization ..." and the sections after it).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.numerics.hadamard import hadamard_matrix

from . import reference


@functools.partial(jax.jit, static_argnames=("qmax", "fold_smooth"))
def act_quant_fused(
    x, smooth=None, down=None, clip=1.0, static_scale=None, qmax: int = reference.INT4_QMAX, fold_smooth: bool = False
):
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


# ----------------------------------------------------------------------------------------------------------------
# Single-pass Pallas kernel (Triton backend): per-token abs-max and quantization with the row in registers.
# ----------------------------------------------------------------------------------------------------------------
def _next_pow2(v: int) -> int:
    return 1 << (int(v) - 1).bit_length()


def _quant_rows_kernel(x_ref, sm_ref, cs_ref, q_ref, s_ref, *, k, qmax, static, use_smooth):
    """One block of rows [bm, bk] (bk = next power of two >= K, masked): x_s, scale, codes."""
    import jax.experimental.pallas as pl
    from jax.experimental.pallas import triton as pltriton

    bm, bk = x_ref.shape
    cols = jnp.arange(bk)
    cmask = cols < k
    x = pltriton.load(x_ref, mask=cmask[None, :], other=0.0).astype(jnp.float32)
    if use_smooth:
        sm = pltriton.load(sm_ref, mask=cmask, other=1.0).astype(jnp.float32)
        x = x / sm[None, :]
    c = cs_ref[0]  # clip (dynamic) or the static scale
    if static:
        s = jnp.full((bm,), c, jnp.float32)
    else:
        s = jnp.max(jnp.abs(x), axis=1) * c / jnp.float32(qmax)
    s = jnp.where(s > 0, s, jnp.float32(1.0))
    # Pallas Triton has no `round`: round half to even from floor (exact here: |t| <= qmax after the clip, which
    # commutes with rounding at integer bounds).
    t = jnp.clip(x / s[:, None], -qmax, qmax)
    f = jnp.floor(t)
    d = t - f
    odd = f - 2.0 * jnp.floor(f * 0.5)
    q = (f + jnp.where(d > 0.5, 1.0, jnp.where(d == 0.5, odd, 0.0))).astype(jnp.int8)
    pltriton.store(q_ref, q, mask=cmask[None, :])
    s_ref[...] = s
    del pl


def quantize_rows_pallas(
    x,
    smooth=None,
    clip=1.0,
    static_scale=None,
    qmax: int = reference.INT4_QMAX,
    block_rows: int | None = None,
    num_warps: int | None = None,
    interpret: bool = False,
):
    """(q_x int8 [M, K], s_x f32 [M]): single pass over x (read once, write codes once). Same math as
    ``reference.quantize_act_int4``. Pallas Triton backend (GPU) or its interpreter (CPU)."""
    import jax.experimental.pallas as pl
    from jax.experimental.pallas import triton as pltriton

    m, k = x.shape
    bk = _next_pow2(k)
    bm = block_rows or max(1, min(8, 8192 // bk))
    warps = num_warps or (4 if bk <= 8192 else 8)
    static = static_scale is not None
    cs = jnp.reshape(jnp.asarray(static_scale if static else clip, jnp.float32), (1,))
    use_smooth = smooth is not None
    sm = smooth.astype(jnp.float32) if use_smooth else jnp.ones((k,), jnp.float32)
    kern = functools.partial(_quant_rows_kernel, k=k, qmax=qmax, static=static, use_smooth=use_smooth)
    return pl.pallas_call(
        kern,
        grid=(pl.cdiv(m, bm),),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i: (i, 0)),
            pl.BlockSpec((bk,), lambda i: (0,)),
            pl.BlockSpec((1,), lambda i: (0,)),
        ],
        out_specs=[pl.BlockSpec((bm, bk), lambda i: (i, 0)), pl.BlockSpec((bm,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
    )(x, sm, cs)


@functools.partial(jax.jit, static_argnames=("qmax", "interpret"))
def act_quant_pallas(
    x, smooth=None, down=None, clip=1.0, static_scale=None, qmax: int = reference.INT4_QMAX, interpret: bool = False
):
    """Act quant with the single-pass Pallas quantizer and the low-rank projection as one XLA GEMM over x with the
    smoothing folded into ``down`` (x_lr = bf16(x) @ bf16(down / smooth)). Returns (q_x, s_x, x_lr or None)."""
    q, s = quantize_rows_pallas(x, smooth, clip, static_scale, qmax, interpret=interpret)
    x_lr = None
    if down is not None and down.shape[1] > 0:
        d = down.astype(jnp.float32)
        if smooth is not None:
            d = d / smooth.astype(jnp.float32)[:, None]
        x_lr = reference.lowrank_down(x, d, None)
    return q, s, x_lr


# ----------------------------------------------------------------------------------------------------------------
# Fused single kernel (Triton backend): per-token scale, codes AND the rank-r down projection, K walked in chunks.
# ----------------------------------------------------------------------------------------------------------------
def _chunk_for(k: int, prefer: int = 512) -> int | None:
    """Largest power-of-two chunk <= ``prefer`` (and >= 64) dividing K, or None."""
    c = prefer
    while c >= 64:
        if k % c == 0:
            return c
        c //= 2
    return None


# Adding then subtracting 1.5 * 2**23 rounds an f32 of magnitude < 2**22 to the nearest integer, ties to even.
_RNE_MAGIC = 12582912.0
_RNE_MAGIC_BITS = 0x4B400000  # its float32 bit pattern

# Tuning of the fused kernel, chosen by the sweeps in docs/BENCHMARKS.md ("Activation quantization, and the linear
# end to end with each implementation"): 64-row blocks, K in chunks of 256, 8 warps, 3 software-pipeline stages.
# (Several comments here and in dispatch.py cite measurements: docs/BENCHMARKS.md, "Numbers formerly in docstrings".)
FUSED_BLOCK_ROWS, FUSED_CHUNK, FUSED_WARPS, FUSED_STAGES = 64, 256, 8, 3
# The dispatcher's keyword options of act_quant_lowrank_pallas
FUSED_OPTIONS = {"fast": True, "int_round": True}  # int_round: faster than fast alone (BENCHMARKS, "instruction-bound")
# In-kernel rotation: Hadamard blocks of 64 up to ROT_MAX_BLOCK columns, multiplied on the tensor cores in pieces of
# at most ROT_PIECE columns (a 128 x 128 +-1 matrix, 32 KB of bf16; a dense 256 x 256 one did not fit in shared
# memory), larger blocks mixing their pieces with f32 butterflies first
ROT_PIECE, ROT_MAX_BLOCK = 128, 1024
# The dispatcher rotates in the kernel only up to this block: at 1024 the kernel fits only one pipeline stage (the
# 3- and 2-stage forms exceed shared memory, 32-row blocks spill) and is several times slower than the XLA rotation
# pass + the unrotated kernel, while blocks of 64-512 beat that pass (docs/BENCHMARKS.md, "Act quant of a rotated
# input", the sweep of blocks of 128-1024)
ROT_DISPATCH_MAX_BLOCK = 512


#: shared memory per block on Hopper (227 KB); the fused kernel's pipeline must fit it with a margin for the rest
HOPPER_SMEM_BYTES, SMEM_MARGIN_BYTES = 232_448, 8_192


def max_fused_stages(block_rows: int, chunk: int, r_pad: int) -> int:
    """Most software-pipeline stages of the fused kernel that fit in Hopper's shared memory: each stage buffers the
    bf16 x tile ``[block_rows, chunk]`` and the bf16 ``down`` tile ``[chunk, r_pad]``.

    The model matches what was measured on an H100: rank 128 (96 padded) with 64 x 256 tiles asked for 263,168 bytes
    with 3 stages (over the limit, 2 x 96 KB + 65 KB); blocks of 512 fit 2 stages but not 3, blocks of 1024 one
    (:func:`rotation_options`). Never below 1."""
    per_stage = 2 * chunk * (block_rows + r_pad)
    return max(1, (HOPPER_SMEM_BYTES - SMEM_MARGIN_BYTES) // per_stage)


def rotation_options(block: int) -> dict:
    """The dispatcher's keyword options of act_quant_lowrank_pallas for a rotation in Hadamard blocks of ``block``.

    Chosen by the sweep ``python -m bench.act_quant --rotate`` (docs/BENCHMARKS.md, "Act quant of a rotated input"):
    blocks of 128-512 run best with 4 warps and 2 pipeline stages (the unrotated kernel's 8 warps and 3 stages are
    limited by the tensor-core product's registers there; at 512, 3 stages do not fit in shared memory); blocks of 64
    keep the unrotated tuning; 1024 fits only one stage (slow, so the dispatcher leaves it to the XLA pass,
    :data:`ROT_DISPATCH_MAX_BLOCK`)."""
    if block <= 64:
        return dict(FUSED_OPTIONS)
    if block <= 512:
        return {**FUSED_OPTIONS, "num_warps": 4, "num_stages": 2}
    return {**FUSED_OPTIONS, "num_stages": 1}


def fused_supports(m: int, k: int, r: int, block_rows: int = FUSED_BLOCK_ROWS, chunk: int = FUSED_CHUNK) -> bool:
    """Whether :func:`act_quant_lowrank_pallas` handles this shape: M >= block_rows and a power-of-two chunk (>= 64)
    dividing K. Any rank r: Triton's ``dot`` needs power-of-two sides of at least 16, so another r runs with
    ``down`` zero-padded to :func:`padded_rank` columns and the extra columns of x_lr sliced off (exact)."""
    return m >= block_rows and _chunk_for(k, chunk) is not None


def padded_rank(r: int) -> int:
    """The rank the fused kernel computes a rank-``r`` branch at: ``r`` if it is a power of two >= 16 (or 0), else
    the next such power (e.g. 96 -> 128: the default rank 32 plus a rank-64 LoRA)."""
    if r == 0 or (r >= 16 and r & (r - 1) == 0):
        return r
    return max(16, 1 << (r - 1).bit_length())


def _act_quant_lowrank_kernel(
    x_ref,
    sm_ref,
    dn_ref,
    cs_ref,
    had_ref,
    q_ref,
    s_ref,
    lr_ref,
    *,
    m,
    k,
    bm,
    ck,
    r,
    qmax,
    static,
    l2_hint,
    reverse=False,
    programs=0,
    fast=False,
    lazy_max=False,
    int_round=False,
    use_smooth=True,
    rotate=False,
):
    """Row blocks of ``bm`` rows: one per program, or (``programs`` > 0, a persistent grid of that many programs)
    blocks pid, pid + programs, ... so that fewer blocks are in flight at once (their pass-2 re-reads then fit in L2).
    Trailing iterations past the last block redo the last block (identical values)."""
    import jax.experimental.pallas as pl

    body = functools.partial(
        _act_quant_rows,
        x_ref,
        sm_ref,
        dn_ref,
        cs_ref,
        had_ref,
        q_ref,
        s_ref,
        lr_ref,
        m=m,
        k=k,
        bm=bm,
        ck=ck,
        r=r,
        qmax=qmax,
        static=static,
        l2_hint=l2_hint,
        reverse=reverse,
        fast=fast,
        lazy_max=lazy_max,
        int_round=int_round,
        use_smooth=use_smooth,
        rotate=rotate,
    )
    nblocks = -(-m // bm)
    if not programs:
        body(jnp.minimum(pl.program_id(0) * bm, m - bm))
        return

    pid = pl.program_id(0)  # read outside the loop (the interpreter cannot discharge it inside)

    def step(t, carry):
        b = jnp.minimum(pid + t * programs, nblocks - 1)
        body(jnp.minimum(b * bm, m - bm))
        return carry

    jax.lax.fori_loop(0, -(-nblocks // programs), step, 0)


def _act_quant_rows(
    x_ref,
    sm_ref,
    dn_ref,
    cs_ref,
    had_ref,
    q_ref,
    s_ref,
    lr_ref,
    r0,
    *,
    m,
    k,
    bm,
    ck,
    r,
    qmax,
    static,
    l2_hint,
    reverse,
    fast,
    lazy_max,
    int_round,
    use_smooth=True,
    rotate=False,
):
    """Rows [r0, r0 + bm): pass 1 over K (abs-max of x / smooth, and bf16(x) @ down_folded on the tensor cores),
    pass 2 over K (re-read x, mostly from L2, and write the codes). The last block is shifted back to end at row M
    (its overlap rows are recomputed with identical values), so no row mask is needed."""
    import jax.experimental.pallas as pl

    del m
    rows = pl.ds(r0, bm)
    nk = k // ck

    # the chunk is loaded in `npieces` column pieces of `hp`: one piece without rotation; with it, pieces of at most
    # ROT_PIECE columns (the +-1 matrix in had_ref is hp x hp), mixed across pieces by a Walsh-Hadamard butterfly
    npieces = ck // min(ck, ROT_PIECE) if rotate else 1
    hp = ck // npieces

    def x_s(j, policy):
        """Chunk j as pieces: (offsets, raw pieces, smoothed (and rotated) f32 pieces)."""
        offs = [j * ck + p * hp for p in range(npieces)]
        xcs, xss = [], []
        for o in offs:
            sl = x_ref.at[rows, pl.ds(o, hp)]
            if l2_hint:  # keep the row block in L2 between the two passes, drop it after the second
                from jax.experimental.pallas import triton as pltriton

                xc = pltriton.load(sl, eviction_policy=policy)
            else:
                xc = sl[...]
            if not use_smooth:  # no smoothing vector (e.g. folded into the producer of x): no per-element multiply
                xs = xc.astype(jnp.float32)
            elif fast:  # sm_ref holds 1 / smooth: a multiply instead of a division (MUFU) per element
                xs = xc.astype(jnp.float32) * sm_ref[pl.ds(o, hp)][None, :]
            else:
                xs = xc.astype(jnp.float32) / sm_ref[pl.ds(o, hp)][None, :]
            xcs.append(xc)
            xss.append(xs)
        if rotate:  # the chunk is one Hadamard block, H_ck = kron(H_npieces, H_hp) (Sylvester): butterflies across the
            # pieces in f32, then bf16(piece) @ (+-1 matrix of hp) on the tensor cores, scaled by 1 / sqrt(ck)
            h = 1
            while h < npieces:
                for a in range(npieces):
                    if not a & h:
                        xss[a], xss[a + h] = xss[a] + xss[a + h], xss[a] - xss[a + h]
                h *= 2
            xss = [
                jnp.dot(t.astype(jnp.bfloat16), had_ref[...], preferred_element_type=jnp.float32) * cs_ref[2]
                for t in xss
            ]
        return offs, xcs, xss

    def pass1(j, carry):
        amax, acc = carry
        offs, xcs, xss = x_s(j, "evict_last")
        for o, xc, xs in zip(offs, xcs, xss):
            if lazy_max:  # element-wise running maximum; one cross-thread row reduction after the loop
                amax = jnp.maximum(amax, jnp.abs(xs))
            else:
                amax = jnp.maximum(amax, jnp.max(jnp.abs(xs), axis=1))
            if r:  # without rotation x itself meets down / smooth; with it the rotated input meets down
                a = xs if rotate else xc
                acc = acc + jnp.dot(a.astype(jnp.bfloat16), dn_ref[pl.ds(o, hp), :], preferred_element_type=jnp.float32)
        return amax, acc

    acc0 = jnp.zeros((bm, max(r, 16)), jnp.float32)
    amax0 = jnp.zeros((bm, hp) if lazy_max else (bm,), jnp.float32)
    amax, acc = jax.lax.fori_loop(0, nk, pass1, (amax0, acc0))
    if lazy_max:
        amax = jnp.max(amax, axis=1)
    c = cs_ref[0]
    s = jnp.full((bm,), c, jnp.float32) if static else amax * c / jnp.float32(qmax)
    s = jnp.where(s > 0, s, jnp.float32(1.0))

    inv = 1.0 / s

    def codes(xs):
        if fast and int_round:  # t + 1.5 * 2**23 holds round(t) in its low mantissa bits: read them as an integer,
            # then clamp to the code range (same as clipping to the integer bounds first)
            u = jax.lax.bitcast_convert_type(xs * inv[:, None] + cs_ref[1], jnp.int32) - _RNE_MAGIC_BITS
            return jnp.clip(u, -qmax, qmax).astype(jnp.int8)
        if fast:  # one multiply by the row's reciprocal scale, round half to even by the 1.5 * 2**23 trick
            t = jnp.clip(xs * inv[:, None], -qmax, qmax)
            return ((t + cs_ref[1]) - cs_ref[1]).astype(jnp.int8)
        t = jnp.clip(xs / s[:, None], -qmax, qmax)
        f = jnp.floor(t)  # round half to even from floor (Pallas Triton has no `round`)
        d = t - f
        odd = f - 2.0 * jnp.floor(f * 0.5)
        return (f + jnp.where(d > 0.5, 1.0, jnp.where(d == 0.5, odd, 0.0))).astype(jnp.int8)

    def pass2(i, carry):
        j = nk - 1 - i if reverse else i  # reverse: the chunks pass 1 read last are the likeliest still in L2
        offs, _, xss = x_s(j, "evict_first")
        for o, xs in zip(offs, xss):
            q_ref[rows, pl.ds(o, hp)] = codes(xs)
        return carry

    jax.lax.fori_loop(0, nk, pass2, 0)
    s_ref[rows] = s
    if r:
        lr_ref[rows, :] = acc.astype(lr_ref.dtype)


def act_quant_lowrank_pallas(
    x,
    smooth=None,
    down=None,
    clip=1.0,
    static_scale=None,
    qmax: int = reference.INT4_QMAX,
    *,
    block_rows: int = FUSED_BLOCK_ROWS,
    chunk: int = FUSED_CHUNK,
    num_warps: int = FUSED_WARPS,
    num_stages: int = FUSED_STAGES,
    l2_hint: bool = False,
    reverse: bool = False,
    programs: int = 0,
    fast: bool = False,
    lazy_max: bool = False,
    int_round: bool = False,
    rot_signs=None,
    interpret: bool = False,
):
    """One Pallas (Triton) kernel for the whole activation quantization: (q_x int8 [M, K], s_x f32 [M],
    x_lr bf16 [M, r] or None), x read from HBM once (the second pass over a row block hits L2).

    Same math as ``act_quant_fused(..., fold_smooth=True)``: codes and scales of ``reference.quantize_act_int4``
    (Triton's f32 division is not correctly rounded, so rare exact rounding ties may differ by one code), and
    ``x_lr = bf16(x) @ bf16(down / smooth)`` with f32 accumulation in another order. Requires
    :func:`fused_supports`; ``block_rows``, ``chunk``, ``num_warps``, ``num_stages``, ``l2_hint`` (L2 eviction
    hints on the two passes' loads), ``reverse`` (pass 2 walks K backwards) and ``programs`` (> 0: a persistent grid
    of that many programs walking the row blocks) are tuning knobs. ``fast``: multiply by ``1 / smooth`` and by the
    row's ``1 / s`` instead of dividing, and round by the 1.5 * 2**23 trick (fewer instructions per element; codes
    can differ from the reference by one where x / s lies within an ulp or two of a rounding boundary, scales by an
    ulp). ``smooth=None`` (smoothing folded into the producer of x, or a recipe without it) skips the per-element
    smoothing multiply in both passes. ``rot_signs`` ([K] +-1): the input is also rotated after the smoothing, as
    ``numerics.hadamard.rotate_activations`` with Hadamard blocks of ``chunk`` (64 to ``ROT_MAX_BLOCK``): the chunk's
    pieces of ``x * signs / smooth`` (``ROT_PIECE`` columns each) are mixed by f32 butterflies, rounded to bf16,
    multiplied on the tensor cores by the +-1 Hadamard matrix of a piece and scaled by ``1 / sqrt(chunk)`` (f32
    accumulation; the codes can differ from the f32 rotation's where the bf16 rounding moves a value across a
    rounding boundary), and ``down`` applies to the rotated input (not folded with the smoothing). Timings:
    docs/BENCHMARKS.md, "Act quant of a rotated input".
    """
    import jax.experimental.pallas as pl
    from jax.experimental.pallas import triton as pltriton

    m, k = x.shape
    r = 0 if down is None else down.shape[1]
    ck = _chunk_for(k, chunk)
    if not fused_supports(m, k, r, block_rows, chunk):
        raise ValueError(
            f"act_quant_lowrank_pallas: unsupported shape M={m}, K={k} (needs M >= {block_rows} and a "
            f"power-of-two chunk >= 64 dividing K)"
        )
    r_pad = padded_rank(r)
    num_stages = min(num_stages, max_fused_stages(block_rows, ck, r_pad))  # e.g. rank 96 / 128: 3 stages overflow
    if r_pad != r:  # zero columns for Triton's power-of-two dot; sliced off below (exact)
        down = jnp.pad(down, ((0, 0), (0, r_pad - r)))
        r_full, r = r, r_pad
    else:
        r_full = r
    static = static_scale is not None
    rotate = rot_signs is not None
    if rotate and (ck != chunk or not 64 <= chunk <= ROT_MAX_BLOCK):
        raise ValueError(
            f"act_quant_lowrank_pallas: rotation needs a Hadamard block (chunk) of 64-{ROT_MAX_BLOCK} "
            f"dividing K={k}, got chunk={chunk}"
        )
    # [clip or static scale, 1.5 * 2**23, 1 / sqrt(chunk)]: the rounding constant comes in at run time so that no
    # compiler (XLA's simplifier in the interpreter) folds (t + M) - M into t
    cs = jnp.stack(
        [
            jnp.asarray(static_scale if static else clip, jnp.float32).reshape(()),
            jnp.float32(_RNE_MAGIC),
            jnp.float32(1.0 / math.sqrt(ck)),
        ]
    )
    sm = jnp.ones((k,), jnp.float32) if smooth is None else smooth.astype(jnp.float32)
    if rotate:  # signs / smooth as one per-channel factor (sm divides x; signs are +-1, their own inverse)
        sm = sm * jnp.asarray(rot_signs, jnp.float32)
        had = jnp.asarray(np.sign(hadamard_matrix(min(ck, ROT_PIECE))), jnp.bfloat16)  # +-1 matrix (exact in bf16)
    else:
        had = jnp.zeros((16, 16), jnp.bfloat16)
    if r and rotate:
        dn = down.astype(jnp.bfloat16)
    elif r:
        dn = (down.astype(jnp.float32) / sm[:, None]).astype(jnp.bfloat16)
    else:
        dn = jnp.zeros((k, 16), jnp.bfloat16)
    if fast:
        sm = 1.0 / sm
    nblocks = pl.cdiv(m, block_rows)
    progs = min(programs, nblocks) if programs > 0 else 0
    kern = functools.partial(
        _act_quant_lowrank_kernel,
        m=m,
        k=k,
        bm=block_rows,
        ck=ck,
        r=r,
        qmax=qmax,
        static=static,
        l2_hint=l2_hint,
        reverse=reverse,
        programs=progs,
        fast=fast,
        lazy_max=lazy_max,
        int_round=int_round,
        use_smooth=smooth is not None or rotate,
        rotate=rotate,
    )
    q, s, lr = pl.pallas_call(
        kern,
        grid=(progs or nblocks,),
        out_shape=[
            jax.ShapeDtypeStruct((m, k), jnp.int8),
            jax.ShapeDtypeStruct((m,), jnp.float32),
            jax.ShapeDtypeStruct((m, max(r, 16)), jnp.bfloat16),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(x, sm, dn, cs, had)
    return q, s, (lr[:, :r_full] if r_full != r else lr) if r else None
