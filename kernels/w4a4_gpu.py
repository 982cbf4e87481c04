"""W4A4 GEMM for Hopper (H100/H200) in Pallas Mosaic GPU: int8 ``wgmma`` (s8 x s8 -> s32) with a fused epilogue.

H100 has no 4-bit tensor cores, so the 4-bit product is computed exactly on the int8 tensor cores (int4 values embed
in int8). Computes::

    out[m, n] = acc[m, n] * s_x[m] * s_w[n] + bias[n] + (x_lr @ up)[m, n]        acc = q_x @ q_w^T (int32, exact)

Structure (adapted from the Hopper matmul pattern of jax's ``hopper_matmul_mgpu`` example, rewritten for int8):

* persistent grid of ``num_sms`` CTAs walking the (M, N) output tiles in a planar snake;
* per CTA one TMA (memory) warpgroup and two compute warpgroups (``emit_pipeline_warp_specialized``), each compute
  warpgroup owns a ``tile_m x tile_n`` int32 accumulator; the CTA tile is ``tile_m x 2*tile_n``;
* both operands K-major in SMEM (8-bit ``wgmma`` cannot transpose): activations [M, K], weights [N, K];
* epilogue in registers: int32 -> f32, per-token and per-channel scales, bias; then the low-rank term as a second
  (bf16) ``wgmma`` that accumulates onto the scaled result (no extra registers), bf16/f32 out through SMEM + TMA;
* M needs no padding: the last M tile is shifted back to end at row M (rows computed twice hold identical values).

Two weight encodings:

* ``weights="int8"``: int8 [N, K] holding int4 values (unpacked from the packed uint8 codes by one cheap XLA pass);
* ``weights="fp8"``: activations and weights float8_e4m3fn, FP8 ``wgmma`` with f32 accumulation (MXFP4 re-encoded,
  ``kernels.mxfp4_gpu``);
* ``weights="int4"``: the packed codes themselves, reinterpreted as ``jnp.int4`` [N, K] and TMA'd packed into SMEM;
  the compute warpgroups load them into registers as int8 (``WGMMA_8BIT`` layout) and issue ``wgmma`` with the weight
  as the register A operand, i.e. they compute the transposed tile out^T = W x^T (activations are then the K-major B
  operand). This variant cannot run in the Mosaic GPU interpreter (register-A ``wgmma`` is not implemented there).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

H100_NUM_SMS = 132


@dataclasses.dataclass(frozen=True)
class W4A4Config:
    """Tiling of the W4A4 GEMM. CTA tile = tile_m x (2 * tile_n) (two compute warpgroups split N)."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 3
    # Epilogue chunk width and SMEM buffers per WG; None = the largest (64/32/16 wide, 2 then 1 buffers) that fits the
    # SMEM budget next to the pipeline buffers.
    epi_tile_n: int | None = None
    out_slots: int | None = None
    grid_tile_width: int = 4  # chosen by the tile-width sweep (BENCHMARKS.md, "Kernels"): L2 reuse of the snake order
    grid_minor_n: bool = True
    num_sms: int = H100_NUM_SMS
    # How the low-rank term x_lr @ up joins the result: "init" = a bf16 wgmma accumulating onto the scaled f32 tile
    # (no extra registers; the interpreter cannot run it), "chunk" = one small wgmma per epilogue chunk, added in
    # registers. None = "init" on GPU, "chunk" in interpret mode.
    lowrank_mode: str | None = None


DEFAULT_CONFIG = W4A4Config()


def _num_sms(default: int) -> int:
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return int(dev.core_count)
    except Exception:  # pragma: no cover - no device / CPU-only
        pass
    return default


