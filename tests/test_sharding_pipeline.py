"""Whole I2V generation on a mesh of 8 host CPU devices vs single device (tiny random components, fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.model.dit import WanDiT
from wanjax.model.vae import VAEConfig, init_vae
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.sharding import make_mesh

VAE_TINY = VAEConfig(
    base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_downsample=(False, True, True)
)
GEN = GenerationConfig(num_frames=5, max_area=32 * 48, steps=4, shift=5.0, guide_scale=(2.0, 4.0))


@pytest.fixture(scope="module")
def parts():
    high = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    low = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    vae = init_vae(VAE_TINY, seed=3)
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    ctx = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, TINY.text_dim)).astype(np.float32))
    ref = WanI2VPipeline(high, low, vae).generate(image, context=ctx, gen=GEN, progress=False)
    assert ref.experts.count("high") and ref.experts.count("low")
    return high, low, vae, image, ctx, ref


@pytest.mark.parametrize(
    "shape,mode", [((2, 2, 2, 1), "auto"), ((1, 2, 2, 2), "auto")], ids=["dp2-fsdp2-ulysses2", "fsdp2-ulysses2-tp2"]
)
def test_sharded_generation_matches_single_device(parts, shape, mode):
    high, low, vae, image, ctx, ref = parts
    mesh = make_mesh(*shape)
    pipe = WanI2VPipeline(high, low, vae, mesh=mesh, attention_mode=mode)
    kernel = pipe._params_high["blocks"]["ffn"]["fc1"]["kernel"][...]
    assert kernel.sharding.mesh.shape == mesh.shape and len(kernel.sharding.device_set) == 8
    assert kernel.addressable_shards[0].data.shape[1] == TINY.dim // (shape[1] * shape[2])  # FSDP-sharded
    out = pipe.generate(image, context=ctx, gen=GEN, progress=False)
    assert out.experts == ref.experts
    rel = np.max(np.abs(out.latents - ref.latents)) / np.max(np.abs(ref.latents))
    assert rel <= 1e-5, rel
    assert np.max(np.abs(out.frames.astype(int) - ref.frames.astype(int))) <= 1
