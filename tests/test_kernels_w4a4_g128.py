"""kernels/w4a4_g128_gpu.py (group-scaled int4 W4A4 GEMM, one weight scale per channel and group of 128 along K) on
CPU: Mosaic GPU interpreter runs vs ``reference.w4a4_g128_reference`` (all buffers start as NaN, so unwritten outputs
fail), lowering for CUDA at the full Wan shapes, the dispatcher's group_size path and QLinear real mode with g128
weights.

Exactness: with unit token scales, f32 output and power-of-two group scales every partial sum is an exactly
representable f32, so the kernel's f32 group accumulation must equal the reference bit for bit; a one-hot group scale
isolates one group's int32 accumulation.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from wanjax.kernels import dispatch
from wanjax.kernels import reference as ref
from wanjax.kernels.w4a4_g128_gpu import G128_CONFIG, G128Config, w4a4_g128_matmul_gpu, w4a4_g128_matmul_gpu_any_m
from wanjax.kernels.w4a4_gpu import W4A4Config, fit_epilogue
from kernel_inputs import w4a4_inputs

# small tiles so that the interpreter stays fast; CTA tile = 64 x 128
SMALL = W4A4Config(tile_m=64, tile_n=64, tile_k=128, stages=2, num_sms=3)
SMALL_OVERLAP = G128Config(tile_m=64, tile_n=64, tile_k=128, stages=2, num_sms=3, overlap_rescale=True)


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite output (unwritten elements stay NaN)"
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _group_scales(seed, n, g):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0.01, 0.1, (n, g)), jnp.float32)


def test_one_group_int32_accumulation_exact():
    """One-hot group scale: the output is group 1's int32 accumulation exactly (f32 out, unit scales, M odd)."""
    m, k, n = 77, 256, 128
    qx, qw, _, _, _, _, _ = w4a4_inputs(3, m, k, n, 0)
    sw = jnp.zeros((n, 2), jnp.float32).at[:, 1].set(1.0)
    out = w4a4_g128_matmul_gpu(
        qx, jnp.ones((m,), jnp.float32), qw, sw, out_dtype=jnp.float32, config=SMALL, interpret=True
    )
    acc_g = ref.int_matmul_nt_grouped(qx, qw, 128)
    assert acc_g.shape == (2, m, n)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(acc_g[1], np.float32))