def _check_shapes(q_x, w, s_x, s_w, bias, x_lr, up, cfg, packed_k):
    m, k = q_x.shape
    n, kw = w.shape
    if kw != k:
        raise ValueError(
            f"w4a4_matmul_gpu: weights [N, K] must match q_x [M, K]: got q_x {q_x.shape}, w {w.shape}"
            f" ({'int4' if packed_k else 'int8'} view)"
        )
    want_x = jnp.float8_e4m3fn if w.dtype == jnp.float8_e4m3fn else jnp.int8
    if q_x.dtype != want_x:
        raise ValueError(f"w4a4_matmul_gpu: q_x must be {jnp.dtype(want_x).name}, got {q_x.dtype}")
    if s_x.shape != (m,) or s_w.shape != (n,):
        raise ValueError(f"w4a4_matmul_gpu: s_x must be [{m}] and s_w [{n}], got {s_x.shape}, {s_w.shape}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"w4a4_matmul_gpu: bias must be [{n}], got {bias.shape}")
    if (x_lr is None) != (up is None):
        raise ValueError("w4a4_matmul_gpu: x_lr and up must be given together")
    if x_lr is not None:
        r = x_lr.shape[1]
        if x_lr.shape != (m, r) or up.shape != (r, n):
            raise ValueError(
                f"w4a4_matmul_gpu: x_lr must be [M={m}, r] and up [r, N={n}], got {x_lr.shape}, {up.shape}"
            )
        if r % 16:
            raise ValueError(f"w4a4_matmul_gpu: low-rank r must be a multiple of 16 (bf16 wgmma k), got r={r}")
    if n % (2 * cfg.tile_n):
        raise ValueError(f"w4a4_matmul_gpu: N={n} must be a multiple of the CTA tile 2*tile_n={2 * cfg.tile_n}")
    if k % cfg.tile_k:
        raise ValueError(f"w4a4_matmul_gpu: K={k} must be a multiple of tile_k={cfg.tile_k}")


def _swizzled(shape_minor_bytes: int, itemsize: int):
    swizzle = plgpu.find_swizzle(shape_minor_bytes * 8)
    elems = swizzle // itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


SMEM_BYTES = 232448  # per-block shared-memory limit on H100/H200


def smem_bytes(cfg: W4A4Config, r: int, out_itemsize: int, weights: str, epi_n: int, out_slots: int) -> int:
    """Shared memory the kernel allocates (pipeline stages + epilogue buffers + low-rank tiles), excluding barriers."""
    w_bytes = cfg.tile_k // 2 if weights == "int4" else cfg.tile_k
    pipe = cfg.stages * (cfg.tile_m * cfg.tile_k + 2 * cfg.tile_n * w_bytes)
    out = 2 * out_slots * max(cfg.tile_m, cfg.tile_n) * epi_n * out_itemsize
    lr = (2 * cfg.tile_m * r + 2 * r * cfg.tile_n) * 2 if r else 0
    return pipe + out + lr


def fit_epilogue(cfg: W4A4Config, r: int, out_itemsize: int, weights: str, extra_bytes: int = 0) -> tuple[int, int]:
    """(epi_tile_n, out_slots): the configured ones, or the largest that fit in shared memory (next to
    ``extra_bytes`` of other buffers)."""
    slack = 2048  # barriers and alignment
    cands = [(e, s) for s in (2, 1) for e in (64, 32, 16)]
    cands.sort(key=lambda es: (-(es[0] * es[1] >= 64), -es[1], -es[0]))
    if cfg.epi_tile_n is not None:
        cands = [(cfg.epi_tile_n, s) for s in (2, 1)]
    if cfg.out_slots is not None:
        cands = [(e, s) for e, s in cands if s == cfg.out_slots]
    for e, s in cands:
        if smem_bytes(cfg, r, out_itemsize, weights, e, s) + extra_bytes + slack <= SMEM_BYTES:
            return e, s
    e, s = cands[-1]
    need = smem_bytes(cfg, r, out_itemsize, weights, e, s) + extra_bytes
    raise ValueError(
        f"w4a4_matmul_gpu: config {cfg} needs {need} B of shared memory (> {SMEM_BYTES}); use fewer "
        "stages or smaller tiles"
    )


def fit_stages(cfg: W4A4Config, r: int, out_itemsize: int, weights: str, extra_bytes: int = 0) -> W4A4Config:
    """``cfg``, or ``cfg`` with fewer pipeline stages (down to 2) where its stages, the smallest epilogue and a
    rank-``r`` low-rank branch would not fit in shared memory (e.g. rank 96: the default rank 32 plus a rank-64
    LoRA). The stage count changes only the overlap of loads and MMAs, not the numbers."""
    while cfg.stages > 2:
        try:
            fit_epilogue(cfg, r, out_itemsize, weights, extra_bytes)
            return cfg
        except ValueError:
            cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    return cfg


def build_gemm_kernel(
    m,
    n,
    k,
    r,
    has_bias,
    out_dtype,
    cfg: W4A4Config,
    *,
    x_tf,
    w_tf,
    out_tf,
    epi_shape,
    out_slots,
    lr_tf,
    epilogue,
    accumulate,
    mma_body,
    pipelined_sw: bool = False,
):
    """The Hopper GEMM scaffolding shared by the per-channel (this module) and the group-scaled
    (``kernels.w4a4_g128_gpu``) kernels: persistent snake over the (M, N) tiles, one TMA warpgroup and two compute
    warpgroups (``emit_pipeline_warp_specialized`` over K), SMEM for the epilogue and the low-rank operands, the
    low-rank TMA copies, the epilogue call.

    Kernel operands: ``(x, w, s_x, s_w[, bias][, x_lr, up], out)``. The variant points:

    * ``accumulate(eval_pipeline, finish)``: runs the K pipeline on the variant's accumulator (an ``ACC`` ref, or a
      register carry promoted per group) and calls ``finish(acc)`` (the epilogue) with the f32/int32 tile;
    * ``mma_body(wg, step, x_smem, w_smem[, sw_smem], carry)``: one K step of a compute warpgroup;
    * ``pipelined_sw``: s_w^T [K/128, N] is pipelined with the operands (one row of group scales per K step) and the
      epilogue applies only s_x; otherwise the epilogue reads the per-channel ``s_w`` from GMEM.
    """
    tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_m, cta_n = tile_m, 2 * tile_n
    m_iters = pl.cdiv(m, cta_m)
    n_iters = n // cta_n
    k_iters = k // tile_k

    def kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, *rest):
        rest = list(rest)
        bias_gmem = rest.pop(0) if has_bias else None
        xlr_gmem = rest.pop(0) if r else None
        up_gmem = rest.pop(0) if r else None
        (out_gmem,) = rest

        def get_pipeline(body, compute_context):
            in_specs = [
                plgpu.BlockSpec((cta_m, tile_k), lambda kk: (0, kk), transforms=x_tf, memory_space=plgpu.SMEM),
                plgpu.BlockSpec((cta_n, tile_k), lambda kk: (0, kk), transforms=w_tf, memory_space=plgpu.SMEM),
            ]
            if pipelined_sw:
                in_specs.append(
                    plgpu.BlockSpec((1, cta_n), lambda kk: (kk, 0), memory_space=plgpu.SMEM)
                )  # s_w^T row kk
            return plgpu.emit_pipeline_warp_specialized(
                body,
                grid=(k_iters,),
                memory_registers=40,
                in_specs=in_specs,
                wg_axis="wg",
                num_compute_wgs=2,
                max_concurrent_steps=cfg.stages,
                compute_context=compute_context,
            )

        ignore = lambda *_, **__: None
        piped = (x_gmem, w_gmem, sw_gmem) if pipelined_sw else (x_gmem, w_gmem)
        scoped = dict(
            pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(*piped),
            out_smem=plgpu.SMEM((2, out_slots, *epi_shape), out_dtype, transforms=out_tf),
        )
        if r:
            scoped["xlr_smem"] = plgpu.SMEM((2, cta_m, r), jnp.bfloat16, transforms=lr_tf)  # one per compute WG
            scoped["up_smem"] = plgpu.SMEM(
                (2, r, tile_n), jnp.bfloat16, transforms=lr_tf
            )  # wgmma: same swizzle for both
            scoped["lr_bar"] = plgpu.Barrier(num_barriers=4)

        @functools.partial(pl.run_scoped, **scoped, collective_axes="wg")
        def _scope(pipeline_allocs, out_smem, xlr_smem=None, up_smem=None, lr_bar=None):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile_loop(info: plgpu.NDLoopInfo):
                (lin,) = info.index
                mi, ni = _snake(lin, m_iters, n_iters, cfg)
                # Shift the last M tile back so it ends at row m (no out-of-bounds rows).
                m0 = jnp.minimum(mi * cta_m, m - cta_m)
                m_sl = pl.ds(m0, cta_m)
                n_cta_sl = pl.ds(ni * cta_n, cta_n)
                n_wg0 = ni * cta_n + wg * tile_n
                n_wg_sl = pl.ds(n_wg0, tile_n)

                def finish(acc):
                    epilogue(
                        acc,
                        wg,
                        m0,
                        m_sl,
                        n_wg0,
                        n_wg_sl,
                        out_smem,
                        xlr_smem,
                        up_smem,
                        lr_bar,
                        sx_gmem,
                        None if pipelined_sw else sw_gmem,
                        bias_gmem,
                        out_gmem,
                    )

                def compute_context(eval_pipeline):
                    if r:
                        plgpu.copy_gmem_to_smem(xlr_gmem.at[m_sl], xlr_smem.at[wg], lr_bar.at[2 * wg])
                        plgpu.copy_gmem_to_smem(up_gmem.at[:, n_wg_sl], up_smem.at[wg], lr_bar.at[2 * wg + 1])
                    accumulate(eval_pipeline, finish)

                def body(*args):
                    return mma_body(wg, *args)

                operands = (x_gmem.at[m_sl, :], w_gmem.at[n_cta_sl, :])
                if pipelined_sw:
                    operands += (sw_gmem.at[:, n_cta_sl],)
                get_pipeline(body, compute_context)(*operands, allocations=pipeline_allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return kernel


def _build_kernel(m, n, k, r, has_bias, out_dtype, cfg: W4A4Config, weights: str, lowrank_mode: str):
    """The per-channel kernel: one ``ACC`` accumulator over all of K (int32, or f32 for FP8), scales in the epilogue."""
    tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k
    transposed = weights == "int4"

    x_tf = _swizzled(tile_k, 1)
    if transposed:
        # int4 tile (tile_n, tile_k) packed: tile_k/2 bytes per row.
        w_tf = _swizzled(tile_k // 2, 1)
        w_tf = (plgpu.TilingTransform((8, w_tf[1].swizzle * 2)), w_tf[1])
    else:
        w_tf = x_tf
    # Epilogue output tiles: (tile_m, epi_n) normally; (tile_n, epi_m) for the transposed variant.
    out_itemsize = jnp.dtype(out_dtype).itemsize
    epi_n, out_slots = fit_epilogue(cfg, r, out_itemsize, weights)
    if transposed:
        # SMEM tile in output orientation [epi_n tokens, tile_n channels], written through a transposed view.
        epi_shape = (epi_n, tile_n)
        out_tf = _swizzled(tile_n * out_itemsize, out_itemsize)
    else:
        epi_shape = (tile_m, epi_n)
        out_tf = _swizzled(epi_n * out_itemsize, out_itemsize)
    lr_tf = _swizzled(r * 2, 2) if r else None  # Mosaic wgmma wants both low-rank operands with the same swizzle
    acc_shape = (tile_n, tile_m) if transposed else (tile_m, tile_n)
    acc_dtype = jnp.float32 if weights == "fp8" else jnp.int32

    def accumulate(eval_pipeline, finish):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(acc_shape, acc_dtype))
        def _acc_scope(acc_ref):
            eval_pipeline(acc_ref)
            acc = acc_ref[...]
            finish(acc)

    def mma_body(wg, _, x_smem, w_smem, acc_ref):
        w_wg = w_smem.at[pl.ds(wg * tile_n, tile_n)]
        if transposed:
            w_regs = plgpu.load(w_wg, layout=plgpu.Layout.WGMMA_8BIT, optimized=True).astype(jnp.int8)
            plgpu.wgmma(acc_ref, w_regs, x_smem.T)
        else:
            plgpu.wgmma(acc_ref, x_smem, w_wg.T)
        plgpu.wgmma_wait(0)
        return acc_ref

    epilogue = make_epilogue(
        tile_m=tile_m,
        tile_n=tile_n,
        epi_n=epi_n,
        out_slots=out_slots,
        r=r,
        lowrank_mode=lowrank_mode,
        transposed=transposed,
    )
    return build_gemm_kernel(
        m,
        n,
        k,
        r,
        has_bias,
        out_dtype,
        cfg,
        x_tf=x_tf,
        w_tf=w_tf,
        out_tf=out_tf,
        epi_shape=epi_shape,
        out_slots=out_slots,
        lr_tf=lr_tf,
        epilogue=epilogue,
        accumulate=accumulate,
        mma_body=mma_body,
    )


def make_epilogue(*, tile_m: int, tile_n: int, epi_n: int, out_slots: int, r: int, lowrank_mode: str, transposed: bool):
    """The fused epilogue of one compute warpgroup's accumulator tile (shared with ``kernels.w4a4_g128_gpu``).

    Returned function: ``(acc, wg, m0, m_sl, n_wg0, n_wg_sl, out_smem, xlr_smem, up_smem, lr_bar, sx_gmem, sw_gmem,
    bias_gmem, out_gmem)``: f32(acc) * s_x[m] (* s_w[n] unless ``sw_gmem`` is None) + bias + low-rank, written to
    ``out_gmem`` through ``out_smem`` in chunks of ``epi_n``.
    """

    def _epilogue(
        acc, wg, m0, m_sl, n_wg0, n_wg_sl, out_smem, xlr_smem, up_smem, lr_bar, sx_gmem, sw_gmem, bias_gmem, out_gmem
    ):
        # Row/col vectors in the accumulator's reduced layouts.
        tok_axis, ch_axis = (1, 0) if transposed else (0, 1)
        tok_layout = plgpu.Layout.WGMMA.reduce(1 - tok_axis)  # keeps the token axis
        ch_layout = plgpu.Layout.WGMMA.reduce(1 - ch_axis)
        sx = plgpu.load(sx_gmem.at[m_sl], layout=tok_layout, optimized=False)
        y = acc.astype(jnp.float32)
        y = y * lax.broadcast_in_dim(sx, y.shape, [tok_axis])
        if sw_gmem is not None:  # None: the channel scales are already in acc (group-scaled kernel)
            sw = plgpu.load(sw_gmem.at[n_wg_sl], layout=ch_layout, optimized=False)
            y = y * lax.broadcast_in_dim(sw, y.shape, [ch_axis])
        if bias_gmem is not None:
            b = plgpu.load(bias_gmem.at[n_wg_sl], layout=ch_layout, optimized=False)
            y = y + lax.broadcast_in_dim(b, y.shape, [ch_axis])
        if r:
            plgpu.barrier_wait(lr_bar.at[2 * wg])
            plgpu.barrier_wait(lr_bar.at[2 * wg + 1])
        if r and lowrank_mode == "init":
            # Accumulate the low-rank product directly onto the scaled result (no extra registers).
            def lowrank(lr_acc):
                if transposed:  # out^T[n, m] += up^T[n, :] @ x_lr^T[:, m]
                    plgpu.wgmma(lr_acc, up_smem.at[wg].T, xlr_smem.at[wg].T)
                else:
                    plgpu.wgmma(lr_acc, xlr_smem.at[wg], up_smem.at[wg])
                plgpu.wgmma_wait(0)

            y = pl.run_state(lowrank)(plgpu.ACC.init(y))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        if transposed:
            # out^T tile (tile_n, tile_m): write tile_m columns in chunks of epi_n tokens.
            for j in range(tile_m // epi_n):
                slot = j % out_slots
                plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)
                chunk = y[:, j * epi_n : (j + 1) * epi_n]
                if r and lowrank_mode == "chunk":
                    chunk = chunk + _lowrank_chunk(up_smem.at[wg].T, xlr_smem.at[wg, pl.ds(j * epi_n, epi_n)].T)
                out_smem.at[wg, slot].T[...] = plgpu.layout_cast(
                    chunk.astype(out_smem.dtype), plgpu.Layout.WGMMA_TRANSPOSED
                )
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_gmem.at[pl.ds(m0 + j * epi_n, epi_n), n_wg_sl])
        else:
            for j in range(tile_n // epi_n):
                slot = j % out_slots
                plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)
                chunk = y[:, j * epi_n : (j + 1) * epi_n]
                if r and lowrank_mode == "chunk":
                    chunk = chunk + _lowrank_chunk(xlr_smem.at[wg], up_smem.at[wg, :, pl.ds(j * epi_n, epi_n)])
                out_smem[wg, slot] = chunk.astype(out_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_gmem.at[m_sl, pl.ds(n_wg0 + j * epi_n, epi_n)])

    return _epilogue


