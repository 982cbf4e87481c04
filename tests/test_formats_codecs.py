"""Element codecs: E2M1, E8M0, FP8 e4m3, exact powers of two; ml_dtypes is the independent reference."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from wanjax.numerics import formats as F


def _ml_e2m1_codes(y):
    return np.asarray(y, np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF


def test_e2m1_table_matches_ml_dtypes_all_16_codes():
    ref = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(F.E2M1_VALUES, ref)
    np.testing.assert_array_equal(np.signbit(F.E2M1_VALUES), np.signbit(ref))
    got = np.asarray(F.e2m1_decode(jnp.arange(16, dtype=jnp.uint8)))
    np.testing.assert_array_equal(got, ref)


def test_e2m1_every_code_round_trips():
    codes = jnp.arange(16, dtype=jnp.uint8)
    back = F.e2m1_encode(F.e2m1_decode(codes))
    np.testing.assert_array_equal(np.asarray(back), np.arange(16))


@pytest.mark.parametrize(
    "mid,lo,hi,tie",
    [
        (0.25, 0.0, 0.5, 0.0),
        (0.75, 0.5, 1.0, 1.0),
        (1.25, 1.0, 1.5, 1.0),
        (1.75, 1.5, 2.0, 2.0),
        (2.5, 2.0, 3.0, 2.0),
        (3.5, 3.0, 4.0, 4.0),
        (5.0, 4.0, 6.0, 4.0),
    ],
)
def test_e2m1_rounding_thresholds_ties_to_even(mid, lo, hi, tie):
    below = np.nextafter(np.float32(mid), np.float32(0))
    above = np.nextafter(np.float32(mid), np.float32(10))
    for sign in (1.0, -1.0):
        y = jnp.asarray([below, mid, above], jnp.float32) * sign
        got = np.asarray(F.e2m1_decode(F.e2m1_encode(y)))
        np.testing.assert_array_equal(got, np.array([lo, tie, hi], np.float32) * sign)


def test_e2m1_saturates_at_6():
    y = jnp.asarray([6.0, 6.5, 7.9, 100.0, 3e38, -6.0, -7.0, -1e30], jnp.float32)
    got = np.asarray(F.e2m1_decode(F.e2m1_encode(y)))
    np.testing.assert_array_equal(got, [6, 6, 6, 6, 6, -6, -6, -6])


def test_e2m1_encode_matches_ml_dtypes_dense_sweep():
    # Every float32 step of size 1/1024 in [-8, 8] plus random values: codes identical to ml_dtypes (incl. -0).
    grid = np.arange(-8 * 1024, 8 * 1024 + 1, dtype=np.float32) / 1024
    rnd = np.random.RandomState(0).uniform(-7, 7, 4096).astype(np.float32)
    y = np.concatenate([grid, rnd, np.array([0.0, -0.0], np.float32)])
    got = np.asarray(F.e2m1_encode(jnp.asarray(y)))
    np.testing.assert_array_equal(got, _ml_e2m1_codes(np.clip(y, -6, 6)))


def test_e8m0_decode_all_256_codes_match_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    got = np.asarray(F.e8m0_decode(jnp.asarray(codes)))
    # Bit-exact, including code 0 (subnormal 2**-127) and code 255 (NaN).
    np.testing.assert_array_equal(got[:255].view(np.uint32), ref[:255].view(np.uint32))
    assert np.isnan(got[255]) and np.isnan(ref[255])
    np.testing.assert_array_equal(got[1:255], np.exp2(np.arange(1, 255) - 127.0).astype(np.float32))


def test_e8m0_encode_inverts_decode_for_all_finite_codes():
    e = jnp.arange(-127, 128)
    codes = np.asarray(F.e8m0_encode(e))
    np.testing.assert_array_equal(codes, np.arange(0, 255))


def test_ldexp_exact_covers_full_exponent_range():
    n = np.arange(-126, 128)
    got = np.asarray(F.ldexp_exact(jnp.ones(n.shape), jnp.asarray(n)))
    np.testing.assert_array_equal(got, np.exp2(n.astype(np.float64)).astype(np.float32))
    # 2**-127 and 2**127 applied to values whose result is normal: exact despite the subnormal factor.
    got = np.asarray(F.ldexp_exact(jnp.asarray([6.0, 1.5 * 2.0**-100]), jnp.asarray([-127, 127])))
    np.testing.assert_array_equal(got, np.array([6.0 * 2.0**-127, 1.5 * 2.0**27], np.float32))


def test_fp8_encode_matches_ml_dtypes_and_saturates():
    rs = np.random.RandomState(1)
    y = np.concatenate(
        [
            rs.randn(20000).astype(np.float32) * 50,
            rs.uniform(-(2**-6), 2**-6, 2000).astype(np.float32),  # subnormal range of e4m3
            np.array([448.0, 449.0, 463.9, 464.0, 1e6, -1e6, 0.0, -0.0], np.float32),
        ]
    )
    got = np.asarray(F.fp8_e4m3_encode(jnp.asarray(y))).view(np.uint8)
    ref = np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(got, ref)
    assert np.all(np.isfinite(np.asarray(F.fp8_e4m3_encode(jnp.asarray(y))).astype(np.float32)))
    assert np.isnan(float(F.fp8_e4m3_encode(jnp.float32(jnp.nan)).astype(jnp.float32)))


def test_codecs_jit_equal_eager():
    y = jnp.linspace(-7, 7, 301)
    np.testing.assert_array_equal(np.asarray(jax.jit(F.e2m1_encode)(y)), np.asarray(F.e2m1_encode(y)))
    c = jnp.arange(256, dtype=jnp.uint8)
    a, b = np.asarray(jax.jit(F.e8m0_decode)(c)), np.asarray(F.e8m0_decode(c))
    np.testing.assert_array_equal(a[:255].view(np.uint32), b[:255].view(np.uint32))
