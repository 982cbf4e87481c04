"""kernels/mxfp4_gpu.py: exact MXFP4 -> (e4m3, 2**row_exp) re-encoding, and the FP8 Mosaic GPU GEMM in the interpreter.

The FP8 GEMM ran on an H200 once (bench.mxfp4, see the module docstring); in CI it is checked here in the Mosaic GPU interpreter and by
lowering for CUDA.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from wanjax.kernels.mxfp4_gpu import dequantize, mxfp4_matmul_gpu, mxfp4_matmul_reference, reencode_rows
from wanjax.kernels.w4a4_gpu import W4A4Config

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
SMALL = W4A4Config(tile_m=64, tile_n=64, tile_k=128, stages=2, num_sms=3)


def _mx(rng, r, k, spread, base=-3):
    v = rng.choice(E2M1, (r, k)) * rng.choice([-1, 1], (r, k))
    e = rng.integers(-spread, 1, (r, k // 32)) + base
    return jnp.asarray(v, jnp.float32), jnp.asarray(e, jnp.int32)


def test_reencode_exact_within_8():
    rng = np.random.default_rng(0)
    v, e = _mx(rng, 16, 256, 8)
    f8, row_exp, bad = reencode_rows(v, e)
    assert f8.dtype == jnp.float8_e4m3fn and int(bad) == 0
    back = np.asarray(f8, np.float32) * np.exp2(np.asarray(row_exp, np.float32))[:, None]
    np.testing.assert_array_equal(back, np.asarray(dequantize(v, e)))


def test_reencode_counts_inexact_rows():
    v = jnp.full((3, 64), 0.5, jnp.float32)
    e = jnp.asarray([[0, -8], [0, -9], [0, -12]], jnp.int32)  # second block 8, 9, 12 binades below the row max
    f8, _, bad = reencode_rows(v, e)
    assert int(bad) == 2  # 0.5 * 2**-9 and 0.5 * 2**-12 are below e4m3's smallest subnormal (2**-9)
    with pytest.raises(ValueError, match="block_exp"):
        reencode_rows(v, e[:, :1])


@pytest.mark.parametrize("r", [0, 16])
def test_fp8_gemm_interpreter_vs_reference(r):
    rng = np.random.default_rng(r + 1)
    m, k, n = 130, 256, 128
    xv, xe = _mx(rng, m, k, 8)
    wv, we = _mx(rng, n, k, 8)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    x_lr = jnp.asarray(rng.standard_normal((m, r)), jnp.bfloat16) if r else None
    up = jnp.asarray(rng.standard_normal((r, n)), jnp.bfloat16) if r else None
    out, bx, bw = mxfp4_matmul_gpu(xv, xe, wv, we, x_lr, up, bias, out_dtype=jnp.float32, config=SMALL, interpret=True)
    exp = mxfp4_matmul_reference(xv, xe, wv, we, x_lr, up, bias, out_dtype=jnp.float32)
    assert int(bx) == 0 and int(bw) == 0
    o = np.asarray(out, np.float64)
    assert np.isfinite(o).all()
    assert np.linalg.norm(o - np.asarray(exp)) / np.linalg.norm(np.asarray(exp)) <= 1e-5


def test_fp8_gemm_lowers_for_cuda():
    S = jax.ShapeDtypeStruct
    m, k, n, r = 32760, 5120, 13824, 32
    args = (
        S((m, k), jnp.float32),
        S((m, k // 32), jnp.int32),
        S((n, k), jnp.float32),
        S((n, k // 32), jnp.int32),
        S((m, r), jnp.bfloat16),
        S((r, n), jnp.bfloat16),
        S((n,), jnp.float32),
    )
    text = jax.jit(lambda *a: mxfp4_matmul_gpu(*a)[0]).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "wgmma" in text and "e4m3" in text


def _mx_layer(m=24, k=256, n=256, r=16, seed=3):
    from wanjax.numerics.fp4 import quantize_mxfp4
    from wanjax.numerics.pack import pack_nibbles

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 4, (m, 1)), jnp.bfloat16).at[:, 7].multiply(40.0)
    qt = quantize_mxfp4(jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32), scale_rule="ocp_floor")
    smooth = jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32)
    down = jnp.asarray(rng.standard_normal((k, r)) * 0.05, jnp.bfloat16)
    up = jnp.asarray(rng.standard_normal((r, n)) * 0.05, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return x, pack_nibbles(qt.codes), qt.scales, smooth, down, up, bias


@pytest.mark.parametrize("scale_rule,exp_offset", [("safe_ceil", 0), ("ocp_floor", -1)])
def test_act_to_fp8_equals_quantize_then_reencode(scale_rule, exp_offset):
    """The fused activation path gives exactly the FP8 rows and scales of MXFP4 quantization + re-encoding."""
    from wanjax.kernels.mxfp4_linear import mxfp4_act_quant
    from wanjax.kernels.mxfp4_gpu import act_to_fp8, exp2_exact

    x, _, _, smooth, *_ = _mx_layer()
    x8, s_x, bad = act_to_fp8(x, smooth, 0.8, exp_offset, scale_rule=scale_rule)
    xv, xe = mxfp4_act_quant(x, smooth, 0.8, exp_offset, scale_rule=scale_rule)
    f8, row_exp, bad0 = reencode_rows(xv, xe)
    np.testing.assert_array_equal(np.asarray(x8, np.float32), np.asarray(f8, np.float32))
    np.testing.assert_array_equal(np.asarray(s_x), np.asarray(exp2_exact(row_exp)))
    assert int(bad) == int(bad0)


def test_prepare_weights_exact_and_nan_rows():
    from wanjax.numerics.fp4 import mxfp4_decode
    from wanjax.kernels.mxfp4_gpu import prepare_weights

    _, codes, scales, *_ = _mx_layer()
    scales = scales.at[5, 2].set(255)  # an E8M0 NaN block: that output channel must become NaN
    w8, s_w, bad = prepare_weights(codes, scales)
    assert w8.dtype == jnp.float8_e4m3fn and int(bad) == 0
    wv, we = mxfp4_decode(codes, scales)
    back = np.asarray(w8, np.float32) * np.asarray(s_w)[:, None]
    ok = np.arange(back.shape[0]) != 5
    np.testing.assert_array_equal(back[ok], np.asarray(dequantize(wv, we))[ok])
    assert np.isnan(np.asarray(s_w)[5]) and not np.isnan(np.asarray(s_w)[ok]).any()


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_mxfp4_linear_fp8_matches_mxfp4_linear(backend):
    """Prepared weights give the numbers of the per-call path (mxfp4_linear) on every backend (on CPU "pallas" falls
    back to the XLA dot); NaN activation rows and NaN weight rows come out NaN."""
    from wanjax.kernels.dispatch import mxfp4_linear, mxfp4_linear_fp8
    from wanjax.kernels.mxfp4_gpu import prepare_weights

    x, codes, scales, smooth, down, up, bias = _mx_layer()
    x = x.at[4, 9].set(jnp.nan)
    scales = scales.at[11, 0].set(255)
    w8, s_w, _ = prepare_weights(codes, scales)
    kw = dict(smooth=smooth, down=down, up=up, bias=bias, clip=0.9, out_dtype=jnp.float32, backend=backend)
    y = np.asarray(mxfp4_linear_fp8(x, w8, s_w, **kw))
    y0 = np.asarray(mxfp4_linear(x, codes, scales, **kw))
    nan = np.isnan(y0)
    assert nan[4].all() and nan[:, 11].all() and nan.sum() == y0.shape[0] + y0.shape[1] - 1
    np.testing.assert_array_equal(np.isnan(y), nan)
    np.testing.assert_allclose(y[~nan], y0[~nan], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prepare_weights"):
        mxfp4_linear_fp8(x, w8.astype(jnp.float32), s_w)
