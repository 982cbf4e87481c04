"""MXFP4: scale rules, exponent offset, every code x every scale, zero blocks, saturation, error bounds.

References: float64 numpy for the exponent rules, ml_dtypes float4_e2m1fn / float8_e8m0fnu for the encodings, and a
PyTorch transcription of the seed's activation QDQ formula.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from wanjax.numerics import formats as F


def _ref_exponent(amax, rule, offset=0, clip=1.0):
    a = (np.asarray(amax, np.float32) * np.float32(clip)).astype(np.float64)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(a)) - 2 if rule == "ocp_floor" else np.ceil(np.log2(a / 6.0))
    e = np.clip(e + offset, -126, 127)
    return np.where(a < 2.0**-126, -126, e).astype(np.int64)


def _ref_mxfp4(x, rule, offset=0, clip=1.0, block=32):
    n, k = x.shape
    xg = x.reshape(n, k // block, block).astype(np.float32)
    e = _ref_exponent(np.abs(xg).max(-1), rule, offset, clip)
    y = np.clip(xg.astype(np.float64) * np.exp2(-e)[..., None], -6, 6).astype(np.float32)
    codes = y.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    return codes.reshape(n, k), (e + 127).astype(np.uint8)


def _half_step(y):
    """Half the E2M1 grid spacing around |y| (y already divided by the block scale)."""
    a = np.abs(y)
    return np.where(a < 2, 0.25, np.where(a < 4, 0.5, 1.0))


def _edge_amaxes():
    f = np.arange(-120, 121, 7).astype(np.float64)
    base = np.concatenate([2.0**f, 1.5 * 2.0**f, 6 * 2.0**f, 4 * 2.0**f, 3 * 2.0**f]).astype(np.float32)
    up = np.nextafter(base, np.float32(np.inf))
    down = np.nextafter(base, np.float32(0))
    rnd = np.exp2(np.random.RandomState(0).uniform(-125, 125, 2000)).astype(np.float32)
    return np.concatenate([base, up, down, rnd, np.float32([0.0])])


@pytest.mark.parametrize("rule", F.MX_SCALE_RULES)
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_shared_exponent_matches_float64_rule(rule, offset):
    amax = _edge_amaxes()
    got = np.asarray(F.mx_shared_exponent(jnp.asarray(amax), rule, offset))
    np.testing.assert_array_equal(got, _ref_exponent(amax, rule, offset))


def test_scale_rules_differ_as_documented():
    # ocp_floor: amax / 2**e in [4, 8); safe_ceil: amax / 2**e in (3, 6].
    amax = _edge_amaxes()[:-1]
    amax = amax[(amax > 2.0**-120) & (amax < 2.0**120)]
    for rule, lo, hi, lo_closed, hi_closed in [("ocp_floor", 4, 8, True, False), ("safe_ceil", 3, 6, False, True)]:
        e = np.asarray(F.mx_shared_exponent(jnp.asarray(amax), rule)).astype(np.float64)
        r = amax.astype(np.float64) / np.exp2(e)
        assert np.all(r >= lo if lo_closed else r > lo) and np.all(r <= hi if hi_closed else r < hi), rule


@pytest.mark.parametrize("rule", F.MX_SCALE_RULES)
@pytest.mark.parametrize("offset,clip", [(0, 1.0), (-1, 1.0), (1, 1.0), (0, 0.7), (1, 0.6)])
def test_quantize_matches_ml_dtypes_reference(rule, offset, clip):
    rs = np.random.RandomState(offset + 7)
    x = (rs.randn(8, 128) * np.exp2(rs.randint(-20, 20, (8, 1)))).astype(np.float32)
    x[0, :5] *= 50.0  # outliers
    q = F.quantize_mxfp4(jnp.asarray(x), scale_rule=rule, exp_offset=offset, clip=clip)
    codes, scales = _ref_mxfp4(x, rule, offset, clip)
    assert q.fmt == "mxfp4" and q.group_size == 32 and q.codes.dtype == jnp.uint8 and q.scales.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.scales), scales)
    deq = np.asarray(F.dequantize(q))
    ref = (
        codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32).reshape(8, 4, 32)
        * scales.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)[..., None]
    ).reshape(8, 128)
    np.testing.assert_array_equal(deq, ref)


def test_every_code_with_every_usable_scale_round_trips():
    # For each shared exponent e in [-125, 125] (E8M0 codes 2..252): a block holding all 16 codes twice, amax 6*2**e.
    codes = np.tile(np.arange(16, dtype=np.uint8), 2)
    e = np.arange(-125, 126)
    x = (F.E2M1_VALUES[codes][None, :].astype(np.float64) * np.exp2(e)[:, None]).astype(np.float32)
    for rule in F.MX_SCALE_RULES:
        q = F.quantize_mxfp4(jnp.asarray(x), scale_rule=rule)
        np.testing.assert_array_equal(np.asarray(q.scales)[:, 0], e + 127)
        np.testing.assert_array_equal(np.asarray(q.codes), np.broadcast_to(codes, x.shape))
        np.testing.assert_array_equal(np.asarray(F.dequantize(q)), x)
    # e = -126 (code 1): every magnitude except 0.5 * 2**-126, which is a float32 subnormal.
    keep = np.abs(F.E2M1_VALUES[codes]) != 0.5
    x1 = (F.E2M1_VALUES[codes] * np.float32(2.0**-126)) * keep
    q = F.quantize_mxfp4(jnp.asarray(x1[None]))
    assert int(q.scales[0, 0]) == 1
    np.testing.assert_array_equal(np.asarray(F.dequantize(q))[0], x1)


def test_top_scale_codes_reachable_with_offset_and_clamped():
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 6.0 * 2.0**125  # safe_ceil gives e = 125 (code 252)
    x[0, 1] = 1.5 * 2.0**125
    for offset, code in [(0, 252), (1, 253), (2, 254), (5, 254)]:
        q = F.quantize_mxfp4(jnp.asarray(x), scale_rule="safe_ceil", exp_offset=offset)
        assert int(q.scales[0, 0]) == code
        d = np.asarray(F.dequantize(q))
        assert np.all(np.isfinite(d))
        e = code - 127
        expect = F.E2M1_VALUES[np.asarray(q.codes)[0]].astype(np.float64) * 2.0**e
        np.testing.assert_array_equal(d[0], expect.astype(np.float32))
    # Negative offsets clamp at code 1 for tiny blocks.
    tiny = np.full((1, 32), 2.0**-124, np.float32)
    assert int(F.quantize_mxfp4(jnp.asarray(tiny), exp_offset=-1).scales[0, 0]) == 1


@pytest.mark.parametrize("rule", F.MX_SCALE_RULES)
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_all_zero_blocks(rule, offset):
    x = np.random.RandomState(1).randn(2, 96).astype(np.float32)
    x[0, 32:64] = 0.0
    x[1, :] = -0.0
    q = F.quantize_mxfp4(jnp.asarray(x), scale_rule=rule, exp_offset=offset)
    s = np.asarray(q.scales)
    assert s[0, 1] == 1 and np.all(s[1] == 1)  # smallest normal scale 2**-126, never 0 / NaN
    sv = np.asarray(F.e8m0_decode(q.scales))
    assert np.all(np.isfinite(sv)) and np.all(sv > 0)
    d = np.asarray(F.dequantize(q))
    np.testing.assert_array_equal(d[0, 32:64], 0.0)
    np.testing.assert_array_equal(d[1], 0.0)


def test_saturation_ocp_floor_and_error_bounds():
    rs = np.random.RandomState(2)
    x = (rs.randn(16, 256) * np.exp2(rs.randint(-10, 10, (16, 1)))).astype(np.float32)
    xg = x.reshape(16, 8, 32)
    for rule, offset in [("ocp_floor", 0), ("safe_ceil", 0), ("safe_ceil", -1)]:
        q = F.quantize_mxfp4(jnp.asarray(x), scale_rule=rule, exp_offset=offset)
        scale = np.exp2(np.asarray(q.scales).astype(np.float64) - 127)[..., None]
        y = xg / scale
        err = np.abs(np.asarray(F.dequantize(q)).reshape(16, 8, 32) - xg)
        sat = np.abs(y) > 6
        ok = ~sat
        scale_el = np.broadcast_to(scale, y.shape)
        assert np.all(err[ok] <= _half_step(y[ok]) * scale_el[ok])  # round to nearest: within half a grid step
        d = np.asarray(F.dequantize(q)).reshape(16, 8, 32)
        np.testing.assert_array_equal(np.abs(d[sat]), 6 * scale_el[sat])
        if rule == "safe_ceil" and offset == 0:
            assert not sat.any()  # safe_ceil never saturates
        else:
            assert sat.any()  # ocp_floor / negative offset: values in (6, 8) * 2**e clip to 6
            assert np.all(np.abs(y[sat]) < (8 if rule == "ocp_floor" else 12))


def _torch_seed_act_qdq(x, clip, offset):
    """PyTorch transcription of the seed's activation formula (digest section 2.5): safe_ceil, E2M1 thresholds."""
    xg = x.reshape(x.shape[0], -1, 32)
    amax = xg.abs().amax(-1, keepdim=True) * clip
    e = torch.ceil(torch.log2(amax / 6.0)) + offset
    e = e.clamp(-127, 127)  # E8M0 code e + 127 clamped to [0, 254]
    y = torch.clamp(xg / torch.exp2(e), -6.0, 6.0)
    a = y.abs()
    mag = (
        (a > 0.25).float() * 0.5
        + (a >= 0.75).float() * 0.5
        + (a > 1.25).float() * 0.5
        + (a >= 1.75).float() * 0.5
        + (a > 2.5).float() * 1.0
        + (a >= 3.5).float() * 1.0
        + (a > 5.0).float() * 2.0
    )
    return (torch.sign(y) * mag * torch.exp2(e)).reshape(x.shape)


