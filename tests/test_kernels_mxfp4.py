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
  args = (S((m, k), jnp.float32), S((m, k // 32), jnp.int32), S((n, k), jnp.float32), S((n, k // 32), jnp.int32),
          S((m, r), jnp.bfloat16), S((r, n), jnp.bfloat16), S((n,), jnp.float32))
  text = jax.jit(lambda *a: mxfp4_matmul_gpu(*a)[0]).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "wgmma" in text and "e4m3" in text
