"""NVFP4 (E2M1 + e4m3 block scale per 16 + fp32 tensor scale) against a numpy / ml_dtypes reference."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from wanjax.numerics import formats as F

E4M3 = ml_dtypes.float8_e4m3fn


def _ref_nvfp4(x, tensor_scale=None, clip=1.0, block=16):
    """Reference built from ml_dtypes casts; same float32 operation order as documented in quantize_nvfp4."""
    n, k = x.shape
    xg = x.reshape(n, k // block, block).astype(np.float32)
    ts = np.abs(x).max() * (np.float32(1) / np.float32(2688)) if tensor_scale is None else np.float32(tensor_scale)
    amax = np.abs(xg).max(-1) * np.float32(clip)
    s_b = np.clip(amax * (np.float32(1) / (np.float32(6) * ts)), -448, 448).astype(E4M3)
    s_b = np.where(s_b.astype(np.float32) > 0, s_b, np.asarray(2.0**-9, np.float32).astype(E4M3))
    eff = s_b.astype(np.float32) * ts
    y = np.clip(xg * (np.float32(1) / eff)[..., None], -6, 6)
    codes = y.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    return codes.reshape(n, k), s_b, ts


@pytest.mark.parametrize("tensor_scale,clip", [(None, 1.0), (None, 0.8), (0.003, 1.0)])
def test_matches_ml_dtypes_reference(tensor_scale, clip):
    rs = np.random.RandomState(0)
    x = (rs.randn(8, 64) * np.exp2(rs.randint(-4, 4, (8, 1)))).astype(np.float32)
    q = F.quantize_nvfp4(jnp.asarray(x), tensor_scale=tensor_scale, clip=clip)
    codes, s_b, ts = _ref_nvfp4(x, tensor_scale, clip)
    assert q.fmt == "nvfp4" and q.group_size == 16 and q.codes.dtype == jnp.uint8
    assert q.scales.dtype == jnp.float8_e4m3fn and q.scales.shape == (8, 4) and q.tensor_scale.shape == ()
    assert float(q.tensor_scale) == float(ts)
    np.testing.assert_array_equal(np.asarray(q.scales).view(np.uint8), s_b.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    deq = (
        codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32).reshape(8, 4, 16)
        * (s_b.astype(np.float32) * ts)[..., None]
    ).reshape(8, 64)
    np.testing.assert_array_equal(np.asarray(F.dequantize(q)), deq)


def test_every_code_with_every_block_scale_round_trips():
    # tensor scale 1: the block scale equals amax/6 exactly when the block holds +-6, so every positive finite e4m3
    # value (126 of them, subnormals included) is recovered, and all 16 E2M1 codes come back.
    sb = np.arange(1, 127, dtype=np.uint8).view(E4M3).astype(np.float32)
    codes = np.arange(16, dtype=np.uint8)
    x = (F.E2M1_VALUES[codes][None, :] * sb[:, None]).astype(np.float32)
    q = F.quantize_nvfp4(jnp.asarray(x), tensor_scale=1.0)
    np.testing.assert_array_equal(np.asarray(q.scales)[:, 0].astype(np.float32), sb)
    np.testing.assert_array_equal(np.asarray(q.codes), np.broadcast_to(codes, x.shape))
    np.testing.assert_array_equal(np.asarray(F.dequantize(q)), x)


def test_zero_blocks_and_zero_tensor():
    x = np.random.RandomState(1).randn(2, 48).astype(np.float32)
    x[0, 16:32] = 0.0
    q = F.quantize_nvfp4(jnp.asarray(x))
    s = np.asarray(q.scales).astype(np.float32)
    assert s[0, 1] == 2.0**-9 and np.all(s > 0) and np.all(np.isfinite(s))
    np.testing.assert_array_equal(np.asarray(F.dequantize(q))[0, 16:32], 0.0)
    qz = F.quantize_nvfp4(jnp.zeros((3, 32)))
    assert float(qz.tensor_scale) == 1.0
    assert np.all(np.asarray(qz.scales).astype(np.float32) > 0)
    np.testing.assert_array_equal(np.asarray(F.dequantize(qz)), 0.0)


def test_error_bound():
    rs = np.random.RandomState(2)
    x = rs.randn(32, 128).astype(np.float32)
    q = F.quantize_nvfp4(jnp.asarray(x))
    eff = (np.asarray(q.scales).astype(np.float32) * np.float32(q.tensor_scale))[..., None]
    xg = x.reshape(32, 8, 16)
    y = xg / eff
    err = np.abs(np.asarray(F.dequantize(q)).reshape(32, 8, 16) - xg)
    half = np.where(np.abs(y) < 2, 0.25, np.where(np.abs(y) < 4, 0.5, 1.0)) * eff
    sat = np.abs(y) > 6
    assert np.all(err[~sat] <= half[~sat] * (1 + 1e-6))
    # Saturation comes only from rounding the block scale to e4m3 (relative error <= 2**-4 for normal e4m3).
    amax_b = np.broadcast_to(np.abs(xg).max(-1, keepdims=True), xg.shape)
    assert np.all(err[sat] <= amax_b[sat] * 2.0**-4)


def test_block_scale_saturates_with_small_user_tensor_scale():
    x = np.full((1, 16), 1000.0, np.float32)
    q = F.quantize_nvfp4(jnp.asarray(x), tensor_scale=0.01)  # 1000 / (6 * 0.01) > 448
    assert float(np.asarray(q.scales).astype(np.float32)[0, 0]) == 448.0
    np.testing.assert_array_equal(np.asarray(F.dequantize(q)), np.float32(6) * (np.float32(448) * np.float32(0.01)))


def test_jit_with_traced_tensor_scale():
    x = jnp.asarray(np.random.RandomState(3).randn(4, 32).astype(np.float32))
    f = jax.jit(lambda x, ts: F.quantize_nvfp4(x, tensor_scale=ts))
    for ts in (0.001, 0.002):
        qj, qe = f(x, jnp.float32(ts)), F.quantize_nvfp4(x, tensor_scale=ts)
        np.testing.assert_array_equal(np.asarray(qj.codes), np.asarray(qe.codes))
        np.testing.assert_array_equal(np.asarray(qj.scales).view(np.uint8), np.asarray(qe.scales).view(np.uint8))
    assert f._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(jax.jit(F.quantize_nvfp4)(x).codes), np.asarray(F.quantize_nvfp4(x).codes))
