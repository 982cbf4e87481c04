"""QLinear: fake mode vs a hand-written numpy reference, real vs fake, model surgery on TINY, bins without retrace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.model.layers import Linear
from wanjax.numerics import formats
from wanjax.quant.apply import BLOCK_LINEARS, active_bin, get_submodule, qlinears, quantize_model, set_mode
from wanjax.quant.qlinear import QLinear, QLinearConfig
from kernel_inputs import np_rotate_runtime
from helpers import nvfp4_qlinear, tiny_dit

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


# ------------------------------------------------------------------------------------------ numpy references
def np_unpack(p, signed):
    lo, hi = p & 0xF, p >> 4
    out = np.stack([lo, hi], -1).reshape(*p.shape[:-1], -1).astype(np.int64)
    return np.where(out >= 8, out - 16, out) if signed else out


def np_e2m1_round(v):
    """Nearest E2M1 magnitude (ties are measure-zero for random data), sign kept; |v| <= 6."""
    mag = np.abs(v)
    idx = np.argmin(np.abs(mag[..., None] - E2M1), axis=-1)
    return np.sign(v) * E2M1[idx]


def np_e2m1_decode(codes):
    return np.where(codes >= 8, -1.0, 1.0) * E2M1[codes & 7]


def np_act_int4(x, clip):
    s = (np.abs(x).max(-1, keepdims=True) * np.float32(clip)).astype(np.float32) * np.float32(1 / 7)
    s = np.where(s > 0, s, 1).astype(np.float32)
    return np.clip(np.round(x * (np.float32(1) / s)), -7, 7) * s


def np_act_mxfp4(x, clip, off):
    m, k = x.shape
    g = x.reshape(m, k // 32, 32).astype(np.float64)
    a = (np.abs(g).max(-1) * clip).astype(np.float32).astype(np.float64)
    e = np.ceil(np.log2(a / 6.0)) + off  # safe_ceil
    y = np_e2m1_round(np.clip(g / 2.0 ** e[..., None], -6, 6)) * 2.0 ** e[..., None]
    return y.reshape(m, k)


def make_int4_layer(k=64, n=48, r=8, nbins=3, smooth=True, rot=False, seed=0, static=False):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    qt = formats.quantize_int4(jnp.asarray(w)).pack()
    cfg = QLinearConfig(k, n, "int4", None, "int4", None, act_mode="static" if static else "dynamic", nbins=nbins)
    arrays = dict(
        qweight=qt.codes,
        wscale=qt.scales,
        bias=rng.standard_normal(n).astype(np.float32),
        smooth=rng.uniform(0.5, 2.0, k).astype(np.float32) if smooth else None,
        rot_signs=np.where(rng.random(k) < 0.5, -1.0, 1.0).astype(np.float32) if rot else None,
        down=jnp.asarray(rng.standard_normal((k, r)) * 0.1, jnp.bfloat16),
        up=jnp.asarray(rng.standard_normal((r, n)) * 0.1, jnp.bfloat16),
        act_clip=np.array([1.0, 0.8, 0.6][:nbins], np.float32),
        act_scale=np.array([0.9, 0.5, 0.2][:nbins], np.float32) if static else None,
    )
    return cfg, arrays


def np_forward_int4(cfg, a, x, b):
    """Hand-written reference of the fake forward (float64 matmuls of the float32 QDQ values)."""
    xs = np.asarray(x, np.float32)
    if a["smooth"] is not None:
        xs = xs / a["smooth"]
    if a["rot_signs"] is not None:  # the run-time rotation (bf16 products, as the kernels), not the f32 transform
        xs = np_rotate_runtime(xs, np.asarray(a["rot_signs"]), cfg.in_features & -cfg.in_features)
    if cfg.act_mode == "static":
        s = np.float32(a["act_scale"][b])
        xq = np.clip(np.round(xs / s), -7, 7) * s
    else:
        xq = np_act_int4(xs, a["act_clip"][b])
    wq = np_unpack(np.asarray(a["qweight"]), True) * np.asarray(a["wscale"], np.float64)
    y = xq.astype(np.float64) @ wq.T
    down = np.asarray(a["down"].astype(jnp.float32), np.float64)
    up = np.asarray(a["up"].astype(jnp.float32), np.float64)
    y += (xs.astype(np.float64) @ down) @ up
    return y + a["bias"]


def fake_apply(cfg, arrays, x, b, dtype=jnp.float32, mode="fake"):
    q = QLinear(cfg, dtype=dtype, mode=mode, path="t", **arrays)
    with active_bin(b):
        return q(jnp.asarray(x))


@pytest.mark.parametrize("smooth,rot,static", [(True, False, False), (True, True, False), (False, False, True)])
def test_fake_int4_matches_numpy_reference(smooth, rot, static):
    cfg, a = make_int4_layer(smooth=smooth, rot=rot, static=static)
    x = np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32)
    for b in (0, 2):
        y = np.asarray(fake_apply(cfg, a, x, b))
        ref = np_forward_int4(cfg, a, x.reshape(-1, 64), b).reshape(2, 5, -1)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())


def test_fake_mxfp4_matches_numpy_reference():
    rng = np.random.default_rng(2)
    k, n = 64, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    qt = formats.quantize_mxfp4(jnp.asarray(w), scale_rule="ocp_floor").pack()
    cfg = QLinearConfig(k, n, "mxfp4", 32, "mxfp4", 32, a_scale_rule="safe_ceil", nbins=3)
    a = dict(
        qweight=qt.codes,
        wscale=qt.scales,
        act_clip=np.array([1.0, 0.7, 0.9], np.float32),
        act_exp_offset=np.array([0, 1, -1], np.int32),
    )
    x = rng.standard_normal((7, k)).astype(np.float32) * 3
    wq = np_e2m1_decode(np_unpack(np.asarray(qt.codes), False)) * 2.0 ** (
        np.repeat(np.asarray(qt.scales, np.float64), 32, axis=1) - 127
    )
    for b in range(3):
        y = np.asarray(fake_apply(cfg, a, x, b))
        ref = np_act_mxfp4(x, a["act_clip"][b], a["act_exp_offset"][b]) @ wq.T
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    # the bin changes the result (different clip / offset)
    assert not np.allclose(fake_apply(cfg, a, x, 0), fake_apply(cfg, a, x, 1))


@pytest.mark.parametrize("rot,static", [(False, False), (True, False), (False, True)])
def test_real_mode_matches_fake_to_bf16(rot, static, monkeypatch):
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    cfg, a = make_int4_layer(k=128, n=64, rot=rot, static=static)
    x = np.random.default_rng(3).standard_normal((3, 11, 128)).astype(np.float32)
    for b in (0, 1):
        fake = np.asarray(fake_apply(cfg, a, x, b, dtype=jnp.bfloat16).astype(jnp.float32))
        real = np.asarray(fake_apply(cfg, a, x, b, dtype=jnp.bfloat16, mode="real").astype(jnp.float32))
        scale = np.abs(fake).max()
        assert real.shape == fake.shape == (3, 11, 64)
        np.testing.assert_allclose(real, fake, atol=2**-7 * scale, rtol=2**-7)
        # and both near the exact fp32 reference of the input as a bf16 Linear sees it (rounded to bf16 first)
        x16 = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
        ref = np_forward_int4(cfg, a, x16.reshape(-1, 128), b).reshape(fake.shape)
        np.testing.assert_allclose(real, ref, atol=2**-6 * scale)


@pytest.mark.parametrize("dtype,expect", [(jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32)])
def test_real_mode_hands_the_kernels_the_compute_dtype(dtype, expect, monkeypatch):
    """An fp32 input (the model's fp32 residual stream after norm/modulation) reaches the kernels in the compute
    dtype: 2 bytes per element for the activation quantization in a bf16 model, as a bf16 Linear's matmul sees it."""
    from wanjax.kernels import dispatch

    seen = []
    orig = dispatch.w4a4_linear

    def spy(x, *args, **kw):
        seen.append(x.dtype)
        return orig(x, *args, **kw)

    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    monkeypatch.setattr(dispatch, "w4a4_linear", spy)
    cfg, a = make_int4_layer(k=64, n=32)
    x = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
    fake_apply(cfg, a, x, 0, dtype=dtype, mode="real")
    assert seen == [jnp.dtype(expect)]


def test_real_mode_refuses_unsupported_formats():
    # nvfp4 weights and activations (mxfp4 runs in real mode: tests/test_qlinear_mxfp4_real.py)
    with pytest.raises(ValueError, match="mode='real' unavailable.*int4 per output channel"):
        nvfp4_qlinear(mode="real", path="x")


def test_constructor_errors_name_the_layer():
    cfg, a = make_int4_layer()
    bad = dict(a, qweight=a["qweight"][:, :10])
    with pytest.raises(ValueError, match=r"QLinear 'p': qweight must have shape \(48, 32\)"):
        QLinear(cfg, path="p", **bad)
    with pytest.raises(ValueError, match="act_scale .* required iff act_mode='static'"):
        QLinear(cfg, path="p", **dict(a, act_scale=np.ones(3, np.float32)))


def test_no_active_bin_is_an_error_with_several_bins():
    cfg, a = make_int4_layer(nbins=3)
    q = QLinear(cfg, path="blocks.x", **a)
    with pytest.raises(ValueError, match="3 timestep bins but no bin is active"):
        q(jnp.ones((2, 64)))
    cfg1, a1 = make_int4_layer(nbins=1)
    assert QLinear(cfg1, path="y", **a1)(jnp.ones((2, 64))).shape == (2, 48)


# ---------------------------------------------------------------------------------------------- model surgery
def rtn_qlayers(model, nbins=3, mode="fake"):
    """Stacked int4 QLinears (per-channel RTN of each block kernel), per-bin clips 1.0 / 0.7 / 0.5."""
    out = {}
    for path in BLOCK_LINEARS:
        lin = get_submodule(model, path)
        kern = jnp.asarray(lin.kernel[...], jnp.float32)  # [L, K, N]
        qt = formats.quantize_int4(jnp.swapaxes(kern, 1, 2)).pack()  # codes [L, N, K/2]
        L, k, n = kern.shape
        cfg = QLinearConfig(k, n, "int4", None, "int4", None, nbins=nbins)
        clip = jnp.tile(jnp.array([1.0, 0.7, 0.5][:nbins], jnp.float32), (L, 1))
        out[path] = QLinear(
            cfg,
            qweight=qt.codes,
            wscale=qt.scales,
            act_clip=clip,
            bias=None if lin.bias is None else lin.bias[...],
            mode=mode,
            path=path,
        )
    return out


@pytest.fixture(scope="module")
def tiny():
    model, x, ctx = tiny_dit(TINY, 0)
    return model, quantize_model(model, rtn_qlayers(model)), x, ctx


def test_surgery_replaces_only_block_linears(tiny):
    model, qm, _, _ = tiny
    assert sorted(qlinears(qm)) == sorted(BLOCK_LINEARS)
    assert not qlinears(model)  # the input model is untouched
    assert isinstance(model.blocks.ffn.fc1, Linear)
    for path in ("patch_embedding", "time_projection", "head.head", "text_embedding.fc1", "time_embedding.fc2"):
        a, b = get_submodule(model, path), get_submodule(qm, path)
        assert isinstance(b, Linear)
        assert a.kernel[...] is b.kernel[...]  # shared, not copied
    assert qm.blocks.self_attn.q.qweight.shape == (TINY.num_layers, TINY.dim, TINY.dim // 2)
    with pytest.raises(ValueError, match="'blocks.ffn.fc1'.*Linear kernel is"):
        quantize_model(model, {"blocks.ffn.fc1": rtn_qlayers(model)["blocks.ffn.fc2"]})
    with pytest.raises(KeyError, match="blocks.nope"):
        quantize_model(model, {"blocks.nope.q": rtn_qlayers(model)["blocks.ffn.fc2"]})


TRACES = []


def _forward(graphdef, state, b, x, t, ctx):
    TRACES.append(graphdef)
    m = nnx.merge(graphdef, state)
    with active_bin(b):
        return m(x, t, ctx)


run = jax.jit(_forward, static_argnums=0)


def test_quantized_tiny_jit_scan_equals_unrolled_and_bins_do_not_retrace(tiny):
    model, qm, x, ctx = tiny
    t = jnp.array([700.0])
    g, st = nnx.split(qm)
    n0 = len(TRACES)
    ys = [run(g, st, jnp.int32(b), x, t, ctx) for b in (0, 1, 2, 1)]
    assert len(TRACES) - n0 == 1, "changing the bin must not retrace"
    assert not np.allclose(ys[0], ys[2])  # the bins hold different clips
    np.testing.assert_array_equal(ys[1], ys[3])

    unrolled = nnx.merge(g, st)
    unrolled.scan_layers = False
    gu, su = nnx.split(unrolled)
    y_unrolled = run(gu, su, jnp.int32(2), x, t, ctx)
    np.testing.assert_allclose(ys[2], y_unrolled, rtol=1e-6, atol=1e-6)

    # int4 everywhere: close to, not equal to, the fp32 model
    gm, sm = nnx.split(model)
    y_ref = run(gm, sm, jnp.int32(0), x, t, ctx)
    rel = float(jnp.linalg.norm(ys[0] - y_ref) / jnp.linalg.norm(y_ref))
    assert 1e-4 < rel < 0.3


def test_set_mode_real_runs_and_matches_fake(tiny, monkeypatch):
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    _, qm, x, ctx = tiny
    real = set_mode(qm, "real")
    assert {q.mode for q in qlinears(real).values()} == {"real"}
    assert {q.mode for q in qlinears(qm).values()} == {"fake"}
    t = jnp.array([700.0])
    y_f = run(*nnx.split(qm), jnp.int32(1), x, t, ctx)
    y_r = run(*nnx.split(real), jnp.int32(1), x, t, ctx)
    # fp32 model: fake runs fp32 operands, real the exact integer GEMM + fp32 epilogue -> tiny differences
    np.testing.assert_allclose(y_r, y_f, rtol=1e-3, atol=1e-3 * float(jnp.abs(y_f).max()))
