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
  out = w4a4_matmul_tpu(qx, jnp.ones((m,)), w, jnp.ones((n,)), out_dtype=jnp.float32, mode=mode,
                        config=TPUConfig(bm=64, bn=128, bk=1536), interpret=INTERP)
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
  with pytest.raises(ValueError, match="mode"):
    w4a4_matmul_tpu(qx, sx, qw, sw, mode="fp8")
  with pytest.raises(ValueError, match="multiples"):
    w4a4_matmul_tpu(qx, sx, qw, sw, config=TPUConfig(bm=64, bn=96, bk=256))
  with pytest.raises(ValueError, match="weights must be int8"):
    w4a4_matmul_tpu(qx, sx, qw.astype(jnp.int32), sw)


def test_native_int4_not_interpretable():
  pytest.skip("mode='native_int4' issues an int4 x int4 dot, which XLA:CPU (and so the interpreter) cannot execute; "
              "covered by test_lowers_for_tpu only")


@pytest.mark.parametrize("mode", ["int8", "int4", "native_int4"])
def test_lowers_for_tpu(mode):
  S = jax.ShapeDtypeStruct
  m, k, n, r = 32760, 13824, 5120, 32
  w = S((n, k), jnp.int8) if mode == "int8" else S((n, k // 2), jnp.uint8)
  args = (S((m, k), jnp.int8), S((m,), jnp.float32), w, S((n,), jnp.float32), S((m, r), jnp.bfloat16),
          S((r, n), jnp.bfloat16), S((n,), jnp.float32))
  f = lambda *a: w4a4_matmul_tpu(*a, mode=mode)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text
