"""The I2V pipeline on tiny random components (CPU, fp32): expert switch, CFG, determinism, output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.model.dit import WanDiT
from wanjax.model.vae import VAEConfig, init_vae
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.sampling import flow_schedule, unipc_init, unipc_step

VAE_TINY = VAEConfig(
    base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_downsample=(False, True, True)
)


@pytest.fixture(scope="module")
def pipe():
    high = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    low = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    vae = init_vae(VAE_TINY, seed=3)
    return WanI2VPipeline(high, low, vae), high, low


def _image(h=40, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _ctx(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((2, 5, TINY.text_dim)).astype(np.float32))


GEN = GenerationConfig(num_frames=5, max_area=32 * 48, steps=6, shift=5.0, guide_scale=(2.0, 4.0))


def test_generate_shapes_experts_determinism(pipe):
    p, _, _ = pipe
    out = p.generate(_image(), context=_ctx(), gen=GEN, progress=False)
    assert out.frames.dtype == np.uint8 and out.frames.ndim == 4 and out.frames.shape[0] == 5
    assert out.frames.shape[1] % 16 == 0 and out.frames.shape[2] % 16 == 0
    sched = flow_schedule(6, shift=5.0)
    assert out.experts == ["high" if t >= 900 else "low" for t in sched.timesteps]
    assert "high" in out.experts and "low" in out.experts
    again = p.generate(_image(), context=_ctx(), gen=GEN, progress=False)
    np.testing.assert_array_equal(out.latents, again.latents)
    other = p.generate(_image(), context=_ctx(), gen=GEN, progress=False, seed=1)
    assert not np.allclose(out.latents, other.latents)


def test_denoise_matches_a_hand_written_loop(pipe):
    """Expert choice, per-expert guidance and the solver, checked against an unjitted reference loop."""
    p, high, low = pipe
    y, _ = p.prepare_condition(_image(), GEN.num_frames, GEN.max_area)
    ctx = _ctx(1)
    noise = jax.random.normal(jax.random.key(7), y.shape[:-1] + (16,))
    got, _ = p.denoise(y, ctx, GEN, noise=noise, progress=False)
    sched = flow_schedule(GEN.steps, shift=GEN.shift)
    x = noise
    state = unipc_init(sched.sigmas, x.shape)
    for i, t in enumerate(sched.timesteps):
        m, g = (high, 4.0) if t >= 900 else (low, 2.0)
        inp = jnp.concatenate([x, y], -1)
        vc = m(inp, jnp.array([float(t)]), ctx[:1])
        vu = m(inp, jnp.array([float(t)]), ctx[1:])
        x, state = unipc_step(state, i, vu + g * (vc - vu), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-4, atol=1e-5)


def test_condition_layout(pipe):
    p, _, _ = pipe
    y, (h, w) = p.prepare_condition(_image(), 9, 32 * 48)
    assert y.shape == (1, 3, h // 8, w // 8, 20)
    np.testing.assert_array_equal(np.asarray(y[0, 0, ..., :4]), 1.0)  # mask: latent frame 0 is the image
    np.testing.assert_array_equal(np.asarray(y[0, 1:, ..., :4]), 0.0)


def test_errors(pipe):
    p, _, _ = pipe
    with pytest.raises(ValueError, match="4n\\+1|frame"):
        p.generate(_image(), context=_ctx(), gen=GEN, num_frames=6, progress=False)
    with pytest.raises(RuntimeError, match="text encoder"):
        p.generate(_image(), "a prompt", gen=GEN, progress=False)
    with pytest.raises(FileNotFoundError, match="official layout"):
        WanI2VPipeline.from_pretrained("/nonexistent")
    frames = p(_image(), context=_ctx(), gen=GEN, progress=False)  # __call__ -> uint8 frames
    assert frames.dtype == np.uint8 and frames.shape[0] == GEN.num_frames
    bad = WanDiT(TINY.replace(num_layers=1), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="share config"):
        WanI2VPipeline(pipe[1], bad, p.vae)


def test_expert_swap_gives_the_same_video(pipe):
    p, high, low = pipe
    swap = WanI2VPipeline(high, low, p.vae, expert_placement="swap")
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(swap._params_low))  # low expert on the host
    a = p.generate(_image(), context=_ctx(), gen=GEN, progress=False)
    b = swap.generate(_image(), context=_ctx(), gen=GEN, progress=False)
    np.testing.assert_array_equal(a.latents, b.latents)
    assert swap.swaps == 1  # once, at the boundary
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(swap._params_high))
    assert p.expert_placement == "device"  # auto on CPU
    with pytest.raises(ValueError, match="expert_placement"):
        WanI2VPipeline(high, low, p.vae, expert_placement="gpu")


def test_incomplete_model_folder_lists_what_is_missing(tmp_path):
    (tmp_path / "high_noise_model").mkdir()
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        WanI2VPipeline.from_pretrained(tmp_path)
    msg = str(e.value)
    for part in ("low_noise_model", "models_t5_umt5-xxl-enc-bf16.pth", "umt5-xxl"):
        assert part in msg
    assert "Wan2.1_VAE.pth" not in msg.split("missing")[1]
