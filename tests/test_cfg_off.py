"""Guidance 1 (CFG off, the Lightning preset): the pipeline runs the conditional forward alone (batch 1), and the
result is the guided result at guidance 1 (``v_uncond + 1 * (v_cond - v_uncond) = v_cond``)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.config import TINY
from wanjax.model.dit import WanDiT
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.sampling.guidance import guided_velocity


def _tiny():
    return WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))


def test_guided_velocity_with_one_context_row_is_the_conditional_forward():
    model = _tiny()
    g, params = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 2, 4, 6, TINY.out_dim)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((1, 2, 4, 6, TINY.in_dim - TINY.out_dim)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, TINY.text_dim)), jnp.float32)
    t = jnp.float32(700.0)
    full = guided_velocity(g, params, x, y, ctx, t, jnp.float32(1.0))
    cond = guided_velocity(g, params, x, y, ctx[:1], t, jnp.float32(1.0))
    assert cond.shape == full.shape
    np.testing.assert_allclose(np.asarray(cond), np.asarray(full), rtol=1e-5, atol=1e-5)
    # the guidance scale does not enter the unguided step
    np.testing.assert_array_equal(
        np.asarray(cond), np.asarray(guided_velocity(g, params, x, y, ctx[:1], t, jnp.float32(3.0)))
    )
    direct = model(jnp.concatenate([x, y], -1), jnp.full((1,), t), ctx[:1])
    np.testing.assert_array_equal(np.asarray(cond), np.asarray(direct))


def test_pipeline_runs_batch_one_forwards_at_guidance_one():
    high, low = _tiny(), WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    pipe = WanI2VPipeline(high, low, vae=None)
    batches = []
    plain = pipe._velocity

    def spy(params, x, y, ctx, t, guide):
        batches.append(int(ctx.shape[0]))
        return plain(params, x, y, ctx, t, guide)

    pipe._velocity = spy
    rng = np.random.default_rng(1)
    y = jnp.asarray(rng.standard_normal((1, 2, 4, 6, TINY.in_dim - TINY.out_dim)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, TINY.text_dim)), jnp.float32)
    gen = GenerationConfig.lightning(GenerationConfig(num_frames=5, seed=2))
    lat, experts = pipe.denoise(y, ctx, gen, progress=False)
    assert batches == [1, 1, 1, 1] and experts == ["high", "high", "low", "low"]
    # the same run through the guided 2B batch (a custom velocity_fn keeps the [2, L, D] context) agrees
    full = jax.jit(lambda p, *a: guided_velocity(pipe.graphdef, p, *a))
    lat2, _ = pipe.denoise(y, ctx, gen, progress=False, velocity_fn=lambda e, *a: full(*a))
    np.testing.assert_allclose(np.asarray(lat), np.asarray(lat2), rtol=1e-4, atol=1e-4)
    # guidance other than 1 keeps both branches
    batches.clear()
    pipe.denoise(y, ctx, GenerationConfig(num_frames=5, steps=2, seed=2), progress=False)
    assert batches == [2, 2]
