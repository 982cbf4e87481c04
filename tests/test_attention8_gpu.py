"""kernels/attention8_gpu.py (Mosaic GPU draft) on CPU: the Mosaic GPU interpreter vs the jnp reference.

The kernel has NEVER run on a GPU: the interpreter checks the data flow (TMA ring, barriers, masking, two-level
accumulation, epilogue) but not wgmma layouts, register limits or speed. On an H100, `python -m bench.attention8`
checks the compiled kernel against the reference first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.kernels import attention8_gpu as G
from wanjax.kernels import attention8_reference as R


@pytest.mark.parametrize(
    "s, pingpong, tile_scale, lean, layout, block_kv",
    [
        (200, True, True, True, "bnsd", 128),
        (300, True, True, True, "bsnd", 128),
        (300, False, False, False, "bnsd", 128),
        (256, True, False, False, "bsnd", 128),
        (300, True, True, False, "bnsd", 128),
        (300, True, True, "nofold", "bsnd", 128),
        (600, True, True, True, "bsnd", 256),
        (300, True, True, "pv_overlap", "bsnd", 128),
        (300, True, True, "softmax_barrier", "bsnd", 128),
        (300, False, True, "qk_prefetch", "bnsd", 128),
        (256, False, True, "qk_prefetch", "bsnd", 128),
        (100, False, True, "qk_prefetch", "bsnd", 128),
        (600, True, True, "q_major", "bsnd", 256),
        (600, True, True, "default", "bsnd", 256),
    ],
)
def test_interpret_matches_reference(s, pingpong, tile_scale, lean, layout, block_kv):
    """S=300 pads to 3 KV tiles of 128 with a 2-slot ring (slot reuse) and a 44-key masked tail (the last tile only);
    S=256 has no padded key (no masked tile); S=600 in KV tiles of 256 (and K scales per 256 keys) pads to 3 tiles with
    a masked tail of 168 keys; pv_overlap (the rescale issued before the PV wait), softmax_barrier and qk_prefetch (S(j+1) in flight during
    tile j; one KV tile at S=100: prologue and last step only) are the same numbers. Both schedules (pingpong or not), both K-scale layouts, with and without
    the lean softmax, head-major and token-major operands (2 heads, so a wrong head stride shows)."""
    cfg = G.GPUConfig(
        block_q=64,
        block_kv=block_kv,
        stages=2,
        pingpong=pingpong,
        tile_scale=tile_scale,
        lean=bool(lean),
        p_regs=False,
        fold_magic=lean != "nofold",
        pv_overlap=lean == "pv_overlap",
        softmax_barrier=lean == "softmax_barrier",
        qk_prefetch=lean == "qk_prefetch",
        q_major=lean == "q_major",
    )
    if lean == "default":  # the shipped default (256-key tiles, pv_overlap, softmax_barrier), P through SMEM
        cfg = G.GPUConfig(p_regs=False)
    key = jax.random.key(s)
    q, k, v = (
        jax.random.normal(jax.random.fold_in(key, i), (1, s, 2, 128), jnp.float32).astype(jnp.bfloat16)
        for i in range(3)
    )
    pc = G.gpu_config_for(cfg)
    want = np.asarray(R.attention8_core(R.quantize_qkv(q, k, v, pc), pc), np.float32)
    x = R.quantize_qkv(q, k, v, pc, layout)  # "bsnd": token-major operands, read by the kernel in place
    got = np.asarray(G.attention8_gpu_core(x, cfg, interpret=True), np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_interpret_batch_of_two_default_config():
    """The shipped default config over a batch of 2 (the guided step runs cond and uncond as one batch): each sample
    matches the reference, and sample 1 of the batch equals the kernel run on sample 1 alone bit for bit (a wrong
    batch stride or mixed samples would show in both)."""
    cfg = G.GPUConfig(p_regs=False)
    key = jax.random.key(11)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (2, 300, 2, 128)).astype(jnp.bfloat16) for i in range(3))
    pc = G.gpu_config_for(cfg)
    got = np.asarray(G.attention8_gpu_core(R.quantize_qkv(q, k, v, pc, "bsnd"), cfg, interpret=True), np.float32)
    assert got.shape == (2, 300, 2, 128) and np.isfinite(got).all()
    want = np.asarray(R.attention8_core(R.quantize_qkv(q, k, v, pc), pc), np.float32)
    for b in range(2):
        np.testing.assert_allclose(got[b], want[b], rtol=1e-2, atol=1e-2 * np.abs(want[b]).max())
    x1 = R.quantize_qkv(q[1:], k[1:], v[1:], pc, "bsnd")
    alone = np.asarray(G.attention8_gpu_core(x1, cfg, interpret=True), np.float32)
    np.testing.assert_array_equal(alone[0], got[1])


def test_bsnd_prepass_is_the_same_numbers():
    """quantize_qkv(layout="bsnd") = the head-major pre-pass transposed: codes, scales and V bit for bit."""
    key = jax.random.key(7)
    q, k, v = (
        (jax.random.normal(jax.random.fold_in(key, i), (2, 300, 3, 64)) * (1 + 5 * (i == 1))).astype(jnp.bfloat16)
        for i in range(3)
    )
    a = R.quantize_qkv(q, k, v)
    b = R.quantize_qkv(q, k, v, layout="bsnd")
    for name in ("q", "k", "v"):
        np.testing.assert_array_equal(
            np.asarray(getattr(a, name)).astype(np.float32),
            np.asarray(getattr(b, name)).transpose(0, 2, 1, 3).astype(np.float32),
        )
    for name in ("q_scale", "k_scale", "v_scale"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    with pytest.raises(ValueError, match="reads 'bnsd'"):
        R.attention8_core(b)
    with pytest.raises(ValueError, match="layout"):
        R.quantize_qkv(q, k, v, layout="nsbd")


def test_verified_default_and_shape_errors():
    # the default config matched the reference on an H100 (bench.attention8, 2026-12-07): the kernel is the GPU default
    assert G.VERIFIED is True
    assert (G.GPUConfig().block_kv, G.gpu_config_for().k_block, R.DEFAULT.kv_block) == (256, 256, 256)
    x = R.quantize_qkv(*(jnp.zeros((1, 64, 1, 96), jnp.bfloat16),) * 3, R.Attn8Config(q_block=64, kv_block=128))
    with pytest.raises(ValueError, match="multiple"):
        G.attention8_gpu_core(x)


def test_magic_int_to_float_exact_over_the_int8_dot_range():
    """lean=True converts int32 scores by bitcast(i + MAGIC_I32) - MAGIC_F32: exact for every |i| < 2**22, which covers
    any int8 dot product of length <= 256 (127 * 127 * 256 = 4,129,024)."""
    edge = np.array([0, 1, -1, 127 * 127 * 128, -(127 * 127 * 256), 2**22 - 1, -(2**22) + 1], np.int32)
    rand = np.random.default_rng(0).integers(-(2**22) + 1, 2**22, 100_000, dtype=np.int32)
    i = jnp.asarray(np.concatenate([edge, rand]))
    got = jax.lax.bitcast_convert_type(i + jnp.int32(G.MAGIC_I32), jnp.float32) - jnp.float32(G.MAGIC_F32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(i).astype(np.float32))
    # one past the range it is wrong, so the bound in the docstring is the real one
    j = jnp.int32(2**22 + 1)
    bad = jax.lax.bitcast_convert_type(j + jnp.int32(G.MAGIC_I32), jnp.float32) - jnp.float32(G.MAGIC_F32)
    assert float(bad) != float(2**22 + 1)


def _thread_elements(layout, shape):
    """{(warp, lane): flat element indices [registers..., vector]} of a Mosaic TiledLayout, from its tiling, warp,
    lane and vector dims (a NumPy model of how the layout places an array on a warpgroup's threads)."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    for tile in layout.tiling.tiles:
        lead, tail = idx.shape[: idx.ndim - len(tile)], idx.shape[idx.ndim - len(tile) :]
        split = [x for t, n in zip(tile, tail) for x in (n // t, t)]
        idx = idx.reshape(lead + tuple(split))
        k = len(lead)
        order = list(range(k)) + [k + 2 * i for i in range(len(tile))] + [k + 2 * i + 1 for i in range(len(tile))]
        idx = idx.transpose(order)
    nd = idx.ndim
    (wd,) = [d % nd for d in layout.warp_dims]
    ld = [d % nd for d in layout.lane_dims]
    vd = layout.vector_dim % nd
    out = {}
    for w in range(idx.shape[wd]):
        for lane in np.ndindex(*(idx.shape[d] for d in ld)):
            sel = [slice(None)] * nd
            sel[wd] = w
            for d, i in zip(ld, lane):
                sel[d] = i
            view = idx[tuple(sel)]  # remaining dims: registers..., vector (vector last since it is the minor dim)
            out[(w, lane)] = view.reshape(-1, idx.shape[vd])
    return out


def test_p_regs_order_matches_the_mosaic_layouts():
    """p_regs joins the e4m3 pairs of 8-column chunks 2c and 2c+1 (WGMMA layout) into the 4-byte registers of the
    8-bit A-operand layout (WGMMA_8BIT). Modelled on Mosaic's own layout definitions, the joined registers hold P with
    its keys reordered within every 16 exactly as P_REGS_ORDER (the order the pre-pass gives V's tokens)."""
    from jax.experimental.mosaic.gpu import fragmented_array as fa

    shape = (64, 128)
    acc = _thread_elements(fa.WGMMA_LAYOUT, shape)
    a8 = _thread_elements(fa.WGMMA_LAYOUT_8BIT, shape)
    assert fa.WGMMA_LAYOUT.registers_shape(shape)[1] == 2 * fa.WGMMA_LAYOUT_8BIT.registers_shape(shape)[1]
    regs_shape = fa.WGMMA_LAYOUT.registers_shape(shape)
    p = np.random.default_rng(0).standard_normal(shape)
    flat = p.reshape(-1)
    got = np.full(shape, np.nan)
    for thread, elems in acc.items():
        regs = flat[elems].reshape(tuple(regs_shape) + (2,))  # [1, 16, 1, 1, 2, 1, 1, 1, 1, vec 2]
        joined = np.concatenate([regs[:, 0::2], regs[:, 1::2]], axis=-1)  # chunk 2c ++ chunk 2c+1
        got.reshape(-1)[a8[thread].reshape(-1)] = joined.reshape(-1)
    assert not np.isnan(got).any()  # every position written once
    perm = (np.arange(128 // 16)[:, None] * 16 + np.asarray(G.P_REGS_ORDER)[None, :]).reshape(-1)
    np.testing.assert_array_equal(got, p[:, perm])
    # and so P' @ V[perm] == P @ V, which is what the kernel computes
    v = np.random.default_rng(1).standard_normal((128, 8))
    np.testing.assert_allclose(got @ v[perm], p @ v, rtol=1e-12, atol=1e-12)


def test_p_regs_refuses_interpret_and_needs_lean():
    x = R.quantize_qkv(*(jnp.zeros((1, 128, 1, 128), jnp.bfloat16),) * 3, G.gpu_config_for(G.GPUConfig()))
    with pytest.raises(NotImplementedError, match="interpreted"):
        G.attention8_gpu_core(x, G.GPUConfig(p_regs=True), interpret=True)
    with pytest.raises(ValueError, match="lean"):
        G._build(1, 1, 128, 128, 128, 128, G.GPUConfig(p_regs=True, lean=False))
    with pytest.raises(ValueError, match="qk_prefetch needs pingpong=False"):
        G.attention8_gpu_core(x, G.GPUConfig(p_regs=False, qk_prefetch=True), interpret=True)
    with pytest.raises(ValueError, match="qk_prefetch needs"):
        G.attention8_gpu_core(x, G.GPUConfig(p_regs=False, pingpong=False, lean=False, qk_prefetch=True))


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"bsnd": False},
        {"p_regs": False, "lean": False, "tile_scale": False, "pingpong": False},
        {"pv_overlap": True, "softmax_barrier": True},
        {"block_kv": 256},
        {"pingpong": False, "qk_prefetch": True, "softmax_barrier": True},
        {"q_major": True},
        {"block_kv": 128, "pv_overlap": False, "softmax_barrier": False},
    ],
)
def test_lowers_for_cuda_on_a_cpu_host(spec):
    """Every kernel config lowers through Pallas Mosaic GPU for CUDA on this CPU host (catches lowering errors of
    variants, P in registers and the prefetch's nested accumulators included, before a GPU run); S=1000 pads."""
    cfg = G.GPUConfig(**spec)
    q = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    lowered = (
        jax.jit(lambda a, b, c: G._attention8_gpu(a, b, c, cfg)).trace(q, q, q).lower(lowering_platforms=("cuda",))
    )
    text = lowered.as_text()
    assert "mosaic_gpu" in text and "attn8_kernel" in text
