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
    "s, pingpong, tile_scale", [(200, True, True), (300, True, True), (300, False, False), (256, True, False)]
)
def test_interpret_matches_reference(s, pingpong, tile_scale):
    """S=300 pads to 3 KV tiles of 128 with a 2-slot ring (slot reuse) and a 44-key masked tail (the last tile only);
    S=256 has no padded key (no masked tile). Both schedules (pingpong or not) and both K-scale layouts."""
    cfg = G.GPUConfig(block_q=64, block_kv=128, stages=2, pingpong=pingpong, tile_scale=tile_scale)
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
