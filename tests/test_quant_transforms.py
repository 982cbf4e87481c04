"""Tests of the pure-function transforms: smoothing, rotation, low-rank, RTN (GPTQ: test_quant_gptq.py).

CPU, fp32, tiny shapes. References: numpy (float64 where it matters), scipy's Hadamard matrix, formats.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import scipy.linalg

from wanjax.numerics import formats
from wanjax.quant.linalg import hessian_from_rows, resolve_linalg_dtype
from wanjax.quant.lowrank import lowrank, svd_lowrank
from wanjax.numerics.hadamard import (
    apply_hadamard,
    hadamard_block_size,
    hadamard_matrix,
    random_signs,
    rotate_activations,
    rotate_activations_mxu,
)
from wanjax.quant.rotate import rotate, rotate_hessian
from wanjax.quant.rtn import (
    ActQuantSpec,
    WeightQuantSpec,
    fake_quant_act,
    quantize_elements,
    rtn,
    weight_scales,
)
from wanjax.quant.smooth import smooth, smooth_hessian, smooth_search, smoothed_output_error, smoothing_scales

SPECS = [
    WeightQuantSpec("int4"),
    WeightQuantSpec("int4", group_size=32),
    WeightQuantSpec("int8"),
    WeightQuantSpec("mxfp4"),
    WeightQuantSpec("nvfp4"),
]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _outlier_rows(rng, n, k, outliers=((3, 60.0), (17, 120.0))):
    """Correlated rows (low-rank latent + noise) with planted outlier channels."""
    z = rng.normal(size=(n, 16))
    x = z @ rng.normal(size=(16, k)) / 4.0 + 0.3 * rng.normal(size=(n, k))
    for c, f in outliers:
        x[:, c] *= f
    return x.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.fmt}-g{s.group_size}")
def test_rtn_equals_formats_and_element_rule(spec):
    rng = _rng(1)
    k, n = 128, 48
    w = (rng.normal(size=(k, n)) * rng.uniform(0.01, 3, size=(k, 1))).astype(np.float32)
    p = {"kernel": jnp.asarray(w), "bias": jnp.arange(n, dtype=jnp.float32)}
    out = rtn(p, spec)
    kw = {"group_size": spec.group_size} if spec.fmt in ("int4", "int8") else {"block_size": spec.group_size}
    ref = formats.quantize(jnp.asarray(w.T), spec.fmt, **kw)
    np.testing.assert_array_equal(np.asarray(out["qweight"].codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(out["qweight"].scales), np.asarray(ref.scales))
    np.testing.assert_array_equal(np.asarray(out["kernel"]), np.asarray(formats.dequantize(ref)).T)
    assert out["bias"] is p["bias"] and "qweight" not in p
    # The element rule used by GPTQ reproduces the formats codes bit for bit from the format-native scales.
    scales, ts = weight_scales(jnp.asarray(w.T), spec)
    g = spec.group(k)
    codes, deq = quantize_elements(jnp.asarray(w.T), jnp.repeat(scales, g, axis=1), ts, spec)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(formats.dequantize(ref)))
    # RTN error is bounded by half a step (int: scale/2 per element).
    if spec.fmt == "int4":
        step = np.repeat(np.asarray(ref.scales), g, axis=1).T
        assert np.all(np.abs(np.asarray(out["kernel"]) - w) <= 0.5 * step * (1 + 1e-6))


def test_fake_quant_act_uses_formats():
    x = _outlier_rows(_rng(2), 64, 96)
    for spec in (ActQuantSpec("int4"), ActQuantSpec("mxfp4", exp_offset=1, clip=0.8), ActQuantSpec("nvfp4")):
        got = fake_quant_act(jnp.asarray(x), spec)
        kw = dict(clip=spec.clip)
        if spec.fmt == "mxfp4":
            kw.update(scale_rule="safe_ceil", exp_offset=1)
        ref = formats.quantize_dequantize(jnp.asarray(x), spec.fmt, **kw)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert fake_quant_act(x, None).dtype == jnp.float32


def test_specs_validate():
    assert WeightQuantSpec("mxfp4").group_size == 32 and WeightQuantSpec("nvfp4").group_size == 16
    with pytest.raises(ValueError, match="fmt must be one of"):
        WeightQuantSpec("int3")
    with pytest.raises(ValueError, match="does not divide K=100"):
        WeightQuantSpec("int4", 64).group(100)
    with pytest.raises(ValueError, match="clip"):
        ActQuantSpec("int4", clip=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        rtn({"kernel": jnp.full((32, 4), jnp.nan)}, WeightQuantSpec())
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        rtn({"kernel": jnp.ones((2, 32, 4))}, WeightQuantSpec())
    with pytest.raises(ValueError, match="bias"):
        rtn({"kernel": jnp.ones((32, 4)), "bias": jnp.ones(5)}, WeightQuantSpec())


# ----------------------------------------------------------------------------------------------------- smoothing


def test_smoothing_is_exact_identity_and_matches_formula():
    rng = _rng(3)
    k, n = 96, 40
    x = _outlier_rows(rng, 256, k)
    w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
    a = np.abs(x).max(0)
    a[5] = 0.0  # a dead channel must not produce inf / nan
    x[:, 5] = 0.0
    p = {"kernel": jnp.asarray(w), "bias": jnp.ones(n)}
    for alpha in (0.25, 0.5, 0.8):
        out = smooth(p, a, alpha)
        s_ref = np.maximum(a.astype(np.float64), 1e-8) ** alpha / np.maximum(np.abs(w).max(1), 1e-8) ** (1 - alpha)
        np.testing.assert_allclose(np.asarray(out["smooth"]), s_ref, rtol=2e-6)
        np.testing.assert_allclose(np.asarray(out["kernel"]), w * s_ref[:, None], rtol=2e-6)
        y = (jnp.asarray(x) / out["smooth"]) @ out["kernel"]
        np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4 * np.abs(x @ w).max())
    # Smoothed activation abs-max is a^(1-alpha) * w^(1-alpha): channel ranges equalize.
    out = smooth(p, a, 0.5)
    xs = np.abs(x / np.asarray(out["smooth"])).max(0)
    live = a > 0
    assert xs[live].max() / xs[live].min() < (a[live].max() / a[live].min()) ** 0.75
    with pytest.raises(ValueError, match="smooth a layer once"):
        smooth(out, a)
    with pytest.raises(ValueError, match=r"act_absmax must be \[K\]"):
        smooth(p, a[:-1])


def test_smooth_hessian_matches_rows():
    x = _outlier_rows(_rng(4), 128, 64)
    s = jnp.asarray(_rng(5).uniform(0.1, 10, size=64), jnp.float32)
    h, cnt = hessian_from_rows(x)
    hs, _ = hessian_from_rows(x, smooth=s)
    np.testing.assert_allclose(np.asarray(smooth_hessian(h, s)), np.asarray(hs), rtol=1e-4, atol=1e-3)
    assert int(cnt) == 128


def test_smooth_search_picks_argmin_and_beats_no_smoothing():
    rng = _rng(6)
    k, n = 128, 64
    x = _outlier_rows(rng, 512, k)
    w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
    p = {"kernel": jnp.asarray(w)}
    a = jnp.asarray(np.abs(x).max(0))
    ws, as_ = WeightQuantSpec("int4"), ActQuantSpec("int4")
    alphas = (0.2, 0.5, 0.8)
    out, info = jax.jit(lambda p, a, r: smooth_search(p, a, r, ws, as_, alphas=alphas))(p, a, jnp.asarray(x[:256]))
    errs = np.asarray(info["errors"])
    for i, al in enumerate(alphas):
        e = smoothed_output_error(w, x[:256], smoothing_scales(a, w, al), ws, as_)
        np.testing.assert_allclose(errs[i], float(e), rtol=1e-5)
    assert float(info["alpha"]) == np.float32(alphas[int(np.argmin(errs))])
    np.testing.assert_allclose(np.asarray(out["smooth"]), np.asarray(smoothing_scales(a, w, info["alpha"])), rtol=1e-6)
    # On outlier activations, W4A4 error on held-out rows: smoothing at the searched alpha << no smoothing.
    no_smooth = float(smoothed_output_error(w, x[256:], jnp.ones(k), ws, as_))
    searched = float(smoothed_output_error(w, x[256:], out["smooth"], ws, as_))
    assert searched < 0.5 * no_smooth, (searched, no_smooth)


# ------------------------------------------------------------------------------------------------------ rotation


def test_hadamard_block_sizes():
    assert hadamard_block_size(5120) == 1024
    assert hadamard_block_size(13824) == 512
    assert hadamard_block_size(192) == 64 and hadamard_block_size(256) == 256
    assert hadamard_block_size(256, 32) == 32
    assert hadamard_block_size(192, 128) == 64 and hadamard_block_size(5120, 256) == 256  # a cap, not a requirement
    with pytest.raises(ValueError, match="must be a power of two"):
        hadamard_block_size(192, 96)


@pytest.mark.parametrize("k,block", [(192, None), (256, None), (256, 32), (96, None)])
def test_fwht_equals_dense_and_is_orthogonal(k, block):
    b = hadamard_block_size(k, block)
    hb = hadamard_matrix(b, np.float64)
    np.testing.assert_allclose(hb, scipy.linalg.hadamard(b) / np.sqrt(b), atol=0)  # independent reference
    np.testing.assert_allclose(hb @ hb.T, np.eye(b), atol=1e-12)
    dense = np.kron(np.eye(k // b), hb)
    x = _rng(7).normal(size=(3, 5, k)).astype(np.float32)
    got = np.asarray(apply_hadamard(jnp.asarray(x), block))
    np.testing.assert_allclose(got, x @ dense, rtol=1e-5, atol=1e-5)
    # Orthogonal and symmetric: norms preserved, applying twice is the identity.
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(apply_hadamard(got, block)), x, atol=1e-5)
    assert jax.jit(apply_hadamard, static_argnums=1)(jnp.asarray(x), block).shape == x.shape


@pytest.mark.parametrize("k,block", [(192, None), (512, 256), (2048, None), (384, 128), (256, 32)])
def test_runtime_rotation_is_the_bf16_product_form(k, block):
    """``rotate_activations_mxu`` (run time: fake and real mode, the kernels' numerics) = the numpy model of
    butterflies over 128-column pieces, bf16 rounding and a +-1 product (float64) to float32 accumulation; within
    bf16 rounding of the float32 transform; non-power-of-two blocks refused as there."""
    from kernel_inputs import np_rotate_runtime

    b = hadamard_block_size(k, block)
    x = (_rng(k).normal(size=(2, 9, k)) * _rng(1).uniform(0.1, 30, size=k)).astype(np.float32)
    d = np.asarray(random_signs(jax.random.key(k), k))
    got = np.asarray(rotate_activations_mxu(jnp.asarray(x), jnp.asarray(d), block))
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, np_rotate_runtime(x, d, b), rtol=1e-5, atol=1e-5 * np.abs(got).max())
    exact = np.asarray(rotate_activations(jnp.asarray(x), jnp.asarray(d), block))
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 0 < rel < 2**-8, rel  # bf16 rounding of the product's input: differs, but only at that level
    with pytest.raises(ValueError, match="must be a power of two"):
        rotate_activations_mxu(jnp.asarray(x), jnp.asarray(d), 96)


def test_rotation_is_exact_identity_and_rotates_hessian():
    rng = _rng(8)
    k, n = 192, 32
    x = _outlier_rows(rng, 128, k)
    w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
    p = {"kernel": jnp.asarray(w), "bias": jnp.zeros(n)}
    for key in (None, jax.random.key(3)):
        out = rotate(p, key)
        d = np.asarray(out["rot_signs"])
        assert set(np.unique(d)) <= {-1.0, 1.0} and (key is None) == bool(np.all(d == 1))
        q = np.diag(d.astype(np.float64)) @ np.kron(np.eye(k // 64), hadamard_matrix(64, np.float64))
        np.testing.assert_allclose(q @ q.T, np.eye(k), atol=1e-12)
        np.testing.assert_allclose(np.asarray(out["kernel"]), q.T @ w, rtol=1e-5, atol=1e-6)
        xr = rotate_activations(jnp.asarray(x), out["rot_signs"])
        np.testing.assert_allclose(np.asarray(xr), x @ q, rtol=1e-4, atol=1e-3)
        y = np.asarray(xr @ out["kernel"])
        yref = x.astype(np.float64) @ w
        np.testing.assert_allclose(y, yref, rtol=1e-4, atol=1e-4 * np.abs(yref).max())
        h, _ = hessian_from_rows(x)
        hr, _ = hessian_from_rows(xr)
        np.testing.assert_allclose(
            np.asarray(rotate_hessian(h, out["rot_signs"])),
            np.asarray(hr),
            rtol=1e-3,
            atol=1e-4 * float(np.abs(hr).max()),
        )
    # Rotation spreads outlier channels over a block: per-token int4 activation error drops (measured 0.51x at
    # K=256, one 256-block; only 0.82x at K=192 where the blocks are 64 wide).
    x = _outlier_rows(rng, 128, 256)
    xr = rotate_activations(jnp.asarray(x), random_signs(jax.random.key(1), 256))
    e_plain = np.linalg.norm(np.asarray(fake_quant_act(x, ActQuantSpec("int4"))) - x)
    e_rot = np.linalg.norm(np.asarray(fake_quant_act(xr, ActQuantSpec("int4")) - xr))
    assert e_rot < 0.65 * e_plain, (e_rot, e_plain)
    with pytest.raises(ValueError, match="rotate a layer once"):
        rotate(out)


# ------------------------------------------------------------------------------------------------------ low rank


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowrank_is_top_r_svd_and_exact_split(dtype):
    rng = _rng(9)
    k, n, r = 128, 96, 16
    w = (rng.normal(size=(k, n)) + 3 * rng.normal(size=(k, 4)) @ rng.normal(size=(4, n))).astype(np.float32)
    p = {"kernel": jnp.asarray(w), "bias": jnp.ones(n)}
    out = lowrank(p, r, dtype)
    assert out["down"].shape == (k, r) and out["up"].shape == (r, n) and out["down"].dtype == dtype
    down, up = np.asarray(out["down"], np.float64), np.asarray(out["up"], np.float64)
    # residual + down @ up == W (the residual is taken against the stored factors).
    np.testing.assert_allclose(np.asarray(out["kernel"]) + down @ up, w, rtol=0, atol=2e-5 * np.abs(w).max())
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    top = (u[:, :r] * s[:r]) @ vt[:r]
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(down @ up, top, atol=tol * np.abs(top).max())
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out["kernel"])), np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4)
        np.testing.assert_allclose(down.T @ down, np.diag(s[:r]), atol=1e-3 * s[0])  # balanced split
        np.testing.assert_allclose(up @ up.T, np.diag(s[:r]), atol=1e-3 * s[0])
    with pytest.raises(ValueError, match="rank must be an int"):
        svd_lowrank(w, 0)
    with pytest.raises(ValueError, match="low-rank branch"):
        lowrank(out, r)


# -------------------------------------------------------------------------------------- purity, vmap, misc


def test_transforms_are_pure_and_vmap_over_stacked_layers():
    rng = _rng(10)
    layers, k, n = 3, 64, 32
    w = rng.normal(size=(layers, k, n)).astype(np.float32)
    a = np.abs(rng.normal(size=(layers, k))).astype(np.float32) + 0.1
    params = {"kernel": w.copy(), "bias": np.zeros((layers, n), np.float32)}
    keys = jax.random.split(jax.random.key(0), layers)

    def chain(p, a, key):  # float32 branch: a bf16 rounding flip between SVD code paths would blur the comparison
        return lowrank(rotate(smooth(p, a, 0.5), key), 8, jnp.float32)

    batched = jax.jit(jax.vmap(chain))(params, a, keys)
    quantized = jax.jit(jax.vmap(lambda p: rtn(p, WeightQuantSpec("int4"))))(params)
    np.testing.assert_array_equal(params["kernel"], w)  # inputs untouched
    assert sorted(params) == ["bias", "kernel"]
    for i in range(layers):
        one = chain({"kernel": w[i], "bias": np.zeros(n, np.float32)}, a[i], keys[i])
        for key in ("kernel", "smooth", "rot_signs"):  # down / up alone are not unique (close singular values)
            np.testing.assert_allclose(np.asarray(batched[key][i]), np.asarray(one[key]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(batched["down"][i] @ batched["up"][i]), np.asarray(one["down"] @ one["up"]), rtol=1e-5, atol=1e-5
        )
        q1 = rtn({"kernel": w[i]}, WeightQuantSpec("int4"))
        np.testing.assert_array_equal(np.asarray(quantized["qweight"].codes[i]), np.asarray(q1["qweight"].codes))
        np.testing.assert_array_equal(np.asarray(quantized["kernel"][i]), np.asarray(q1["kernel"]))


def test_linalg_dtype_policy():
    with jax.enable_x64(False):
        assert resolve_linalg_dtype() == jnp.float32
        with pytest.raises(ValueError, match="x64"):
            resolve_linalg_dtype(jnp.float64)
    with jax.enable_x64(True):
        assert resolve_linalg_dtype() == jnp.float64


def test_hessian_from_act_quantized_rows():
    x = _outlier_rows(_rng(11), 96, 64)
    s = jnp.asarray(np.abs(x).max(0) ** 0.5)
    spec = ActQuantSpec("mxfp4")  # the seed's: safe_ceil, clip 1.0
    h, cnt = hessian_from_rows(x.reshape(2, 48, 64), smooth=s, act_spec=spec)
    xq = np.asarray(formats.quantize_dequantize(jnp.asarray(x) / s, "mxfp4", scale_rule="safe_ceil"), np.float64)
    np.testing.assert_allclose(np.asarray(h), xq.T @ xq, rtol=1e-5, atol=1e-5 * np.abs(xq.T @ xq).max())
    assert int(cnt) == 96
    h_plain, _ = hessian_from_rows(x, smooth=s)
    assert not np.allclose(np.asarray(h), np.asarray(h_plain), rtol=1e-3)


def test_smooth_search_with_lowrank_in_the_objective():
    rng = _rng(12)
    k, n = 64, 32
    x = _outlier_rows(rng, 128, k)
    w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
    a = jnp.asarray(np.abs(x).max(0))
    ws, as_ = WeightQuantSpec("mxfp4"), ActQuantSpec("mxfp4")
    out, info = smooth_search({"kernel": jnp.asarray(w)}, a, x, ws, as_, alphas=(0.3, 0.6), rank=4)
    for i, al in enumerate((0.3, 0.6)):
        s = smoothing_scales(a, w, al)
        p = lowrank({"kernel": jnp.asarray(w) * s[:, None]}, 4)
        xs = jnp.asarray(x) / s
        y = fake_quant_act(xs, as_) @ rtn(p, ws)["kernel"] + (xs @ p["down"].astype(jnp.float32)) @ p["up"].astype(
            jnp.float32
        )
        yref = x.astype(np.float64) @ w
        direct = np.sum((np.asarray(y, np.float64) - yref) ** 2) / np.sum(yref**2)
        np.testing.assert_allclose(float(info["errors"][i]), direct, rtol=1e-3)
    assert float(info["alpha"]) == np.float32((0.3, 0.6)[int(np.argmin(np.asarray(info["errors"])))])
    # The branch removes most of the error: with rank 4 the objective is lower than without.
    _, info0 = smooth_search({"kernel": jnp.asarray(w)}, a, x, ws, as_, alphas=(0.3, 0.6))
    assert float(np.min(info["errors"])) < float(np.min(info0["errors"]))


def test_bf16_kernels_are_accepted():
    w = _rng(13).normal(size=(64, 16)).astype(np.float32)
    wb = jnp.asarray(w, jnp.bfloat16)
    spec = WeightQuantSpec("int4", group_size=32)
    np.testing.assert_array_equal(
        np.asarray(rtn({"kernel": wb}, spec)["kernel"]),
        np.asarray(rtn({"kernel": wb.astype(jnp.float32)}, spec)["kernel"]),
    )
    out = lowrank(smooth({"kernel": wb}, jnp.ones(64), 0.5), 4)
    assert out["kernel"].dtype == jnp.float32 and out["down"].dtype == jnp.bfloat16


def test_randomized_lowrank_matches_svd_on_decaying_spectrum():
    rng = _rng(14)
    k, n, r = 192, 128, 16
    u, _ = np.linalg.qr(rng.normal(size=(k, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = 0.8 ** np.arange(n)  # trained weights: fast-decaying spectrum
    w = ((u * s) @ v.T).astype(np.float32)
    exact = lowrank({"kernel": jnp.asarray(w)}, r, jnp.float32)
    rand = lowrank({"kernel": jnp.asarray(w)}, r, jnp.float32, method="randomized")
    np.testing.assert_allclose(np.asarray(rand["kernel"]) + np.asarray(rand["down"] @ rand["up"]), w, atol=1e-6)
    opt = np.sqrt(np.sum(s[r:] ** 2))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(exact["kernel"])), opt, rtol=1e-4)
    assert np.linalg.norm(np.asarray(rand["kernel"])) <= 1.001 * opt
    np.testing.assert_allclose(
        np.asarray(rand["down"] @ rand["up"]), np.asarray(exact["down"] @ exact["up"]), atol=1e-4 * s[0]
    )
    with pytest.raises(ValueError, match="method must be one of"):
        lowrank({"kernel": jnp.asarray(w)}, r, method="qr")