@pytest.mark.parametrize("clip,offset", [(1.0, 0), (0.8, 1), (0.6, -1)])
def test_parity_with_torch_seed_activation_formula(clip, offset):
    x = torch.randn(64, 128, dtype=torch.float32) * 3
    x[:, 7] *= 40.0
    ref = _torch_seed_act_qdq(x, clip, offset).numpy()
    got = np.asarray(
        F.quantize_dequantize(jnp.asarray(x.numpy()), "mxfp4", scale_rule="safe_ceil", exp_offset=offset, clip=clip)
    )
    np.testing.assert_array_equal(got, ref)


def test_jit_traced_offset_and_clip_per_block_no_recompile():
    x = jnp.asarray(np.random.RandomState(3).randn(4, 64).astype(np.float32))
    f = jax.jit(lambda x, d, c: F.quantize_mxfp4(x, "safe_ceil", exp_offset=d, clip=c))
    for d, c in [(0, 1.0), (1, 0.9), (-1, 0.6)]:
        dd = jnp.full((4, 2), d, jnp.int32)
        cc = jnp.full((4, 1), c, jnp.float32)
        qj, qe = f(x, dd, cc), F.quantize_mxfp4(x, "safe_ceil", exp_offset=d, clip=c)
        np.testing.assert_array_equal(np.asarray(qj.codes), np.asarray(qe.codes))
        np.testing.assert_array_equal(np.asarray(qj.scales), np.asarray(qe.scales))
    assert f._cache_size() == 1
    g = jax.jit(F.dequantize)
    np.testing.assert_array_equal(np.asarray(g(qj)), np.asarray(F.dequantize(qj)))


