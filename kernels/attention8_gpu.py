"""8-bit attention for Hopper in Pallas Mosaic GPU: INT8 QK^T (s8 x s8 -> s32 wgmma), FP8 PV with two-level
accumulation. Status: run on an H100 (docs/BENCHMARKS.md, "8-bit attention", second and third rounds): every config
timed there matched the reference (relative difference <= 1.5e-3), the default (256-key tiles, ``pv_overlap``,
``softmax_barrier``, ``bsnd``, ``fold_magic``) included, so ``VERIFIED`` is True. ``qk_prefetch`` ran but is slower.

Numerics: those of ``attention8_reference`` (its pre-pass :func:`~attention8_reference.quantize_qkv` makes the
operands; V is then transposed to [B, N, D, S_pad] because 8-bit wgmma operands must be K-major, and the per-token
scales are expanded: the row scale pre-multiplied by ``sm_scale * log2(e)``). Kernel structure (after the FA3-style
``jax.experimental.pallas.ops.gpu.attention_mgpu``, written anew for 8-bit operands):

* grid (head, query tile of 2 x 64 rows, batch); 3 warpgroups: two compute WGs of 64 query rows each and one TMA
  producer WG filling a ring of ``stages`` (K tile, V^T tile, K-scale tile) slots, each guarded by a "loaded" and a
  "consumed" barrier;
* per KV tile of ``block_kv`` keys, each compute WG: ``S = q8 @ k8^T`` into a scoped int32 accumulator; ``s =
  float(S) * row * col``; padded keys -> -inf; online softmax in the exp2 domain with the max kept log2(448) low
  (P in (0, 448]); ``P8 = e4m3(P)`` written to a swizzled SMEM tile (fact 10 of the reference doc: the f32
  accumulator layout cannot be cast to the 8-bit A-operand register layout in jax 0.11.2, but an SS wgmma from SMEM
  was measured to work); ``PV = P8 @ V8`` into a FRESH scoped f32 accumulator (the tensor core's FP8 accumulator
  keeps 13 mantissa bits) and ``acc = acc * alpha + PV`` in f32 registers;
* epilogue: ``acc / l * v_scale`` in bf16 through SMEM to HBM.

Speed options (``GPUConfig``): the pingpong schedule between the two compute WGs, P kept in registers (V token
permutation + an inline_mgpu reinterpretation, doc section 1.6), and the variants above; not done: fusing the
pre-pass into the QKV projection epilogue.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl

from .attention8_reference import DEFAULT, FP8_MAX, LOG2E, P_OFFSET, Attn8Config, QKV8, quantize_qkv

try:  # Mosaic GPU is part of jax, but keep the module importable on hosts whose jax lacks it
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

#: float(i) = bitcast(i + MAGIC_I32) - MAGIC_F32, exactly, for |i| < 2**22 (1.5 * 2**23 carries the integer in its
#: mantissa)
MAGIC_F32 = 1.5 * 2**23
MAGIC_I32 = 0x4B400000

#: the key each position of the regrouped P holds, within a group of 16 keys: in the f32 accumulator layout thread t of
#: a row quad holds keys (2t, 2t+1) of every 8; the 8-bit A-operand layout reads a thread's 4 bytes as positions
#: 4t..4t+3 of every 16, so joining the pairs of chunks 2c and 2c+1 puts keys 2t, 2t+1, 8+2t, 9+2t at 4t..4t+3
P_REGS_ORDER = tuple(k for t in range(4) for k in (2 * t, 2 * t + 1, 8 + 2 * t, 9 + 2 * t))

#: True: the default config matched the jnp reference on an H100 in ``python -m bench.attention8`` (2026-12-07,
#: relative difference 1.4e-3 at S = 32,760 and 1.5e-3 at S = 1,000; docs/BENCHMARKS.md, "8-bit attention, third
#: round")
VERIFIED = True


@dataclasses.dataclass(frozen=True)
class GPUConfig:
    block_q: int = 64  # query rows per compute warpgroup (2 per CTA)
    block_kv: int = 256  # keys per tile (= the reference's kv_block and the K scale block; 128 is 15 % slower)
    stages: int = 2  # K / V^T ring depth
    #: the two compute warpgroups take turns on the tensor cores (one runs its softmax while the other's wgmma runs)
    pingpong: bool = True
    #: the K scale is one number per tile (k_block = block_kv): fold it into the row scale, one multiply per score
    tile_scale: bool = True
    #: fewer instructions per score (with tile_scale): int32 -> f32 by the magic-number add (exact: |QK| < 2**22 for
    #: int8 and D <= 256) instead of the quarter-rate convert, the row max taken before the scale (positive scales),
    #: no clamp before the e4m3 convert (p <= 448 (1 + 2**-22) always rounds to 448)
    lean: bool = True
    #: P stays in registers for the PV wgmma (with lean): the e4m3 pairs of the accumulator layout are regrouped as the
    #: 8-bit A-operand layout without moving data, which reorders P's keys within every 16; V's tokens are permuted the
    #: same way in the pre-pass (:data:`P_REGS_ORDER`), so P @ V is unchanged. Not runnable in the interpreter.
    p_regs: bool = True
    #: (with lean) the magic number's subtraction folded into the scale FMA: the rounding of the per-row bias
    #: ``MAGIC * rc + m`` shifts every exponent of a row alike, which the row sum cancels
    fold_magic: bool = True
    #: the rescale of the running output (``acc * alpha``) is issued between the PV wgmma and its wait, so it overlaps
    #: the tensor cores' work instead of following it (the same numbers)
    pv_overlap: bool = True
    #: (with lean) an optimization barrier on the softmax's results (P, l, m, alpha) before the "softmax done" arrive,
    #: as JAX's Mosaic GPU flash attention example orders it, so no softmax work sinks into the other's turn
    softmax_barrier: bool = True
    #: (with lean, tile_scale and pingpong=False) FA3's intra-warpgroup overlap: tile j+1's QK^T wgmma is issued
    #: before tile j's softmax and waited for after P(j) @ V(j), so each warpgroup keeps the tensor cores busy during
    #: its own softmax (one more int32 score tile in registers)
    qk_prefetch: bool = False
    #: the pre-pass of :func:`attention8_gpu` keeps Q / K / V token-major ([B, S, N, D], as the model holds them) and
    #: the kernel reads them and writes its output that way: no transposes around the kernel (V^T excepted)
    bsnd: bool = True
    #: launch order: False = the head varies fastest (consecutive CTAs take the same query tile of different heads,
    #: so one wave streams the K / V of every head); True = the query tile varies fastest (a wave's CTAs share one
    #: head's K / V in L2). With the first the kernel ran at 0.96x cuDNN BF16 at S = 75,600 and 1.43x at 32,760 (H100).
    q_major: bool = False


def prepare(x: QKV8, d: int, cfg: GPUConfig = GPUConfig()):
    """Kernel operands from the pre-pass: q8, k8 [B, N, S, D] int8; vt8 [B, N, D, S] e4m3; row [B, N, Sq] f32 (times
    sm_scale * log2 e); col: the K scales, per token [B, N, Sk] f32, or with ``cfg.tile_scale`` one per KV tile,
    repeated ``block_q`` times [B, N, Sk / block_kv, block_q] (so a compute warpgroup loads it as a row vector);
    v_scale [B, N, D] f32."""
    row = x.q_scale_tokens() * jnp.float32(LOG2E / math.sqrt(d))
    if cfg.tile_scale:
        if x.k_block != cfg.block_kv:
            raise ValueError(f"attention8_gpu: tile_scale needs k_block == block_kv, got {x.k_block}, {cfg.block_kv}")
        col = jnp.broadcast_to(x.k_scale[..., None], x.k_scale.shape + (cfg.block_q,))
    else:
        col = x.k_scale_tokens()
    vt = jnp.swapaxes(x.v, 2, 3) if x.layout == "bnsd" else x.v.transpose(0, 2, 3, 1)  # [B, N, D, Sk_pad]
    if cfg.p_regs:
        skp = vt.shape[-1]
        perm = (jnp.arange(skp // 16)[:, None] * 16 + jnp.asarray(P_REGS_ORDER)[None, :]).reshape(-1)
        vt = vt[..., perm]
    return x.q, x.k, vt, row, col, x.v_scale


def _p_to_a_operand(p8):
    """e4m3 P [64, n] in the accumulator (WGMMA) layout -> the same registers read as the 8-bit A-operand layout
    (keys reordered as :data:`P_REGS_ORDER`); no data moves between threads."""
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    bq, n = p8.shape

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,),
        return_type=plgpu.ShapeDtypeStruct((bq, n), jnp.float8_e4m3fn, layout=plgpu.Layout.WGMMA_8BIT),
    )
    def regroup(ctx, p):
        del ctx
        regs = p.registers  # [1, n / 8, 1, 1, 2, ...]: 8-column chunks x the two row halves, vector<2 x e4m3> each
        out = np.empty((regs.shape[0], regs.shape[1] // 2) + regs.shape[2:], dtype=object)
        for idx in np.ndindex(out.shape):
            a = regs[(idx[0], 2 * idx[1]) + idx[2:]]
            b = regs[(idx[0], 2 * idx[1] + 1) + idx[2:]]
            out[idx] = mgpu_utils.vector_concat([a, b])
        return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT_8BIT, _is_signed=None)

    return regroup(p8)


def _build(b, n, sqp, skp, d, sk, cfg: GPUConfig, interpret=False, layout: str = "bnsd"):
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    tm = layout == "bsnd"  # token-major q, k, out

    def rows(ref, bi, h, sl):  # the [tokens, D] slice of head h
        return ref.at[bi, sl, h] if tm else ref.at[bi, h, sl]

    nkv = skp // bkv
    stages = min(stages, nkv)
    f32 = jnp.float32
    masked_last = sk < skp  # only the last KV tile holds padded keys
    p_regs = cfg.p_regs and cfg.lean and cfg.tile_scale
    if cfg.p_regs and not p_regs:
        raise ValueError("attention8_gpu: p_regs needs lean=True and tile_scale=True")
    col_shape = (stages, bq) if cfg.tile_scale else (stages, bkv)

    def kernel(q_ref, k_ref, vt_ref, row_ref, col_ref, vs_ref, o_ref, scoped):
        (
            (q_smem2, o_smem2, p_smem2, k_smem, vt_smem, col_smem),
            (q_bar, k_bar, c_bar, v_bar),
            (k_done, v_done),
            sched,
        ) = scoped
        bi, h = lax.axis_index("batch"), lax.axis_index("heads")
        wg = lax.axis_index("wg")

        def turn():  # both compute warpgroups meet here: their tensor-core phases alternate
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, o_smem, p_smem = q_smem2.at[wg], o_smem2.at[wg], p_smem2.at[wg]
            q0 = lax.axis_index("q_seq") * (2 * bq) + wg * bq
            plgpu.copy_gmem_to_smem(rows(q_ref, bi, h, pl.ds(q0, bq)), q_smem, q_bar.at[wg])
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            col_layout = plgpu.Layout.WGMMA.reduce(0)
            row = plgpu.load(row_ref.at[bi, h, pl.ds(q0, bq)], layout=row_layout, optimized=False)
            vs = plgpu.load(vs_ref.at[bi, h], layout=col_layout, optimized=False)
            plgpu.barrier_wait(q_bar.at[wg])
            m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, f32), row_layout)
            l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, f32), row_layout)
            acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, f32), plgpu.Layout.WGMMA)

            def lean_softmax(s32, rc, j, m_i, l_i, masked):
                """The lean online softmax of one tile's int32 scores: (P as the PV operand, m_new, l_new, alpha)."""
                xf = lax.bitcast_convert_type(s32 + jnp.int32(MAGIC_I32), f32)  # MAGIC_F32 + QK, exactly
                if masked:
                    key = j * bkv + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                    xf = jnp.where(key < sk, xf, -jnp.inf)
                m_new = jnp.maximum(m_i, (xf.max(axis=1) - f32(MAGIC_F32)) * rc)
                alpha = jnp.exp2(m_i - m_new)
                if cfg.fold_magic:  # one FMA per score: x * rc - (MAGIC * rc + m - offset), a per-row bias
                    bias = f32(MAGIC_F32) * rc + (m_new - P_OFFSET)
                    p = jnp.exp2(
                        xf * lax.broadcast_in_dim(rc, (bq, bkv), [0]) - lax.broadcast_in_dim(bias, (bq, bkv), [0])
                    )
                else:
                    p = jnp.exp2(
                        (xf - f32(MAGIC_F32)) * lax.broadcast_in_dim(rc, (bq, bkv), [0])
                        - lax.broadcast_in_dim(m_new - P_OFFSET, (bq, bkv), [0])
                    )
                l_i = l_i * alpha + p.sum(axis=1)
                if p_regs:
                    p_op = _p_to_a_operand(plgpu.layout_cast(p.astype(jnp.float8_e4m3fn), plgpu.Layout.WGMMA))
                else:
                    p_smem[...] = p.astype(jnp.float8_e4m3fn)
                    plgpu.commit_smem()
                    p_op = p_smem
                if cfg.softmax_barrier:
                    if p_regs:
                        p_op, l_i, m_new, alpha = lax.optimization_barrier((p_op, l_i, m_new, alpha))
                    else:
                        l_i, m_new, alpha = lax.optimization_barrier((l_i, m_new, alpha))
                return p_op, m_new, l_i, alpha

            def qk_issue(s_ref, j):  # wait for K(j) and its scale, issue S = q8 @ k8(j)^T (async)
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(c_bar.at[slot])
                plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))

            def pstep(j, carry, masked=False, last=False):
                """qk_prefetch: S(j+1)'s wgmma runs while this warpgroup does tile j's softmax and issues P(j) @ V(j)."""
                acc, m_i, l_i, s32 = carry
                slot = lax.rem(j, stages)

                def body(s_ref):
                    if not last:
                        qk_issue(s_ref, j + 1)
                    rc = row * plgpu.load(col_smem.at[slot], layout=row_layout, optimized=False)
                    plgpu.barrier_arrive(k_done.at[slot])  # QK(j) was read in the previous step
                    p_op, m_new, l_new, alpha = lean_softmax(s32, rc, j, m_i, l_i, masked)
                    plgpu.barrier_wait(v_bar.at[slot])

                    def pv(o_ref):
                        plgpu.wgmma(o_ref, p_op, vt_smem.at[slot].transpose((1, 0)))
                        scaled = lax.optimization_barrier(acc * lax.broadcast_in_dim(alpha, (bq, d), [0]))
                        return scaled + plgpu.wgmma_accumulator_load(o_ref, wait_n=0)  # also waits for S(j+1)

                    acc_new = pl.run_scoped(pv, plgpu.ACC((bq, d), f32))
                    plgpu.barrier_arrive(v_done.at[slot])
                    return acc_new, m_new, l_new, (None if last else s_ref[...])

                if last:
                    return body(None)
                return pl.run_scoped(body, plgpu.ACC((bq, bkv), jnp.int32))

            def step(j, carry, masked=False):
                acc, m_i, l_i = carry
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(c_bar.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    if cfg.pingpong:
                        turn()
                    return acc_ref[...]

                s32 = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.int32))
                if cfg.tile_scale and cfg.lean:
                    rc = row * plgpu.load(col_smem.at[slot], layout=row_layout, optimized=False)
                    plgpu.barrier_arrive(k_done.at[slot])
                    p_a, m_new, l_i, alpha = lean_softmax(s32, rc, j, m_i, l_i, masked)
                else:
                    if cfg.tile_scale:
                        rc = row * plgpu.load(col_smem.at[slot], layout=row_layout, optimized=False)
                        plgpu.barrier_arrive(k_done.at[slot])
                        s = s32.astype(f32) * lax.broadcast_in_dim(rc, (bq, bkv), [0])
                    else:
                        col = plgpu.load(col_smem.at[slot], layout=col_layout, optimized=False)
                        plgpu.barrier_arrive(k_done.at[slot])
                        s = (
                            s32.astype(f32)
                            * lax.broadcast_in_dim(row, (bq, bkv), [0])
                            * lax.broadcast_in_dim(col, (bq, bkv), [1])
                        )
                    if masked:
                        key = j * bkv + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                        s = jnp.where(key < sk, s, -jnp.inf)
                    m_new = jnp.maximum(m_i, s.max(axis=1))
                    alpha = jnp.exp2(m_i - m_new)
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_new - P_OFFSET, (bq, bkv), [0]))
                    l_i = l_i * alpha + p.sum(axis=1)
                    p_smem[...] = jnp.minimum(p, FP8_MAX).astype(jnp.float8_e4m3fn)
                    plgpu.commit_smem()
                if cfg.pingpong:
                    plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(v_bar.at[slot])
                if cfg.pingpong:
                    plgpu.barrier_wait(sched)  # the other warpgroup's turn on the tensor cores is over

                def pv(acc_ref):  # a fresh f32 accumulator per tile: the FP8 accumulator's 13 bits never carry the sum
                    plgpu.wgmma(acc_ref, p_a if p_regs else p_smem, vt_smem.at[slot].transpose((1, 0)))
                    if cfg.pv_overlap:  # the running sum's rescale runs while the tensor cores do P @ V
                        scaled = lax.optimization_barrier(acc * lax.broadcast_in_dim(alpha, (bq, d), [0]))
                        return scaled + acc_ref[...]  # (the barrier keeps the multiply from fusing past the wait)
                    return acc_ref[...]

                part = pl.run_scoped(pv, plgpu.ACC((bq, d), f32))
                plgpu.barrier_arrive(v_done.at[slot])
                acc = part if cfg.pv_overlap else acc * lax.broadcast_in_dim(alpha, (bq, d), [0]) + part
                return acc, m_new, l_i

            if cfg.qk_prefetch:
                s0 = pl.run_scoped(lambda s_ref: (qk_issue(s_ref, 0), s_ref[...])[1], plgpu.ACC((bq, bkv), jnp.int32))
                carry = lax.fori_loop(0, nkv - 1, pstep, (acc, m_i, l_i, s0))
                acc, m_i, l_i, _ = pstep(jnp.int32(nkv - 1), carry, masked=masked_last, last=True)
            else:
                if cfg.pingpong:
                    pl.when(wg == 1)(turn)
                carry = lax.fori_loop(0, nkv - 1 if masked_last else nkv, step, (acc, m_i, l_i))
                if masked_last:
                    carry = step(jnp.int32(nkv - 1), carry, masked=True)
                acc, m_i, l_i = carry
            if cfg.pingpong:
                pl.when(wg == 0)(turn)
            out = acc / lax.broadcast_in_dim(l_i, (bq, d), [0]) * lax.broadcast_in_dim(vs, (bq, d), [1])
            o_smem[...] = out.astype(jnp.bfloat16)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, rows(o_ref, bi, h, pl.ds(q0, bq)))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load(j, slot):
                ks = pl.ds(j * bkv, bkv)
                plgpu.copy_gmem_to_smem(rows(k_ref, bi, h, ks), k_smem.at[slot], k_bar.at[slot])
                if cfg.tile_scale:
                    plgpu.copy_gmem_to_smem(col_ref.at[bi, h, j], col_smem.at[slot], c_bar.at[slot])
                else:
                    plgpu.copy_gmem_to_smem(col_ref.at[bi, h, ks], col_smem.at[slot], c_bar.at[slot])
                plgpu.copy_gmem_to_smem(vt_ref.at[bi, h, :, ks], vt_smem.at[slot], v_bar.at[slot])

            for i in range(stages):
                load(i, i)

            @pl.loop(0, nkv - stages)
            def _ring(j):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_done.at[slot])
                plgpu.barrier_wait(v_done.at[slot])
                load(j + stages, slot)

            @pl.loop(nkv - stages, nkv)  # observe the last consumptions too (barrier phases end balanced)
            def _drain(j):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_done.at[slot])
                plgpu.barrier_wait(v_done.at[slot])

    def attn8_kernel(q_ref, k_ref, vt_ref, row_ref, col_ref, vs_ref, o_ref):  # the name shows in profiles
        t8 = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
        t16 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, bq, d), jnp.int8, transforms=t8),
            plgpu.SMEM((2, bq, d), jnp.bfloat16, transforms=t16),
            plgpu.SMEM((2, bq, bkv), jnp.float8_e4m3fn, transforms=t8),
            plgpu.SMEM((stages, bkv, d), jnp.int8, transforms=t8),
            plgpu.SMEM((stages, d, bkv), jnp.float8_e4m3fn, transforms=t8),
            plgpu.SMEM(col_shape, jnp.float32),
        )
        bars = (plgpu.Barrier(num_barriers=2),) + (plgpu.Barrier(num_barriers=stages),) * 3
        done = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *a: kernel(q_ref, k_ref, vt_ref, row_ref, col_ref, vs_ref, o_ref, a),
            smem,
            bars,
            done,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        attn8_kernel,
        out_type=jax.ShapeDtypeStruct((b, sqp, n, d) if tm else (b, n, sqp, d), jnp.bfloat16),
        grid=(sqp // (2 * bq), n, b) if cfg.q_major else (n, sqp // (2 * bq), b),
        grid_names=("q_seq", "heads", "batch") if cfg.q_major else ("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams(uninitialized_memory="nan") if interpret is True else (interpret or False),
    )


def attention8_gpu_core(x: QKV8, cfg: GPUConfig = GPUConfig(), interpret=False) -> jax.Array:
    """The Mosaic GPU core on pre-quantized operands (pre-pass with q_block a multiple of 128 and kv_block =
    cfg.block_kv); returns [B, Sq, N, D] bf16."""
    if plgpu is None:  # pragma: no cover
        raise NotImplementedError("attention8_gpu needs jax.experimental.pallas.mosaic_gpu")
    if x.layout == "bsnd":
        b, sqp, n, d = x.q.shape
        skp = x.k.shape[1]
    else:
        b, n, sqp, d = x.q.shape
        skp = x.k.shape[2]
    if sqp % (2 * cfg.block_q) or skp % cfg.block_kv or d % 64:
        raise ValueError(
            f"attention8_gpu: padded Sq={sqp} must be a multiple of {2 * cfg.block_q}, Sk={skp} of "
            f"{cfg.block_kv}, D={d} of 64"
        )
    if cfg.p_regs and interpret:
        raise NotImplementedError("attention8_gpu: p_regs (a register A operand, inline_mgpu) cannot run interpreted")
    if cfg.qk_prefetch and (cfg.pingpong or not (cfg.lean and cfg.tile_scale)):
        raise ValueError("attention8_gpu: qk_prefetch needs pingpong=False, lean=True and tile_scale=True")
    if cfg.lean and d > 256:
        raise ValueError(f"attention8_gpu: lean=True converts QK^T exactly only for D <= 256, got D={d}")
    q8, k8, vt8, row, col, vs = prepare(x, d, cfg)
    out = _build(b, n, sqp, skp, d, x.sk, cfg, interpret, x.layout)(q8, k8, vt8, row, col, vs)
    if x.layout == "bsnd":
        return out[:, : x.sq]
    return out[:, :, : x.sq].transpose(0, 2, 1, 3)


def gpu_config_for(cfg: GPUConfig = GPUConfig()) -> Attn8Config:
    """The pre-pass config matching the kernel's tiles."""
    return dataclasses.replace(DEFAULT, q_block=max(128, 2 * cfg.block_q), k_block=cfg.block_kv, kv_block=cfg.block_kv)


def set_default_config(cfg: GPUConfig) -> GPUConfig:
    """Make ``cfg`` the kernel config of :func:`attention8_gpu` calls that pass none (benchmarks compare variants
    through the model this way); returns the previous one."""
    global _DEFAULT_GPU
    old, _DEFAULT_GPU = _DEFAULT_GPU, cfg
    return old


_DEFAULT_GPU = GPUConfig()


def attention8_gpu(q, k, v, cfg: GPUConfig | None = None) -> jax.Array:
    """Pre-pass (XLA) + the Mosaic GPU core: [B, S, N, D] -> [B, Sq, N, D] bf16; ``cfg`` defaults to
    :func:`set_default_config`'s."""
    return _attention8_gpu(q, k, v, _DEFAULT_GPU if cfg is None else cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _attention8_gpu(q, k, v, cfg: GPUConfig) -> jax.Array:
    return attention8_gpu_core(quantize_qkv(q, k, v, gpu_config_for(cfg), "bsnd" if cfg.bsnd else "bnsd"), cfg)