def test_group_sum_exact_power_of_two_scales():
    """K = 640 (5 groups), s_w[n, g] = 2^-e: the scaled f32 sum over groups is exact, so kernel == reference (with
    overlap_rescale=True: the previous group's rescale overlaps the wgmma; the default schedule is covered by the
    one-hot test above and the r = 0 epilogue test)."""
    cfg = SMALL_OVERLAP
    m, k, n = 77, 640, 128
    qx, qw, _, _, _, _, _ = w4a4_inputs(4, m, k, n, 0)
    e = np.random.default_rng(5).integers(0, 4, (n, k // 128))
    sw = jnp.asarray(2.0**-e, jnp.float32)
    ones = jnp.ones((m,), jnp.float32)
    out = w4a4_g128_matmul_gpu(qx, ones, qw, sw, out_dtype=jnp.float32, config=cfg, interpret=True)
    exp = ref.w4a4_g128_reference(qx, ones, qw, sw, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(exp))
    # and the reference is the per-group int32 sum, weighted
    acc_g = np.asarray(ref.int_matmul_nt_grouped(qx, qw, 128), np.float64)
    np.testing.assert_array_equal(
        np.asarray(exp, np.float64), np.einsum("gmn,ng->mn", acc_g, np.asarray(sw, np.float64))
    )


@pytest.mark.parametrize("overlap", [False, True])
def test_magic_cvt_bit_identical(overlap):
    """G128Config(magic_cvt=True): the int32 -> f32 of each group sum by the magic-number add gives the same bits as
    the plain conversion, for INT4 activations and for INT8 ones (W4A8: group sums up to ~1e5, still < 2**22),
    with power-of-two scales (exact sums) and with arbitrary scales (the same f32 operations in the same order)."""
    m, k, n = 77, 640, 128
    rng = np.random.default_rng(6)
    qw = jnp.asarray(rng.integers(-8, 8, (n, k)), jnp.int8)
    ones = jnp.ones((m,), jnp.float32)
    for qmax in (7, 127):
        qx = jnp.asarray(rng.integers(-qmax, qmax + 1, (m, k)), jnp.int8)
        qx = qx.at[0].set(qmax).at[1].set(-qmax)  # rows of extreme sums
        qw_ext = qw.at[:2].set(-8)
        for sw in (jnp.asarray(2.0 ** -rng.integers(0, 4, (n, k // 128)), jnp.float32), _group_scales(7, n, k // 128)):
            outs = []
            for magic in (False, True):
                cfg = G128Config(
                    tile_m=64, tile_n=64, tile_k=128, stages=2, num_sms=3, overlap_rescale=overlap, magic_cvt=magic
                )
                outs.append(
                    np.asarray(
                        w4a4_g128_matmul_gpu(qx, ones, qw_ext, sw, out_dtype=jnp.float32, config=cfg, interpret=True)
                    )
                )
            assert np.isfinite(outs[1]).all()
            np.testing.assert_array_equal(outs[1], outs[0])
        exp = ref.w4a4_g128_reference(qx, ones, qw_ext, sw, out_dtype=jnp.float32)
        assert _rel(outs[1], exp) < 1e-6


@pytest.mark.parametrize("r,k,cfg", [(0, 256, SMALL), (16, 640, SMALL_OVERLAP)])
def test_epilogue_bf16_vs_reference(r, k, cfg):
    m, n = 131, 128  # M not a multiple of the tile: the last tile is shifted back
    qx, qw, sx, _, bias, x_lr, up = w4a4_inputs(20 + r, m, k, n, r)
    sw = _group_scales(r, n, k // 128)
    out = w4a4_g128_matmul_gpu(qx, sx, qw, sw, x_lr, up, bias, config=cfg, interpret=True)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, n)
    exp = ref.w4a4_g128_reference(qx, sx, ref.pack_int4(qw), sw, x_lr, up, bias, out_dtype=jnp.float32)
    assert _rel(out, exp) <= 1e-2
    # group scales matter: the per-channel mean scale gives a different answer
    if r == 0:
        per_ch = ref.w4a4_matmul(qx, sx, ref.pack_int4(qw), sw.mean(1), bias=bias, out_dtype=jnp.float32)
        assert _rel(per_ch, exp) > 1e-2


def test_small_m_padding():
    m, k, n = 5, 128, 128
    qx, qw, sx, _, bias, _, _ = w4a4_inputs(7, m, k, n, 0)
    sw = _group_scales(7, n, 1)
    out = w4a4_g128_matmul_gpu_any_m(qx, sx, qw, sw, bias=bias, out_dtype=jnp.float32, config=SMALL, interpret=True)
    exp = ref.w4a4_g128_reference(qx, sx, qw, sw, bias=bias, out_dtype=jnp.float32)
    assert out.shape == (m, n) and _rel(out, exp) <= 1e-5


def test_shape_errors():
    qx, qw, sx, _, _, _, _ = w4a4_inputs(0, 64, 256, 128, 0)
    sw = _group_scales(0, 128, 2)
    with pytest.raises(ValueError, match="s_w"):
        w4a4_g128_matmul_gpu(qx, sx, qw, sw[:, 0], config=SMALL, interpret=True)
    with pytest.raises(ValueError, match="tile_k"):
        w4a4_g128_matmul_gpu(qx, sx, qw, sw, config=W4A4Config(tile_m=64, tile_n=64, tile_k=64), interpret=True)
    with pytest.raises(ValueError, match="multiple of the CTA tile"):
        w4a4_g128_matmul_gpu(qx, sx, qw[:64], sw[:64], config=W4A4Config(tile_n=64), interpret=True)
    with pytest.raises(ValueError, match="int8"):
        w4a4_g128_matmul_gpu(qx, sx, ref.pack_int4(qw), sw, config=SMALL, interpret=True)


def test_default_config_fits_smem():
    assert G128_CONFIG.tile_k == 128 and G128_CONFIG.tile_m * G128_CONFIG.tile_n <= 128 * 64  # register budget
    for r in (0, 32):
        fit_epilogue(G128_CONFIG, r, 2, "int8", extra_bytes=G128_CONFIG.stages * 2 * G128_CONFIG.tile_n * 4)


@pytest.mark.parametrize(
    "r,mode,k,n,overlap",
    [
        (0, None, 5120, 5120, False),
        (32, "init", 5120, 13824, False),
        (32, "init", 13824, 5120, False),
        (16, "chunk", 13824, 5120, False),
        (32, "init", 5120, 13824, True),
        (0, None, 13824, 5120, True),
        (32, "init", 5120, 5120, "magic"),
    ],
)
def test_lowers_for_cuda(r, mode, k, n, overlap):
    m = 32760
    S = jax.ShapeDtypeStruct
    args = [S((m, k), jnp.int8), S((m,), jnp.float32), S((n, k), jnp.int8), S((n, k // 128), jnp.float32)]
    args += [S((m, r), jnp.bfloat16), S((r, n), jnp.bfloat16)] if r else [None, None]
    args.append(S((n,), jnp.float32))
    cfg = G128Config(
        tile_m=128, tile_n=64, lowrank_mode=mode, overlap_rescale=bool(overlap), magic_cvt=overlap == "magic"
    )
    f = lambda *a: w4a4_g128_matmul_gpu(*a, config=cfg)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "wgmma" in text


# ------------------------------------------------------------------------------------------ dispatcher, QLinear
@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_dispatch_group_size(backend):
    """group_size=128 on CPU: every backend computes the reference (pallas falls back to XLA off the GPU)."""
    m, k, n, r = 9, 384, 64, 16
    qx, qw, sx, _, bias, x_lr, up = w4a4_inputs(11, m, k, n, r)
    sw = _group_scales(11, n, 3)
    exp = ref.w4a4_g128_reference(qx, sx, qw, sw, x_lr, up, bias, out_dtype=jnp.float32)
    for w in (ref.pack_int4(qw), qw):
        out = dispatch.w4a4_matmul(
            qx, sx, w, sw, x_lr, up, bias, out_dtype=jnp.float32, backend=backend, group_size=128
        )
        assert _rel(out, exp) <= 1e-6
    with pytest.raises(ValueError, match="group_size"):
        dispatch.w4a4_matmul(qx, sx, qw, sw[:, :2], backend=backend, group_size=128)
    with pytest.raises(ValueError, match="per-channel"):
        dispatch.w4a4_matmul(qx, sx, qw, sw, backend=backend)


def test_dispatch_routes_g128_to_the_kernel_on_gpu(monkeypatch):
    """On a GPU the pallas backend calls the g128 kernel with int8 weights (packed codes unpacked); shapes it does not
    tile (N % 128) and other group sizes go to XLA. The kernel is replaced by a spy (no GPU here)."""
    from wanjax.kernels import w4a4_g128_gpu

    calls = []

    def spy(q_x, s_x, w, s_w, x_lr=None, up=None, bias=None, out_dtype=jnp.bfloat16):
        calls.append((w.dtype, s_w.shape))
        return ref.w4a4_g128_reference(q_x, s_x, w, s_w, x_lr, up, bias, out_dtype)

    monkeypatch.setattr(dispatch, "_platform", lambda: "gpu")
    monkeypatch.setattr(w4a4_g128_gpu, "w4a4_g128_matmul_gpu_any_m", spy)
    m, k, n = 9, 256, 128
    qx, qw, sx, _, _, _, _ = w4a4_inputs(14, m, k, n, 0)
    sw = _group_scales(14, n, 2)
    dispatch.w4a4_matmul(qx, sx, ref.pack_int4(qw), sw, backend="pallas", group_size=128)
    assert calls == [(jnp.int8, (n, 2))]
    dispatch.w4a4_matmul(qx, sx, qw[:64], sw[:64], backend="pallas", group_size=128)  # N = 64: XLA
    dispatch.w4a4_matmul(qx, sx, qw, _group_scales(1, n, 4), backend="pallas", group_size=64)  # g64: XLA
    assert len(calls) == 1


def test_dispatch_linear_g128_vs_reference():
    rng = np.random.default_rng(12)
    k, n = 256, 128
    x = jnp.asarray(rng.standard_normal((2, 7, k)), jnp.bfloat16)
    w_packed, sw = ref.quantize_weight_int4_grouped(jnp.asarray(rng.standard_normal((n, k)) * 0.02), 128)
    q, s = ref.quantize_act_int4(x.reshape(-1, k))
    exp = ref.w4a4_g128_reference(q, s, w_packed, sw, out_dtype=jnp.float32).reshape(2, 7, n)
    y = dispatch.w4a4_linear(x, w_packed, sw, group_size=128, backend="xla", out_dtype=jnp.float32)
    assert y.shape == (2, 7, n) and _rel(y, exp) <= 1e-6


def test_qlinear_real_mode_g128_matches_fake(monkeypatch):
    backend = "xla"  # the CPU default (reference: same dispatcher path as test_dispatch_group_size)
    from wanjax.numerics import formats
    from wanjax.quant.apply import active_bin
    from wanjax.quant.qlinear import QLinear, QLinearConfig

    monkeypatch.setenv("WANJAX_KERNELS", backend)
    rng = np.random.default_rng(13)
    k, n, r = 256, 64, 16
    qt = formats.quantize_int4(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), group_size=128).pack()
    assert qt.scales.shape == (n, 2)
    cfg = QLinearConfig(k, n, "int4", 128, "int4", None, nbins=2)
    a = dict(
        qweight=qt.codes,
        wscale=qt.scales,
        bias=rng.standard_normal(n).astype(np.float32),
        smooth=rng.uniform(0.5, 2.0, k).astype(np.float32),
        down=jnp.asarray(rng.standard_normal((k, r)) * 0.1, jnp.bfloat16),
        up=jnp.asarray(rng.standard_normal((r, n)) * 0.1, jnp.bfloat16),
        act_clip=np.array([1.0, 0.8], np.float32),
    )
    assert cfg.real_mode_problem() is None
    x = jnp.asarray(rng.standard_normal((3, 5, k)), jnp.float32)
    outs = {}
    for mode in ("fake", "real"):
        layer = QLinear(cfg, dtype=jnp.bfloat16, mode=mode, path="t", **a)
        with active_bin(1):
            outs[mode] = np.asarray(layer(x).astype(jnp.float32))
    scale = np.abs(outs["fake"]).max()
    np.testing.assert_allclose(outs["real"], outs["fake"], atol=2**-7 * scale, rtol=2**-7)
    # other groups are still refused
    assert "groups of 128" in QLinearConfig(k, n, "int4", 64, "int4", None).real_mode_problem()
