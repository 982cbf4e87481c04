"""INT4 / INT8 / FP8 e4m3 formats against numpy / ml_dtypes references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from wanjax.numerics import formats as F


def _rand(shape, seed=0, scale=1.0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32) * scale


def _np_int_ref(x, bits, g, clip=1.0):
    """Independent numpy reference of symmetric RTN: scale = amax*clip * f32(1/qmax), codes from x * f32(1/scale)."""
    qmax = 2 ** (bits - 1) - 1
    n, k = x.shape
    xg = x.reshape(n, k // g, g)
    scale = (np.abs(xg).max(-1) * np.float32(clip)) * (np.float32(1) / np.float32(qmax))
    scale = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round(xg * (np.float32(1) / scale)[..., None]), -qmax, qmax).astype(np.int8)
    return q.reshape(n, k), scale


@pytest.mark.parametrize("bits,group", [(4, None), (4, 32), (4, 64), (4, 128), (8, None), (8, 64)])
def test_int_matches_numpy_reference_and_half_step_bound(bits, group):
    x = _rand((6, 256), seed=bits)
    q = F.quantize_int(jnp.asarray(x), bits, group_size=group)
    g = 256 if group is None else group
    ref_codes, ref_scale = _np_int_ref(x, bits, g)
    assert q.fmt == f"int{bits}" and q.group_size == g and q.codes.dtype == jnp.int8
    assert q.scales.shape == (6, 256 // g) and q.scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q.codes), ref_codes)
    np.testing.assert_array_equal(np.asarray(q.scales), ref_scale)
    qmax = 2 ** (bits - 1) - 1
    assert np.abs(np.asarray(q.codes)).max() == qmax  # the abs-max element maps to +-qmax
    err = np.abs(np.asarray(F.dequantize(q)) - x).reshape(6, 256 // g, g)
    assert np.all(err <= np.asarray(q.scales)[..., None] * (0.5 + 1e-6))


def test_int4_every_code_round_trips_per_channel_and_group():
    codes = np.tile(np.arange(-7, 8, dtype=np.float32), 3)[:32]  # all 15 codes, twice, then -7, -6
    for scale in (1.0, 0.013, 2.0**-20, 3.7e4):
        x = (codes * np.float32(scale))[None, :].repeat(3, 0)
        for group in (None, 32):
            q = F.quantize_int4(jnp.asarray(x), group_size=group)
            np.testing.assert_array_equal(np.asarray(q.codes), codes[None].repeat(3, 0).astype(np.int8))
            np.testing.assert_allclose(np.asarray(F.dequantize(q)), x, rtol=1e-6)


def test_int4_codes_never_use_minus_8_and_clip_saturates():
    x = _rand((4, 64), seed=3)
    q = F.quantize_int4(jnp.asarray(x), group_size=32, clip=0.5)
    c = np.asarray(q.codes)
    assert c.min() == -7 and c.max() == 7
    scale = np.abs(x.reshape(4, 2, 32)).max(-1) * 0.5 / 7
    np.testing.assert_allclose(np.asarray(q.scales), scale, rtol=1e-6)
    big = np.abs(x.reshape(4, 2, 32)) > 7.5 * scale[..., None]
    assert big.any() and np.all(np.abs(c.reshape(4, 2, 32))[big] == 7)


def test_int_per_row_clip_broadcasts():
    x = _rand((3, 64), seed=4)
    clip = jnp.asarray([[1.0], [0.5], [0.25]])
    q = F.quantize_int4(jnp.asarray(x), group_size=32, clip=clip)
    expect = np.abs(x.reshape(3, 2, 32)).max(-1) * np.asarray(clip) / 7
    np.testing.assert_allclose(np.asarray(q.scales), expect, rtol=1e-6)


@pytest.mark.parametrize(
    "fmt,kw",
    [
        ("int4", {}),
        ("int4", {"group_size": 32}),
        ("int8", {}),
        ("fp8_e4m3", {}),
        ("fp8_e4m3", {"granularity": "tensor"}),
    ],
)
def test_all_zero_groups_have_unit_scale_and_exact_zeros(fmt, kw):
    x = _rand((3, 64), seed=5)
    x[1] = 0.0
    x[2, 32:] = -0.0
    if fmt == "fp8_e4m3" and kw:
        x[:] = 0.0
    q = F.quantize(jnp.asarray(x), fmt, **kw)
    s = np.asarray(q.scales)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    d = np.asarray(F.dequantize(q))
    np.testing.assert_array_equal(d[x == 0], 0.0)
    if not (fmt == "fp8_e4m3" and kw):
        np.testing.assert_array_equal(s[1], 1.0)


def _np_fp8_ref(x, per_tensor):
    amax = np.abs(x).max() if per_tensor else np.abs(x).max(-1, keepdims=True)
    scale = amax * (np.float32(1) / np.float32(448))
    codes = np.clip(x * (np.float32(1) / scale), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return codes, scale


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_matches_ml_dtypes_reference(granularity):
    x = _rand((5, 96), seed=6) * np.array([1, 10, 100, 1e-3, 3], np.float32)[:, None]
    q = F.quantize_fp8(jnp.asarray(x), granularity=granularity)
    codes, scale = _np_fp8_ref(x, granularity == "tensor")
    assert q.codes.dtype == jnp.float8_e4m3fn
    assert q.scales.shape == (() if granularity == "tensor" else (5, 1))
    assert q.group_size == (0 if granularity == "tensor" else 96)
    np.testing.assert_array_equal(np.asarray(q.scales), scale)
    np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8), codes.view(np.uint8))
    d = np.asarray(F.dequantize(q))
    np.testing.assert_allclose(d, codes.astype(np.float32) * scale, rtol=1e-6)
    # e4m3 has 3 mantissa bits: relative error <= 2**-4 for normal values.
    normal = np.abs(x / scale) >= 2.0**-6
    assert np.all(np.abs(d - x)[normal] <= np.abs(x)[normal] * 2.0**-4 * (1 + 1e-6))


def test_fp8_every_code_round_trips():
    vals = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    vals = vals[np.isfinite(vals)]  # 254 finite codes (+-0 included)
    x = np.concatenate([vals, [448.0, 448.0]]).astype(np.float32)[None]  # 256 wide, amax 448 -> scale 1
    q = F.quantize_fp8(jnp.asarray(x), granularity="channel")
    assert float(q.scales[0, 0]) == 1.0
    np.testing.assert_array_equal(np.asarray(q.codes).astype(np.float32), x)


def test_dequantize_dtype_and_qdq():
    x = jnp.asarray(_rand((2, 64), seed=7)).astype(jnp.bfloat16)
    y = F.quantize_dequantize(x, "int4", group_size=64)
    assert y.dtype == jnp.bfloat16
    q = F.quantize_int4(x, group_size=64)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(F.dequantize(q, jnp.bfloat16)))


@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 32}), ("int8", {}), ("fp8_e4m3", {})])
def test_jit_equals_eager_and_traced_clip_does_not_recompile(fmt, kw):
    x = jnp.asarray(_rand((4, 64), seed=8))
    f = jax.jit(lambda x, c: F.quantize(x, fmt, clip=c, **kw))
    for c in (1.0, 0.8, 0.6):
        qj, qe = f(x, jnp.float32(c)), F.quantize(x, fmt, clip=c, **kw)
        assert qj.fmt == fmt and qj.group_size == qe.group_size
        np.testing.assert_array_equal(np.asarray(qj.codes).astype(np.float32), np.asarray(qe.codes).astype(np.float32))
        np.testing.assert_array_equal(np.asarray(qj.scales), np.asarray(qe.scales))
    assert f._cache_size() == 1


def test_int_rounding_ties_to_even_at_quantizer_level():
    # amax 7 -> scale exactly 1, so x / scale hits the .5 ties exactly.
    x = jnp.asarray([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.5]])
    np.testing.assert_array_equal(np.asarray(F.quantize_int4(x).codes), [[7, 0, 2, 2, 0, -2, -2, 6]])