def test_bfloat16_input_equals_float32_of_same_values():
    x = jnp.asarray(np.random.RandomState(4).randn(3, 64).astype(np.float32)).astype(jnp.bfloat16)
    for rule in F.MX_SCALE_RULES:
        a, b = F.quantize_mxfp4(x, rule), F.quantize_mxfp4(x.astype(jnp.float32), rule)
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        np.testing.assert_array_equal(np.asarray(a.scales), np.asarray(b.scales))
    y = F.quantize_dequantize(x, "mxfp4")
    assert y.dtype == jnp.bfloat16
    # E2M1 values times a power of two are exact in bfloat16 (2 significant bits).
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.asarray(F.dequantize(F.quantize_mxfp4(x))))


@pytest.mark.parametrize("rule", F.MX_SCALE_RULES)
def test_e2m1_midpoints_at_quantizer_level(rule):
    # A block with amax 6 * 2**e has scale 2**e under both rules, so the E2M1 midpoints are hit exactly.
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    tie = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0], np.float32)
    for e in (-20, 0, 13):
        row = np.zeros(32, np.float32)
        row[0] = 6.0
        row[1:8], row[8:15] = mids, -mids
        x = jnp.asarray(row[None] * np.float32(2.0**e))
        d = np.asarray(F.quantize_dequantize(x, "mxfp4", scale_rule=rule))[0] / np.float32(2.0**e)
        np.testing.assert_array_equal(d[1:8], tie)
        np.testing.assert_array_equal(d[8:15], -tie)
