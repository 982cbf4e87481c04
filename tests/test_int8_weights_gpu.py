"""INT8 per-channel weights (the self-attention layers of ``w4a8_mixed``) on a Hopper GPU (skipped elsewhere): the
"pallas" backend (Mosaic GPU int8 GEMM, fused act quant) on int8 [N, K] codes up to 127 agrees with the reference at
a Wan2.2 linear's shape, with INT8 and with INT4 activations. On CPU, tests/test_qlinear_w4a8_real.py checks real mode
against fake mode through the references."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_l2

from wanjax.kernels import dispatch
from wanjax.numerics import formats

pytestmark = pytest.mark.skipif(not dispatch.on_hopper(), reason="needs a Hopper GPU (H100 / H200)")

M, K, N, R = 2048, 5120, 5120, 32


@pytest.mark.parametrize("a_qmax", [127, 7])
def test_int8_weights_on_the_pallas_kernels(a_qmax):
    rng = np.random.default_rng(a_qmax)
    x = jnp.asarray(rng.standard_normal((M, K)) * rng.uniform(0.1, 3, K), jnp.bfloat16)
    qt = formats.quantize_int8(jnp.asarray(rng.standard_normal((N, K)) * 0.02, jnp.float32))
    codes, scale = qt.codes, qt.scales.reshape(N)
    assert codes.dtype == jnp.int8 and int(jnp.max(jnp.abs(codes.astype(jnp.int32)))) > 7  # really 8-bit codes
    kw = dict(
        smooth=jnp.asarray(rng.uniform(0.5, 2, K), jnp.float32),
        down=jnp.asarray(rng.standard_normal((K, R)) * 0.02, jnp.bfloat16),
        up=jnp.asarray(rng.standard_normal((R, N)) * 0.02, jnp.bfloat16),
        bias=jnp.asarray(rng.standard_normal(N) * 0.1, jnp.float32),
        clip=0.9,
        a_qmax=a_qmax,
        w_qmax=127,
    )
    y = {b: dispatch.w4a4_linear(x, codes, scale, backend=b, **kw) for b in ("pallas", "reference")}
    assert np.isfinite(np.asarray(y["pallas"], np.float32)).all()
    assert rel_l2(y["pallas"], y["reference"]) < 2e-3  # bf16 outputs, a few act codes off by one in the fused kernel
