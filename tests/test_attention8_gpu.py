"""kernels/attention8_gpu.py (Mosaic GPU draft) on CPU: the Mosaic GPU interpreter vs the jnp reference.

The kernel has NEVER run on a GPU: the interpreter checks the data flow (TMA ring, barriers, masking, two-level
accumulation, epilogue) but not wgmma layouts, register limits or speed. On an H100, `python -m bench.attention8`
checks the compiled kernel against the reference first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.kernels import attention8_gpu as G
from wanjax.kernels import attention8_reference as R


@pytest.mark.parametrize(
    "s, pingpong, tile_scale, lean",
    [
        (200, True, True, True),
        (300, True, True, True),
        (300, False, False, False),
        (256, True, False, False),
        (300, True, True, False),
    ],
)
def test_interpret_matches_reference(s, pingpong, tile_scale, lean):
    """S=300 pads to 3 KV tiles of 128 with a 2-slot ring (slot reuse) and a 44-key masked tail (the last tile only);
    S=256 has no padded key (no masked tile). Both schedules (pingpong or not), both K-scale layouts, with and without
    the lean softmax."""
    cfg = G.GPUConfig(block_q=64, block_kv=128, stages=2, pingpong=pingpong, tile_scale=tile_scale, lean=lean)
    key = jax.random.key(s)
    q, k, v = (
        jax.random.normal(jax.random.fold_in(key, i), (1, s, 1, 128), jnp.float32).astype(jnp.bfloat16)
        for i in range(3)
    )
    pc = G.gpu_config_for(cfg)
    x = R.quantize_qkv(q, k, v, pc)
    want = np.asarray(R.attention8_core(x, pc), np.float32)
    got = np.asarray(G.attention8_gpu_core(x, cfg, interpret=True), np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_not_verified_and_shape_errors():
    assert G.VERIFIED is False  # flip only after the H100 run (see the module docstring)
    x = R.quantize_qkv(*(jnp.zeros((1, 64, 1, 96), jnp.bfloat16),) * 3, R.Attn8Config(q_block=64, kv_block=128))
    with pytest.raises(ValueError, match="multiple"):
        G.attention8_gpu_core(x)


def test_magic_int_to_float_exact_over_the_int8_dot_range():
    """lean=True converts int32 scores by bitcast(i + MAGIC_I32) - MAGIC_F32: exact for every |i| < 2**22, which covers
    any int8 dot product of length <= 256 (127 * 127 * 256 = 4,129,024)."""
    edge = np.array([0, 1, -1, 127 * 127 * 128, -(127 * 127 * 256), 2**22 - 1, -(2**22) + 1], np.int32)
    rand = np.random.default_rng(0).integers(-(2**22) + 1, 2**22, 100_000, dtype=np.int32)
    i = jnp.asarray(np.concatenate([edge, rand]))
    got = jax.lax.bitcast_convert_type(i + jnp.int32(G.MAGIC_I32), jnp.float32) - jnp.float32(G.MAGIC_F32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(i).astype(np.float32))
    # one past the range it is wrong, so the bound in the docstring is the real one
    j = jnp.int32(2**22 + 1)
    bad = jax.lax.bitcast_convert_type(j + jnp.int32(G.MAGIC_I32), jnp.float32) - jnp.float32(G.MAGIC_F32)
    assert float(bad) != float(2**22 + 1)
