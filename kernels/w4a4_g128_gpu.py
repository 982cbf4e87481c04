"""Group-scaled W4A4 GEMM for Hopper (H100/H200) in Pallas Mosaic GPU: int4 weights with one f32 scale per (output
channel n, group of 128 along K), int4 activations with one scale per token. Computes::

    out[m, n] = s_x[m] * sum_g s_w[n, g] * acc_g[m, n] + bias[n] + (x_lr @ up)[m, n]
    acc_g[m, n] = sum_{k in group g} q_x[m, k] * q_w[n, k]                              (int32, exact)

Same structure as ``kernels.w4a4_gpu`` (persistent grid of ``num_sms`` CTAs walking the output tiles in a planar snake,
one TMA warpgroup and two compute warpgroups, both operands K-major in SMEM, the shared fused epilogue
:func:`kernels.w4a4_gpu.make_epilogue`), with ``tile_k = 128 = group size``, so one pipeline step is one group:

* the pipeline has a third input, the group's weight scales: ``s_w`` is transposed to [K/128, N] and the
  ``1 x cta_n`` row of group g is TMA'd into SMEM with the step's operand tiles (512 B-1 KB per stage);
* each compute warpgroup keeps an f32 ``tile_m x tile_n`` accumulator in registers (the pipeline carry); per step it
  issues the int8 ``wgmma`` (s8 x s8 -> s32) into a fresh int32 accumulator, waits for it, converts to f32 and adds
  ``f32(acc_i32) * s_w[n, g]`` (s_w broadcast along the tokens);
* the epilogue multiplies by ``s_x[m]`` only (the channel scales are already applied), adds bias and the low-rank term
  and writes bf16 (or f32) through SMEM + TMA, exactly as the per-channel kernel.

Register budget: the f32 carry and the int32 step accumulator live side by side, 2 x tile_m*tile_n/128 registers per
thread, so the default per-warpgroup tile is 128 x 64 (CTA tile 128 x 128; 128 registers for the two accumulators);
128 x 128 per warpgroup would need 256.

Weights are int8 [N, K] holding int4 values (the dispatcher unpacks packed uint8 codes with one XLA pass). Not built:
the int4-in-registers (register-A ``wgmma``) variant of the per-channel kernel. By default each step waits for its
``wgmma`` before rescaling (as the per-channel kernel does; the two compute warpgroups interleave);
``G128Config(overlap_rescale=True)`` instead rescales the previous group's int32 result while the current group's
``wgmma`` runs (one more register tile): faster where measured (docs/BENCHMARKS.md, "Group-scaled g128 GEMM").

Status: checked in the Mosaic GPU interpreter and by lowering for CUDA on CPU, and run on a GPU (``python -m
bench.kernels --g128``): the int32 group sums bit-exact against the reference (with exactly built power-of-two test
scales), the epilogue as accurate as the per-channel kernel's. The per-group rescale of the accumulator halves the
per-channel kernel's throughput, so this kernel is correct but not a speed path on Hopper (timings:
docs/BENCHMARKS.md, "Group-scaled g128 GEMM").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from .w4a4_gpu import (
    H100_NUM_SMS,
    W4A4Config,
    _interpret_params,
    _num_sms,
    _swizzled,
    build_gemm_kernel,
    fit_epilogue,
    make_epilogue,
)

GROUP = 128
MAGIC_I32 = 0x4B400000  # the bits of 1.5 * 2**23: adding an integer |x| < 2**22 to them gives the float 1.5 * 2**23 + x
MAGIC_F32 = 12582912.0


@dataclasses.dataclass(frozen=True)
class G128Config(W4A4Config):
    """Tiling of the g128 GEMM (the fields of :class:`kernels.w4a4_gpu.W4A4Config`, tile_k = 128 = group) plus:

    overlap_rescale: False = each step waits for its ``wgmma``, then rescales its int32 result into the f32 carry;
      True = each step issues its ``wgmma`` first and rescales the previous step's int32 result (carried in registers)
      while the tensor cores run, then waits (one more tile_m x tile_n int32 tile of registers: 3 register tiles,
      192 registers per thread at 128 x 64). Faster where measured (docs/BENCHMARKS.md, "Group-scaled g128
      GEMM").
    """

    overlap_rescale: bool = False
    #: int32 -> f32 of the group sums by the magic-number add (``bits(x + 0x4B400000) - 1.5 * 2**23``, exact for
    #: |x| < 2**22; a group sum is at most 128 * 127 * 8 < 2**17): an integer add and a float subtract, both at (or
    #: near) the FMA issue rate, instead of ``cvt.rn.f32.s32``, which issues at a fraction of it. Bit-identical results.
    magic_cvt: bool = False


# Per compute warpgroup 128 x 64 (see the module docstring: register budget of the two accumulators).
G128_CONFIG = G128Config(tile_m=128, tile_n=64, tile_k=GROUP, stages=3, num_sms=H100_NUM_SMS)


def _sw_bytes(cfg: W4A4Config) -> int:
    return cfg.stages * 2 * cfg.tile_n * 4  # one f32 row of cta_n scales per pipeline stage


def _check_shapes(q_x, w, s_x, s_w, bias, x_lr, up, cfg):
    m, k = q_x.shape
    n, kw = w.shape
    if q_x.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise ValueError(f"w4a4_g128_matmul_gpu: q_x and w must be int8 (int4 values), got {q_x.dtype}, {w.dtype}")
    if kw != k:
        raise ValueError(f"w4a4_g128_matmul_gpu: weights [N, K] must match q_x [M, K]: got {q_x.shape}, {w.shape}")
    if cfg.tile_k != GROUP:
        raise ValueError(f"w4a4_g128_matmul_gpu: tile_k must equal the group size {GROUP}, got {cfg.tile_k}")
    if k % GROUP:
        raise ValueError(f"w4a4_g128_matmul_gpu: K={k} must be a multiple of the group size {GROUP}")
    if s_x.shape != (m,) or s_w.shape != (n, k // GROUP):
        raise ValueError(
            f"w4a4_g128_matmul_gpu: s_x must be [{m}] and s_w [{n}, {k // GROUP}], got {s_x.shape}, {s_w.shape}"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"w4a4_g128_matmul_gpu: bias must be [{n}], got {bias.shape}")
    if (x_lr is None) != (up is None):
        raise ValueError("w4a4_g128_matmul_gpu: x_lr and up must be given together")
    if x_lr is not None:
        r = x_lr.shape[1]
        if x_lr.shape != (m, r) or up.shape != (r, n):
            raise ValueError(
                f"w4a4_g128_matmul_gpu: x_lr must be [M={m}, r] and up [r, N={n}], got {x_lr.shape}, {up.shape}"
            )
        if r % 16:
            raise ValueError(f"w4a4_g128_matmul_gpu: low-rank r must be a multiple of 16 (bf16 wgmma k), got r={r}")
    if n % (2 * cfg.tile_n):
        raise ValueError(f"w4a4_g128_matmul_gpu: N={n} must be a multiple of the CTA tile 2*tile_n={2 * cfg.tile_n}")
    if m < cfg.tile_m:
        raise ValueError(f"w4a4_g128_matmul_gpu: M={m} < tile_m={cfg.tile_m}; pad M first (w4a4_g128_matmul_gpu_any_m)")


def _build_kernel(m, n, k, r, has_bias, out_dtype, cfg: W4A4Config, lowrank_mode: str):
    """The group-scaled kernel on the shared scaffolding (``w4a4_gpu.build_gemm_kernel``): per K step (one group of
    128) an int32 ``wgmma`` into a scoped ``ACC``, promoted into an f32 register accumulator with that group's scales
    (``overlap_rescale``: the previous group's promotion runs while this group's ``wgmma`` does)."""
    tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k

    x_tf = _swizzled(tile_k, 1)
    out_itemsize = jnp.dtype(out_dtype).itemsize
    epi_n, out_slots = fit_epilogue(cfg, r, out_itemsize, "int8", extra_bytes=_sw_bytes(cfg))
    epi_shape = (tile_m, epi_n)
    out_tf = _swizzled(epi_n * out_itemsize, out_itemsize)
    lr_tf = _swizzled(r * 2, 2) if r else None
    ch_layout = plgpu.Layout.WGMMA.reduce(0)  # keeps the channel axis of a (tile_m, tile_n) tile
    overlap = getattr(cfg, "overlap_rescale", False)

    magic = getattr(cfg, "magic_cvt", False)

    def _to_f32(part_i32):
        if not magic:
            return part_i32.astype(jnp.float32)
        return lax.bitcast_convert_type(part_i32 + MAGIC_I32, jnp.float32) - MAGIC_F32

    def _rescale_add(acc, part_i32, sw):
        return acc + _to_f32(part_i32) * lax.broadcast_in_dim(sw, acc.shape, [1])

    epilogue = make_epilogue(
        tile_m=tile_m, tile_n=tile_n, epi_n=epi_n, out_slots=out_slots, r=r, lowrank_mode=lowrank_mode, transposed=False
    )

    def accumulate(eval_pipeline, finish):
        acc0 = plgpu.layout_cast(jnp.zeros((tile_m, tile_n), jnp.float32), plgpu.Layout.WGMMA)
        if overlap:
            prev0 = plgpu.layout_cast(jnp.zeros((tile_m, tile_n), jnp.int32), plgpu.Layout.WGMMA)
            sw0 = plgpu.layout_cast(jnp.zeros((tile_n,), jnp.float32), ch_layout)
            acc, prev, prev_sw = eval_pipeline((acc0, prev0, sw0))
            acc = _rescale_add(acc, prev, prev_sw)  # the last group
        else:
            acc = eval_pipeline(acc0)
        finish(acc)

    def mma_body(wg, _, x_smem, w_smem, sw_smem, carry):
        sw = plgpu.load(sw_smem.at[0, pl.ds(wg * tile_n, tile_n)], layout=ch_layout, optimized=False)
        w_wg = w_smem.at[pl.ds(wg * tile_n, tile_n)]
        if not overlap:

            def group_product(acc_ref):
                plgpu.wgmma(acc_ref, x_smem, w_wg.T)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            part = pl.run_scoped(group_product, plgpu.ACC((tile_m, tile_n), jnp.int32))
            return _rescale_add(carry, part, sw)
        acc, prev, prev_sw = carry

        def group_product_overlapped(acc_ref):
            plgpu.wgmma(acc_ref, x_smem, w_wg.T)
            new_acc = _rescale_add(acc, prev, prev_sw)  # previous group, while this group's wgmma runs
            plgpu.wgmma_wait(0)
            return new_acc, acc_ref[...]

        acc, part = pl.run_scoped(group_product_overlapped, plgpu.ACC((tile_m, tile_n), jnp.int32))
        return acc, part, sw

    return build_gemm_kernel(
        m,
        n,
        k,
        r,
        has_bias,
        out_dtype,
        cfg,
        x_tf=x_tf,
        w_tf=x_tf,
        out_tf=out_tf,
        epi_shape=epi_shape,
        out_slots=out_slots,
        lr_tf=lr_tf,
        epilogue=epilogue,
        accumulate=accumulate,
        mma_body=mma_body,
        pipelined_sw=True,
    )


def w4a4_g128_matmul_gpu(
    q_x: jax.Array,
    s_x: jax.Array,
    w: jax.Array,
    s_w: jax.Array,
    x_lr: jax.Array | None = None,
    up: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    out_dtype=jnp.bfloat16,
    config: W4A4Config = G128_CONFIG,  # a G128Config (or a plain W4A4Config: overlap_rescale=False)
    interpret=False,
) -> jax.Array:
    """Mosaic GPU group-scaled (g128) W4A4 GEMM.

    Args:
      q_x: int8 [M, K] activations holding int4 values, M >= config.tile_m (else :func:`w4a4_g128_matmul_gpu_any_m`).
      s_x: f32 [M] per-token scales.
      w: int8 [N, K] weights holding int4 values (unpack packed codes with ``reference.unpack_int4``).
      s_w: f32 [N, K/128] weight scales, one per output channel and group of 128 along K.
      x_lr, up: optional low-rank branch, bf16 [M, r] and [r, N] (r a multiple of 16).
      bias: optional f32 [N].
      out_dtype: bf16 (default) or f32.
      config: tiling (tile_k must be 128; N a multiple of 2 * tile_n).
      interpret: True (or a ``plgpu.InterpretGPUParams``) to run in the Mosaic GPU interpreter on CPU; True poisons
        all buffers with NaN first.
    Returns:
      [M, N] ``out_dtype``.
    """
    if x_lr is not None and x_lr.shape[1] == 0:
        x_lr = up = None
    _check_shapes(q_x, w, s_x, s_w, bias, x_lr, up, config)
    m, k = q_x.shape
    n = w.shape[0]
    r = 0 if x_lr is None else x_lr.shape[1]
    lowrank_mode = config.lowrank_mode or ("chunk" if interpret else "init")
    if lowrank_mode not in ("init", "chunk"):
        raise ValueError(
            f"w4a4_g128_matmul_gpu: config.lowrank_mode must be 'init', 'chunk' or None, got {lowrank_mode!r}"
        )
    kern = _build_kernel(m, n, k, r, bias is not None, jnp.dtype(out_dtype), config, lowrank_mode)
    num_sms = config.num_sms if interpret else _num_sms(config.num_sms)
    f = plgpu.kernel(
        kern,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret),
    )
    # [K/128, N]: the scales of one group are one contiguous row (one TMA per pipeline step).
    args = [q_x, w, s_x.astype(jnp.float32), s_w.astype(jnp.float32).T]
    if bias is not None:
        args.append(bias.astype(jnp.float32))
    if r:
        args += [x_lr.astype(jnp.bfloat16), up.astype(jnp.bfloat16)]
    return f(*args)


def w4a4_g128_matmul_gpu_any_m(q_x, s_x, w, s_w, x_lr=None, up=None, bias=None, **kw):
    """As :func:`w4a4_g128_matmul_gpu`, zero-padding M up to one tile when M < tile_m (decode-size inputs)."""
    cfg = kw.get("config", G128_CONFIG)
    m = q_x.shape[0]
    if m >= cfg.tile_m:
        return w4a4_g128_matmul_gpu(q_x, s_x, w, s_w, x_lr, up, bias, **kw)
    pad = cfg.tile_m - m
    q_x = jnp.pad(q_x, ((0, pad), (0, 0)))
    s_x = jnp.pad(s_x, (0, pad), constant_values=1.0)
    if x_lr is not None:
        x_lr = jnp.pad(x_lr, ((0, pad), (0, 0)))
    return w4a4_g128_matmul_gpu(q_x, s_x, w, s_w, x_lr, up, bias, **kw)[:m]