def _lowrank_chunk(a_smem, b_smem):
    """a @ b for one epilogue chunk (bf16 wgmma into a fresh f32 accumulator)."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC((a_smem.shape[0], b_smem.shape[1]), jnp.float32))


def _snake(lin, m_iters, n_iters, cfg):
    dim = 1 if cfg.grid_minor_n else 0
    return plgpu.planar_snake(lin, (m_iters, n_iters), dim, cfg.grid_tile_width)


def _interpret_params(interpret):
    if interpret is True:
        # Poisoned outputs: every buffer starts as NaN, so an unwritten output element fails the tests.
        return plgpu.InterpretGPUParams(uninitialized_memory="nan")
    return interpret or False


def w4a4_matmul_gpu(
    q_x: jax.Array,
    s_x: jax.Array,
    w: jax.Array,
    s_w: jax.Array,
    x_lr: jax.Array | None = None,
    up: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    out_dtype=jnp.bfloat16,
    weights: str = "int8",
    config: W4A4Config = DEFAULT_CONFIG,
    interpret=False,
) -> jax.Array:
    """Mosaic GPU W4A4 GEMM.

    Args:
      q_x: int8 [M, K] activations holding int4 values. M >= config.tile_m (smaller M: pad first, see
        :func:`w4a4_matmul_gpu_any_m`).
      s_x: f32 [M] per-token scales.
      w: for ``weights="int8"`` int8 [N, K] (int4 values); for ``weights="int4"`` packed uint8 [N, K/2]
        (see ``kernels.reference.pack_int4``) or ``jnp.int4`` [N, K].
      s_w: f32 [N] per-channel weight scales.
      x_lr, up: optional low-rank branch, bf16 [M, r] and [r, N] (r a multiple of 16).
      bias: optional f32 [N].
      out_dtype: bf16 (default) or f32.
      weights: "int8" or "int4" (see module docstring), or "fp8": q_x and w both float8_e4m3fn, f32 accumulation
        (the MXFP4 path, see ``kernels.mxfp4_gpu``).
      config: tiling.
      interpret: True (or a ``plgpu.InterpretGPUParams``) to run in the Mosaic GPU interpreter on CPU (int8 weights
        only); True poisons all buffers with NaN first.
    Returns:
      [M, N] ``out_dtype``.
    """
    if weights not in ("int8", "int4", "fp8"):
        raise ValueError(f"w4a4_matmul_gpu: weights must be 'int8', 'int4' or 'fp8', got {weights!r}")
    if weights == "int4":
        if w.dtype == jnp.uint8:
            from wanjax.numerics.pack import packed_as_int4

            w = packed_as_int4(w)
        if w.dtype != jnp.int4:
            raise ValueError(
                f"w4a4_matmul_gpu(weights='int4'): expected packed uint8 or jnp.int4 weights, got {w.dtype}"
            )
        if interpret:
            raise NotImplementedError(
                "the int4-in-registers variant uses register-A wgmma, which the Mosaic GPU "
                "interpreter does not implement; use weights='int8' in interpret mode"
            )
    elif weights == "fp8":
        if w.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"w4a4_matmul_gpu(weights='fp8'): expected float8_e4m3fn [N, K] weights, got {w.dtype}")
    elif w.dtype != jnp.int8:
        raise ValueError(f"w4a4_matmul_gpu(weights='int8'): expected int8 [N, K] weights, got {w.dtype}")
    if x_lr is not None and x_lr.shape[1] == 0:
        x_lr = up = None
    _check_shapes(q_x, w, s_x, s_w, bias, x_lr, up, config, weights == "int4")
    m, k = q_x.shape
    n = w.shape[0]
    if m < config.tile_m:
        raise ValueError(f"w4a4_matmul_gpu: M={m} < tile_m={config.tile_m}; pad M first (w4a4_matmul_gpu_any_m)")
    r = 0 if x_lr is None else x_lr.shape[1]
    lowrank_mode = config.lowrank_mode or ("chunk" if interpret else "init")
    if lowrank_mode not in ("init", "chunk"):
        raise ValueError(f"w4a4_matmul_gpu: config.lowrank_mode must be 'init', 'chunk' or None, got {lowrank_mode!r}")
    config = fit_stages(config, r, jnp.dtype(out_dtype).itemsize, weights)
    kern = _build_kernel(m, n, k, r, bias is not None, jnp.dtype(out_dtype), config, weights, lowrank_mode)
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
    args = [q_x, w, s_x.astype(jnp.float32), s_w.astype(jnp.float32)]
    if bias is not None:
        args.append(bias.astype(jnp.float32))
    if r:
        args += [x_lr.astype(jnp.bfloat16), up.astype(jnp.bfloat16)]
    return f(*args)


def w4a4_matmul_gpu_any_m(q_x, s_x, w, s_w, x_lr=None, up=None, bias=None, **kw):
    """As :func:`w4a4_matmul_gpu` for any M: zero rows are appended up to one tile when M < tile_m (decode-size
    inputs) and up to a multiple of 8 otherwise (the kernel does not lower for CUDA when M % 8 != 0, e.g. the 31,668
    tokens of the official 480p size rule at batch 1); the padded rows are sliced off."""
    cfg = kw.get("config", DEFAULT_CONFIG)
    m = q_x.shape[0]
    target = max(cfg.tile_m, -(-m // 8) * 8)
    if target == m:
        return w4a4_matmul_gpu(q_x, s_x, w, s_w, x_lr, up, bias, **kw)
    pad = target - m
    q_x = jnp.pad(q_x, ((0, pad), (0, 0)))
    s_x = jnp.pad(s_x, (0, pad), constant_values=1.0)
    if x_lr is not None:
        x_lr = jnp.pad(x_lr, ((0, pad), (0, 0)))
    return w4a4_matmul_gpu(q_x, s_x, w, s_w, x_lr, up, bias, **kw)[:m]
