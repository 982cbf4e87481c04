"""Two-level group scales on a Hopper GPU (skipped elsewhere): the "pallas" backend (Mosaic GPU int8 GEMM, fused act
quant for per-token INT8) on carried int8 codes agrees with the reference at a Wan2.2 linear's shape. The carried
operands are plain int8 for the kernel, so the per-channel GEMM's speed applies (``dispatch.w4a4_matmul``).

Written 2026-12-07 without a GPU run (the session's device time went to other work): the tolerances follow the
other real-mode GPU checks and are unverified on a GPU; on CPU, ``tests/test_kernels_two_level.py`` runs the Mosaic
GPU int8-weight kernel on carried codes in its interpreter (bit-exact)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_l2

from wanjax.kernels import dispatch
from wanjax.numerics.two_level import quantize_int4_two_level

pytestmark = pytest.mark.skipif(not dispatch.on_hopper(), reason="needs a Hopper GPU (H100 / H200)")

M, K, N, R, G = 2048, 5120, 5120, 32, 128


def _operands(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)) * rng.uniform(0.1, 3, K), jnp.bfloat16)
    w = rng.standard_normal((N, K)) * np.repeat(10 ** rng.uniform(-1.5, 0, (N, K // G)), G, axis=1) * 0.02
    t = quantize_int4_two_level(jnp.asarray(w, jnp.float32), G)
    down = jnp.asarray(rng.standard_normal((K, R)) * 0.02, jnp.bfloat16)
    up = jnp.asarray(rng.standard_normal((R, N)) * 0.02, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(N) * 0.1, jnp.float32)
    smooth = jnp.asarray(rng.uniform(0.5, 2, K), jnp.float32)
    return x, t, down, up, bias, smooth


def test_w4a8_two_level_weights_on_the_pallas_kernels():
    x, t, down, up, bias, smooth = _operands()
    kw = dict(smooth=smooth, down=down, up=up, bias=bias, clip=0.9, a_qmax=127)
    y = {b: dispatch.w4a4_linear(x, t.carried(), t.unit[:, 0], backend=b, **kw) for b in ("pallas", "reference")}
    assert np.isfinite(np.asarray(y["pallas"], np.float32)).all()
    assert rel_l2(y["pallas"], y["reference"]) < 2e-3  # bf16 outputs, a few act codes off by one in the fused kernel


def test_w4a4_two_level_weights_and_activations_on_the_pallas_gemm():
    x, t, down, up, bias, smooth = _operands(1)
    q, s, x_lr = dispatch.act_quant_two_level(x, smooth, down, 0.9, group_size=G, levels=18)
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) > 7
    y = {
        b: dispatch.w4a4_matmul(q, s, t.carried(), t.unit[:, 0], x_lr, up, bias, backend=b, a_qmax=127)
        for b in ("pallas", "reference")
    }
    assert rel_l2(y["pallas"], y["reference"]) < 1e-3  # exact int32 sums; the f32 epilogue's order and bf16 output
    jax.block_until_ready(y["pallas"])
