"""The I2V condition's VAE encode without recomputing repeated chunks (`encode_image_video`): bitwise the latents of
`encode_video` of [image, black frames], and the loop really stops early."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax import conditioning
from wanjax.model import vae as V


@pytest.fixture(scope="module")
def small_vae():
    cfg = V.VAEConfig(
        base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_downsample=(False, True, True)
    )
    return V.init_vae(cfg, seed=3)


@pytest.mark.parametrize("frames", [1, 5, 41])
def test_same_latents_as_the_full_video(small_vae, frames):
    img = np.random.default_rng(frames).uniform(-1, 1, (32, 48, 3)).astype(np.float32)
    full = V.encode_video(small_vae, jnp.asarray(conditioning.i2v_video(img, frames))[None])
    fast = V.encode_image_video(small_vae, jnp.asarray(img)[None], frames)
    assert fast.shape == full.shape
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(full))


def test_the_loop_stops_once_the_cache_repeats():
    """A causal toy with a one-chunk memory: after the first frame and one black chunk its cache repeats, so of 10
    black chunks only 2 are computed (counted through a host callback, which runs once per executed call)."""
    calls = []

    def fn(x, cache, first):
        jax.debug.callback(lambda: calls.append(1))
        prev = jnp.zeros_like(x[:, :1]) if cache is None else cache
        y = x.sum(axis=1, keepdims=True) + 2.0 * prev
        return y, x[:, -1:]

    n = 10
    chunk = jnp.zeros((1, 4, 2, 3), jnp.float32)
    out = jax.jit(lambda x0: V._run_chunks_repeated(fn, x0, chunk, n))(jnp.ones((1, 1, 2, 3), jnp.float32))
    jax.effects_barrier()
    ref = V._run_chunks(fn, jnp.ones((1, 1, 2, 3), jnp.float32), jnp.broadcast_to(chunk, (n,) + chunk.shape))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert len(calls) == 3 + (1 + n)  # repeated: the first frame + 2 chunks; the reference: the first frame + n
    # it is the repeat of the last computed chunk that fills the rest
    assert np.asarray(out)[0, 2:].max() == 0 and np.asarray(out)[0, 1].max() == 2.0


def test_frame_count_checked(small_vae):
    with pytest.raises(ValueError, match="4n\\+1"):
        V.encode_image_video(small_vae, jnp.zeros((1, 32, 48, 3)), 6)
