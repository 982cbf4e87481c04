"""kernels/reference.py: packing convention, activation quantization, W4A4 GEMM (CPU, against numpy)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from wanjax.kernels import reference as ref


def _rng(seed):
    return np.random.default_rng(seed)


def test_pack_bit_layout():
    # byte j: k = 2j in the LOW nibble, k = 2j + 1 in the HIGH nibble; two's complement codes
    q = jnp.array([[1, -1, -8, 7, 0, -2]], jnp.int8)
    p = np.asarray(ref.pack_int4(q))
    assert p.dtype == np.uint8 and p.shape == (1, 3)
    assert p.tolist() == [[0xF1, 0x78, 0xE0]]


def test_pack_unpack_roundtrip_all_codes():
    rng = _rng(0)
    q = rng.integers(-8, 8, size=(37, 64)).astype(np.int8)
    q[0, :16] = np.arange(-8, 8)
    p = ref.pack_int4(jnp.asarray(q))
    assert p.shape == (37, 32)
    np.testing.assert_array_equal(np.asarray(ref.unpack_int4(p)), q)


def test_packed_as_int4_matches_unpack():
    rng = _rng(1)
    q = rng.integers(-8, 8, size=(8, 32)).astype(np.int8)
    p = ref.pack_int4(jnp.asarray(q))
    try:
        v = ref.packed_as_int4(p).astype(jnp.int8)
    except Exception as e:  # pragma: no cover - depends on the XLA:CPU int4 support
        pytest.skip(f"int4 bitcast not supported on this backend: {e}")
    np.testing.assert_array_equal(np.asarray(v), q)


def test_pack_errors():
    with pytest.raises(ValueError, match="even"):
        ref.pack_int4(jnp.zeros((2, 3), jnp.int8))
    with pytest.raises(ValueError, match="uint8"):
        ref.unpack_int4(jnp.zeros((2, 3), jnp.int8))


@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_act_quant_dynamic(clip):
    rng = _rng(2)
    x = (rng.standard_normal((33, 96)) * rng.uniform(0.1, 10, (33, 1))).astype(np.float32)
    smooth = rng.uniform(0.5, 2.0, 96).astype(np.float32)
    x[5] = 0.0  # an all-zero token
    q, s = ref.quantize_act_int4(jnp.asarray(x, jnp.bfloat16), jnp.asarray(smooth), clip=clip)
    q, s = np.asarray(q), np.asarray(s)
    xs = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) / smooth
    amax = np.abs(xs).max(1)
    exp_s = np.where(amax > 0, amax * clip / 7, 1.0)
    np.testing.assert_allclose(s, exp_s, rtol=1e-6)
    assert q.dtype == np.int8 and q.min() >= -7 and q.max() <= 7
    assert (q[5] == 0).all() and s[5] == 1.0
    # same op sequence in numpy float32: scales agree to an ulp (XLA may fold the constant divide), codes exactly
    # except at exact rounding ties
    xs32 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) / smooth
    s32 = np.abs(xs32).max(1) * np.float32(clip) / np.float32(7)
    s32 = np.where(s32 > 0, s32, np.float32(1)).astype(np.float32)
    np.testing.assert_allclose(s, s32, rtol=3e-7)
    t = xs32 / s32[:, None]
    exp_q = np.clip(np.round(t), -7, 7).astype(np.int8)
    bad = q != exp_q
    near_tie = np.abs(np.abs(t - np.trunc(t)) - 0.5) < 1e-5
    assert (~bad | near_tie).all() and bad.sum() <= 2
    # dequantization error within half a step where unclipped
    deq = q * s[:, None]
    inside = np.abs(xs) <= 7 * s[:, None]
    assert (np.abs(deq - xs)[inside] <= 0.5 * np.broadcast_to(s[:, None], xs.shape)[inside] * (1 + 1e-5)).all()
    if clip < 1:
        assert (np.abs(q) == 7).sum() > 33  # clipping saturates the largest values


def test_act_quant_static_scale_and_traced_clip():
    rng = _rng(3)
    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    q, s = ref.quantize_act_int4(x, static_scale=0.25)
    np.testing.assert_array_equal(np.asarray(s), np.full(16, 0.25, np.float32))
    np.testing.assert_array_equal(np.asarray(q), np.clip(np.round(np.asarray(x) / 0.25), -7, 7))
    f = jax.jit(lambda x, c: ref.quantize_act_int4(x, clip=c))
    q1, s1 = f(x, jnp.float32(0.5))
    q2, s2 = ref.quantize_act_int4(x, clip=0.5)
    np.testing.assert_array_equal(np.asarray(q1), np.asarray(q2))


def test_int_matmul_exact():
    rng = _rng(4)
    a = rng.integers(-8, 8, (19, 13824)).astype(np.int8)
    b = rng.integers(-8, 8, (24, 13824)).astype(np.int8)
    out = np.asarray(ref.int_matmul_nt(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_array_equal(out, a.astype(np.int64) @ b.astype(np.int64).T)


@pytest.mark.parametrize("r", [0, 16])
def test_w4a4_matmul_vs_numpy(r):
    rng = _rng(5 + r)
    m, k, n = 21, 128, 48
    qx = rng.integers(-7, 8, (m, k)).astype(np.int8)
    qw = rng.integers(-8, 8, (n, k)).astype(np.int8)
    sx = rng.uniform(0.01, 1, m).astype(np.float32)
    sw = rng.uniform(0.01, 1, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x_lr = jnp.asarray(rng.standard_normal((m, r)), jnp.bfloat16) if r else None
    up = jnp.asarray(rng.standard_normal((r, n)), jnp.bfloat16) if r else None
    out = ref.w4a4_matmul(
        jnp.asarray(qx),
        jnp.asarray(sx),
        ref.pack_int4(jnp.asarray(qw)),
        jnp.asarray(sw),
        x_lr,
        up,
        jnp.asarray(bias),
        out_dtype=jnp.float32,
    )
    exp = (qx.astype(np.float64) @ qw.astype(np.float64).T) * sx[:, None] * sw[None, :] + bias
    if r:
        exp = exp + np.asarray(x_lr, np.float64) @ np.asarray(up, np.float64)
    np.testing.assert_allclose(np.asarray(out), exp, rtol=1e-5, atol=1e-4)


def test_w4a4_linear_close_to_float_linear():
    """End to end: W4A4 with smoothing + low-rank approximates the float linear (sanity of the whole contract)."""
    rng = _rng(6)
    m, k, n, r = 64, 256, 64, 16
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    smooth = np.ones(k, np.float32)
    wp, sw = ref.quantize_weight_int4(jnp.asarray(w))
    # the low-rank branch carries the weight's quantization residual's top singular directions
    resid = w - np.asarray(ref.unpack_int4(wp), np.float32) * np.asarray(sw)[:, None]
    u_, s_, vt = np.linalg.svd(resid.T, full_matrices=False)
    down = jnp.asarray(u_[:, :r] * s_[:r], jnp.bfloat16)
    up = jnp.asarray(vt[:r], jnp.bfloat16)
    y = ref.w4a4_linear(jnp.asarray(x), wp, sw, smooth=jnp.asarray(smooth), down=down, up=up, out_dtype=jnp.float32)
    exact = x @ w.T
    rel = np.linalg.norm(np.asarray(y) - exact) / np.linalg.norm(exact)
    assert rel < 0.2, rel  # 4-bit activations and weights on Gaussian data: ~10% error
