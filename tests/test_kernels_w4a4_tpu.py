"""kernels/w4a4_tpu.py on CPU: Pallas TPU interpreter runs vs the reference, and lowering for the "tpu" platform.

No TPU was available: these check semantics (interpreter, NaN-poisoned buffers) and that Mosaic TPU lowering accepts
the kernel; MXU speed and VMEM limits are unverified.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from wanjax.kernels import reference as ref
from wanjax.kernels.w4a4_tpu import TPUConfig, w4a4_matmul_tpu
from kernel_inputs import w4a4_inputs

SMALL = TPUConfig(bm=64, bn=128, bk=256)
INTERP = pltpu.InterpretParams(uninitialized_memory="nan")


_inputs = w4a4_inputs


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int_accumulation_bit_exact_k13824(mode):
    m, k, n = 37, 13824, 128  # odd M (partial block), FFN-down K
    qx, qw, *_ = _inputs(1, m, k, n, 0)
    w = qw if mode == "int8" else ref.pack_int4(qw)
    out = w4a4_matmul_tpu(
        qx,
        jnp.ones((m,)),
        w,
        jnp.ones((n,)),
        out_dtype=jnp.float32,
        mode=mode,
        config=TPUConfig(bm=64, bn=128, bk=1536),
        interpret=INTERP,
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.int_matmul_nt(qx, qw), np.float32))


@pytest.mark.parametrize("r", [0, 16, 32])
def test_epilogue_bf16_vs_reference(r):
    m, k, n = 100, 512, 256
    qx, qw, sx, sw, bias, x_lr, up = _inputs(10 + r, m, k, n, r)
    out = w4a4_matmul_tpu(qx, sx, qw, sw, x_lr, up, bias, config=SMALL, interpret=INTERP)
    exp = ref.w4a4_matmul(qx, sx, ref.pack_int4(qw), sw, x_lr, up, bias, out_dtype=jnp.float32)
    o = np.asarray(out, np.float64)
    assert np.isfinite(o).all()
    assert np.linalg.norm(o - np.asarray(exp)) / np.linalg.norm(np.asarray(exp)) <= 1e-2


def test_errors():
    qx, qw, sx, sw, *_ = _inputs(0, 16, 256, 128, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        w4a4_matmul_tpu(qx, sx, qw, sw, mode="fp4")
    with pytest.raises(ValueError, match=r"mode='fp8'\): weights must be int8 or float8_e4m3fn, got int32"):
        w4a4_matmul_tpu(qx, sx, qw.astype(jnp.int32), sw, mode="fp8")
    with pytest.raises(ValueError, match=r"q_x must be int8 or float8_e4m3fn, got bfloat16"):
        w4a4_matmul_tpu(qx.astype(jnp.bfloat16), sx, qw, sw, mode="fp8")
    with pytest.raises(ValueError, match="multiples"):
        w4a4_matmul_tpu(qx, sx, qw, sw, config=TPUConfig(bm=64, bn=96, bk=256))
    with pytest.raises(ValueError, match="weights must be int8"):
        w4a4_matmul_tpu(qx, sx, qw.astype(jnp.int32), sw)


def test_native_int4_not_interpretable():
    pytest.skip(
        "mode='native_int4' issues an int4 x int4 dot, which XLA:CPU (and so the interpreter) cannot execute; "
        "covered by test_lowers_for_tpu only"
    )


@pytest.mark.parametrize("operands", ["int8", "e4m3"])
def test_fp8_mode_accumulation_bit_exact_k13824(operands):
    """TPU7x's mode: int4 values as e4m3 (converted in VMEM from int8, or given as e4m3), f32 accumulation: every
    product and partial sum is an exact integer, so the result equals the int32 reference."""
    m, k, n = 37, 13824, 128
    qx, qw, *_ = _inputs(2, m, k, n, 0)
    qx = qx.at[0].set(-8).at[1].set(7)  # the extreme codes, the largest partial sums
    qw = qw.at[0].set(-8).at[1].set(7)
    cast = (lambda a: a) if operands == "int8" else (lambda a: a.astype(jnp.float8_e4m3fn))
    out = w4a4_matmul_tpu(
        cast(qx),
        jnp.ones((m,)),
        cast(qw),
        jnp.ones((n,)),
        out_dtype=jnp.float32,
        mode="fp8",
        config=TPUConfig(bm=64, bn=128, bk=1536),
        interpret=INTERP,
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.int_matmul_nt(qx, qw), np.float32))


@pytest.mark.parametrize("r", [0, 32])
def test_fp8_mode_epilogue_and_mxfp4_rows(r):
    m, k, n = 100, 512, 256
    qx, qw, sx, sw, bias, x_lr, up = _inputs(20 + r, m, k, n, r)
    out = w4a4_matmul_tpu(qx, sx, qw, sw, x_lr, up, bias, mode="fp8", config=SMALL, interpret=INTERP)
    exp = np.asarray(ref.w4a4_matmul(qx, sx, ref.pack_int4(qw), sw, x_lr, up, bias, out_dtype=jnp.float32))
    o = np.asarray(out, np.float64)
    assert np.isfinite(o).all() and np.linalg.norm(o - exp) / np.linalg.norm(exp) <= 1e-2
    # MXFP4 operands re-encoded to e4m3 rows with power-of-two row scales (as prepared for the GPU's FP8 kernel)
    from wanjax.kernels import mxfp4_gpu

    rng = np.random.default_rng(r)
    e2m1 = jnp.asarray([0, 0.5, 1, 1.5, 2, 3, 4, 6], jnp.float32)

    def mx(rows):
        v = e2m1[rng.integers(0, 8, (rows, k))] * jnp.asarray(rng.choice([-1.0, 1.0], (rows, k)), jnp.float32)
        return v, jnp.asarray(rng.integers(-6, -2, (rows, k // 32)), jnp.int32)

    (xv, xe), (wv, we) = mx(m), mx(n)
    x8, ex, bad_x = mxfp4_gpu.reencode_rows(xv, xe)
    w8, ew, bad_w = mxfp4_gpu.reencode_rows(wv, we)
    assert int(bad_x) == int(bad_w) == 0
    y = w4a4_matmul_tpu(
        x8,
        mxfp4_gpu.exp2_exact(ex),
        w8,
        mxfp4_gpu.exp2_exact(ew),
        x_lr,
        up,
        bias,
        out_dtype=jnp.float32,
        mode="fp8",
        config=SMALL,
        interpret=INTERP,
    )
    y_ref = np.asarray(mxfp4_gpu.mxfp4_matmul_reference(xv, xe, wv, we, x_lr, up, bias, out_dtype=jnp.float32))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())


@pytest.mark.parametrize("mode", ["int8", "int4", "native_int4", "fp8"])
def test_lowers_for_tpu(mode):
    S = jax.ShapeDtypeStruct
    m, k, n, r = 32760, 13824, 5120, 32
    w = S((n, k), jnp.int8) if mode in ("int8", "fp8") else S((n, k // 2), jnp.uint8)
    args = (
        S((m, k), jnp.int8),
        S((m,), jnp.float32),
        w,
        S((n,), jnp.float32),
        S((m, r), jnp.bfloat16),
        S((r, n), jnp.bfloat16),
        S((n,), jnp.float32),
    )
    f = lambda *a: w4a4_matmul_tpu(*a, mode=mode)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
