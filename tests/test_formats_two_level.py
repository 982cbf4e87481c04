"""INT4 with two-level integer group scales (``wanjax.numerics.two_level``): the carried int8 GEMM is exact, codes /
multipliers / units stay in range, zero rows, non-finite rows, the levels check, L = 1 is per-channel INT4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.numerics import formats
from wanjax.numerics.two_level import (
    MAX_SCALE_LEVELS,
    carried_from_scales,
    check_scale_levels,
    quantize_int4_two_level,
    two_level_qdq,
)


def _rows(rng, m, k, g):
    """Rows with group ranges spread over two decades (what group scales are for)."""
    x = rng.standard_normal((m, k))
    return jnp.asarray(x * np.repeat(10 ** rng.uniform(-2, 0, (m, k // g)), g, axis=1), jnp.float32)


def test_carried_int8_gemm_equals_the_group_scaled_product():
    rng = np.random.default_rng(0)
    k, g = 256, 32
    x, w = _rows(rng, 16, k, g), _rows(rng, 24, k, g)
    tx, tw = quantize_int4_two_level(x, g), quantize_int4_two_level(w, g)
    cx, cw = tx.carried(), tw.carried()
    assert cx.dtype == jnp.int8 and cw.dtype == jnp.int8
    acc = np.asarray(jax.lax.dot_general(cx.astype(jnp.int32), cw.astype(jnp.int32), (((1,), (1,)), ((), ()))))
    # the integers q * m from codes and multipliers, multiplied in float64 (exact at these magnitudes)
    qm_x = np.asarray(tx.codes, np.float64) * np.repeat(np.asarray(tx.multipliers, np.float64), g, axis=1)
    qm_w = np.asarray(tw.codes, np.float64) * np.repeat(np.asarray(tw.multipliers, np.float64), g, axis=1)
    np.testing.assert_array_equal(acc.astype(np.float64), qm_x @ qm_w.T)
    # the group-scaled product of the dequantized values q * m * u (float64) is u_x * u_w times that exact sum
    ux, uw = np.asarray(tx.unit, np.float64), np.asarray(tw.unit, np.float64)
    grouped = (qm_x * ux) @ (qm_w * uw).T
    np.testing.assert_allclose(acc * ux * uw.T, grouped, rtol=1e-12, atol=1e-12 * np.abs(grouped).max())
    # and dequantize() (f32: q * f32(m * u)) is q * m * u to the f32 rounding of the scale
    np.testing.assert_allclose(np.asarray(tx.dequantize()), qm_x * ux, rtol=2**-23, atol=0)


def test_codes_multipliers_units_in_range_and_nothing_clipped():
    rng = np.random.default_rng(1)
    g, levels = 64, MAX_SCALE_LEVELS
    x = _rows(rng, 32, 512, g)
    t = quantize_int4_two_level(x, g, levels)
    codes, m, u = np.asarray(t.codes), np.asarray(t.multipliers), np.asarray(t.unit)
    assert t.codes.dtype == jnp.int8 and t.multipliers.dtype == jnp.uint8 and t.unit.dtype == jnp.float32
    assert codes.shape == (32, 512) and m.shape == (32, 8) and u.shape == (32, 1)
    assert np.abs(codes).max() == 7 and m.min() >= 1 and m.max() <= levels
    assert np.abs(np.asarray(t.carried(), np.int32)).max() <= 7 * levels
    # clip 1: the group holding the row's abs-max takes the largest multiple, smaller groups finer ones
    gmax = np.abs(np.asarray(x)).reshape(32, 8, g).max(-1)
    np.testing.assert_array_equal(m[np.arange(32), gmax.argmax(1)], levels)
    assert (m < levels).mean() > 0.5
    # ceil: every group's abs-max is representable, so the error is at most half a step everywhere
    s = np.repeat(np.asarray(t.scales), g, axis=1)
    assert np.all(np.abs(np.asarray(x) - np.asarray(t.dequantize())) <= 0.5 * s * (1 + 2**-20))


def test_two_level_beats_per_channel_on_rows_with_quiet_groups():
    rng = np.random.default_rng(2)
    x = _rows(rng, 64, 256, 64)

    def sqnr(y):
        return 10 * np.log10(np.sum(np.asarray(x) ** 2) / np.sum((np.asarray(x) - np.asarray(y)) ** 2))

    per_channel = sqnr(formats.quantize_dequantize(x, "int4"))
    f32_groups = sqnr(formats.quantize_dequantize(x, "int4", group_size=64))
    two_level = sqnr(two_level_qdq(x, 64, MAX_SCALE_LEVELS))
    assert two_level > per_channel + 3.0
    assert two_level > f32_groups - 1.5  # integer multiples of a unit give up little against free f32 scales


def test_levels_one_is_per_channel_int4_bit_for_bit():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
    t = quantize_int4_two_level(x, 32, levels=1, clip=0.9)
    ref = formats.quantize_int4(x, clip=0.9)
    np.testing.assert_array_equal(np.asarray(t.codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(t.unit), np.asarray(ref.scales))
    np.testing.assert_array_equal(np.asarray(t.multipliers), 1)


def test_clip_multiplies_the_unit_and_may_be_traced():
    rng = np.random.default_rng(4)
    x = _rows(rng, 4, 128, 32)
    amax = np.abs(np.asarray(x)).max(1, keepdims=True).astype(np.float32)
    clip = jnp.asarray([[0.8], [0.9], [1.0], [0.7]], jnp.float32)
    t = jax.jit(lambda x, c: quantize_int4_two_level(x, 32, 12, clip=c, nonfinite="nan"))(x, clip)
    want = (amax * np.asarray(clip)) * (np.float32(1) / np.float32(7 * 12))
    np.testing.assert_array_equal(np.asarray(t.unit), want.astype(np.float32))
    assert np.asarray(t.multipliers).max() == 12  # clipped rows saturate their largest group at L


def test_zero_rows_and_nonfinite_rows():
    x = np.ones((3, 64), np.float32)
    x[0] = 0.0
    x[2, 5] = np.nan
    t = quantize_int4_two_level(jnp.asarray(x), 16, nonfinite="nan")
    assert float(t.unit[0, 0]) == 1.0 and np.all(np.asarray(t.codes[0]) == 0)
    np.testing.assert_array_equal(np.asarray(t.dequantize()[0]), 0.0)
    assert np.all(np.isfinite(np.asarray(t.dequantize()[1])))
    assert np.all(np.isnan(np.asarray(t.dequantize()[2]))) and np.isnan(float(t.unit[2, 0]))
    assert np.all(np.asarray(t.codes[2]) == 0) and np.all(np.asarray(t.multipliers[2]) == 1)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int4_two_level(jnp.asarray(x), 16)


@pytest.mark.parametrize("bad", [0, 19, 1.5, True, "18"])
def test_levels_are_checked(bad):
    with pytest.raises(ValueError, match=r"scale levels must (be an int in|lie in) \[1, 18\]"):
        check_scale_levels("f", bad)
    with pytest.raises(ValueError, match="quantize_int4_two_level"):
        quantize_int4_two_level(jnp.ones((2, 64)), 32, levels=bad)


def test_group_size_is_checked():
    with pytest.raises(ValueError, match="group_size=48 does not divide K=64"):
        quantize_int4_two_level(jnp.ones((2, 64)), 48)
    with pytest.raises(ValueError, match="group_size must be a divisor of K"):
        quantize_int4_two_level(jnp.ones((2, 64)), None)


def test_carried_from_scales_recovers_the_multipliers_exactly():
    rng = np.random.default_rng(5)
    x = _rows(rng, 300, 256, 32)
    t = quantize_int4_two_level(x, 32)
    got = carried_from_scales(t.codes, t.scales, t.unit[:, 0], 32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(t.carried()))
    assert t.as_quantized_tensor().fmt == "int4" and t.as_quantized_tensor().group_size == 32
