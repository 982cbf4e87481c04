"""kernels/attention8_tpu.py on CPU: the Pallas TPU interpreter vs the jnp reference, and lowering for "tpu".

No TPU was available: these check semantics (interpreter, NaN-poisoned scratch) and that Mosaic TPU lowering
accepts the kernel; MXU speed and VMEM limits are unverified.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from wanjax.kernels import attention8_reference as R
from wanjax.kernels.attention8_tpu import attention8_tpu, attention8_tpu_core

INTERP = pltpu.InterpretParams(uninitialized_memory="nan")
SMALL = R.Attn8Config(q_block=64, k_block=64, kv_block=64)


def _qkv(shape, seed=0):
    key = jax.random.key(seed)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) for i in range(3))
    return (q * 3).astype(jnp.bfloat16), (k + 2.0).astype(jnp.bfloat16), v.astype(jnp.bfloat16)


@pytest.mark.parametrize("pv", ["bf16", "fp8"])
@pytest.mark.parametrize("s", [100, 128])
def test_interpret_matches_reference(pv, s):
    """Same pre-pass operands: the kernel reproduces the reference core (f32 output; only the order of the f32 row
    sums may differ)."""
    q, k, v = _qkv((1, s, 2, 32), seed=s)
    x = R.quantize_qkv(q, k, v, SMALL)
    want = np.asarray(R.attention8_core(x, SMALL, jnp.float32))
    got = np.asarray(attention8_tpu_core(x, SMALL, pv=pv, out_dtype=jnp.float32, interpret=INTERP))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_end_to_end_bf16_and_errors():
    q, k, v = _qkv((2, 70, 1, 32), seed=1)
    got = attention8_tpu(q, k, v, config=SMALL, interpret=INTERP)
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 70, 1, 32)
    want = R.attention8_reference(q, k, v, SMALL)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="pv must be"):
        attention8_tpu(q, k, v, config=SMALL, pv="int8", interpret=INTERP)
    with pytest.raises(ValueError, match="multiples"):
        attention8_tpu_core(R.quantize_qkv(q, k, v, SMALL), R.Attn8Config(q_block=64, kv_block=256))


@pytest.mark.parametrize("pv", ["bf16", "fp8"])
def test_lowers_for_tpu(pv):
    x = jax.ShapeDtypeStruct((1, 32760, 40, 128), jnp.bfloat16)
    f = lambda q, k, v: attention8_tpu(q, k, v, pv=pv)
    text = jax.jit(f).trace(x, x, x).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
