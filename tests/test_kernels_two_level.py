"""Carried int8 codes of two-level group scales on the kernels: the XLA act quant (``dispatch.act_quant_two_level``)
gives the numerics quantizer's codes, and the per-channel int8 GEMMs (reference, XLA, the Mosaic GPU int8-weight
kernel in its interpreter) accumulate the full carried range (|c| <= 126) exactly."""

import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.kernels import dispatch
from wanjax.kernels import reference as ref
from wanjax.kernels.w4a4_gpu import W4A4Config, w4a4_matmul_gpu_any_m
from wanjax.numerics.hadamard import rotate_activations_mxu
from wanjax.numerics.two_level import quantize_int4_two_level

from kernel_inputs import act_inputs


def _carried(rng, m, k, g=64):
    x = rng.standard_normal((m, k)) * np.repeat(10 ** rng.uniform(-2, 0, (m, k // g)), g, axis=1)
    t = quantize_int4_two_level(jnp.asarray(x, jnp.float32), g)
    return t.carried(), t.unit[:, 0]


@pytest.mark.parametrize("rot", [False, True])
def test_act_quant_two_level_is_the_numerics_quantizer(rot):
    x, smooth, down = act_inputs(48, 256, 16, 0)
    signs = jnp.asarray(np.where(np.random.default_rng(1).random(256) < 0.5, -1.0, 1.0), jnp.float32)
    c, u, x_lr = dispatch.act_quant_two_level(
        x, smooth, down, 0.9, group_size=64, levels=18, rot_signs=signs if rot else None, rot_block=128
    )
    xs = x.astype(jnp.float32) / smooth
    if rot:
        xs = rotate_activations_mxu(xs, signs, 128)
    t = quantize_int4_two_level(xs, 64, 18, clip=0.9)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(t.carried()))
    np.testing.assert_array_equal(np.asarray(u), np.asarray(t.unit[:, 0]))
    want_lr = ref.lowrank_down(xs, down) if rot else ref.lowrank_down(x, down, smooth)
    np.testing.assert_array_equal(np.asarray(x_lr, np.float32), np.asarray(want_lr, np.float32))
    assert int(np.abs(np.asarray(c, np.int32)).max()) > 7  # carried codes, not INT4


def test_int8_gemms_accumulate_carried_codes_exactly():
    rng = np.random.default_rng(2)
    cx, ux = _carried(rng, 40, 256)
    cw, uw = _carried(rng, 128, 256)
    assert int(np.abs(np.asarray(cw, np.int32)).max()) == 126
    exact = np.asarray(ref.int_matmul_nt(cx, cw), np.float64)
    ones_m, ones_n = jnp.ones((40,), jnp.float32), jnp.ones((128,), jnp.float32)
    for backend in ("reference", "xla"):
        y = dispatch.w4a4_matmul(cx, ones_m, cw, ones_n, out_dtype=jnp.float32, backend=backend, a_qmax=127)
        np.testing.assert_array_equal(np.asarray(y, np.float64), exact)  # |sums| < 2**24: exact in f32
    ys = [
        dispatch.w4a4_matmul(cx, ux, cw, uw, out_dtype=jnp.float32, backend=b, a_qmax=127) for b in ("reference", "xla")
    ]
    np.testing.assert_array_equal(np.asarray(ys[0]), np.asarray(ys[1]))


def test_mosaic_gpu_int8_weight_kernel_takes_carried_codes():
    """The Hopper kernel's int8-weight path, run in the Mosaic GPU interpreter: bit-exact int32 accumulation of
    carried codes on both operands (the H100 runs the same program)."""
    rng = np.random.default_rng(3)
    cx, _ = _carried(rng, 64, 256)
    cw, _ = _carried(rng, 128, 256)
    small = W4A4Config(tile_m=64, tile_n=64, tile_k=128, stages=2, num_sms=3)
    ones_m, ones_n = jnp.ones((64,), jnp.float32), jnp.ones((128,), jnp.float32)
    out = w4a4_matmul_gpu_any_m(cx, ones_m, cw, ones_n, out_dtype=jnp.float32, config=small, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.int_matmul_nt(cx, cw), np.float32))
