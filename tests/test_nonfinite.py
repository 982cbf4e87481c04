"""NaN/Inf never give a silent black video: refused settings, weights checked at load, the latent checked per step
with the expert, step and first layer named."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.io.errors import CheckpointError
from wanjax.model.dit import WanDiT
from wanjax.nonfinite import NonFiniteError, nonfinite_param_names
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.sampling import flow_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "models", "mini")
GEN = GenerationConfig(num_frames=5, max_area=64 * 64, steps=3, shift=5.0, guide_scale=(3.5, 3.5))


@pytest.fixture(scope="module")
def mini():
    if not os.path.isdir(os.path.join(MINI, "high_noise_model")):
        pytest.skip("models/mini is not shipped in this checkout")
    pipe = WanI2VPipeline.from_pretrained(MINI, dtype=jnp.float32)
    y = jnp.concatenate([jnp.ones((1, 2, 8, 8, 4)), 0.1 * jax.random.normal(jax.random.key(1), (1, 2, 8, 8, 16))], -1)
    ctx = 0.1 * jax.random.normal(jax.random.key(2), (2, 7, pipe.cfg.text_dim))
    return pipe, y, ctx


def _poison(params, path, index):
    leaf = params
    for k in path:
        leaf = leaf[k]
    old = leaf[...]
    leaf[...] = old.at[index].set(jnp.nan)
    return lambda: leaf.__setitem__(..., old)


def test_nan_weight_in_the_low_noise_expert_names_expert_step_and_layer(mini):
    pipe, y, ctx = mini
    lat, _ = pipe.denoise(y, ctx, GEN, progress=False)  # finite as shipped
    assert bool(jnp.all(jnp.isfinite(lat)))
    # bypass the load check: poison one weight of block 1's FFN in the loaded low-noise expert
    restore = _poison(pipe._params_low, ("blocks", "ffn", "fc1", "kernel"), (1, 0, 0))
    try:
        with pytest.raises(NonFiniteError) as e:
            pipe.denoise(y, ctx, GEN, progress=False)
    finally:
        restore()
    ts = [int(t) for t in flow_schedule(GEN.steps, shift=GEN.shift).timesteps]
    first_low = next(i for i, t in enumerate(ts) if t < 900)
    err = e.value
    assert (err.expert, err.step, err.t, err.layer) == ("low", first_low, ts[first_low], "blocks.1.ffn.fc1")
    msg = str(err)
    assert f"step {first_low + 1} of {GEN.steps}" in msg and f"t={ts[first_low]}" in msg and "'low'" in msg
    assert "blocks.1.ffn.fc1" in msg and "blocks.1.ffn.fc1.kernel" in msg  # layer and parameter


def test_nan_guidance_is_refused_up_front_and_caught_in_the_loop(mini):
    pipe, y, ctx = mini
    calls = []
    pipe_calls = pipe.prepare_condition
    pipe.prepare_condition = lambda *a, **k: calls.append(1) or pipe_calls(*a, **k)
    try:
        for kw in (dict(guidance_low=float("nan")), dict(guidance_scale=float("inf")), dict(shift=float("nan"))):
            with pytest.raises(ValueError, match="expected a finite number"):
                pipe.generate(np.zeros((64, 64, 3), np.uint8), "p", progress=False, **kw)
        for kw in (dict(context=ctx * jnp.nan), dict(context=ctx, noise=jnp.full((1, 2, 8, 8, 16), jnp.inf))):
            with pytest.raises(ValueError, match="contains NaN or Inf"):
                pipe.generate(np.zeros((64, 64, 3), np.uint8), progress=False, **kw)
    finally:
        del pipe.prepare_condition
    assert calls == []  # refused before any work
    # a NaN scale that skipped validate() (denoise called directly) still stops at the first low-noise step
    bad = dataclasses.replace(GEN, guide_scale=(float("nan"), 3.5))
    with pytest.raises(NonFiniteError) as e:
        pipe.denoise(y, ctx, bad, progress=False)
    assert e.value.expert == "low" and e.value.layer == "guidance" and "guidance scale nan" in str(e.value)


@pytest.fixture(scope="module")
def tiny():
    return WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_weights_checked_at_load_and_on_replace(monkeypatch, tmp_path, tiny):
    good = tiny
    g, state = nnx.split(good)
    state = jax.tree.map(lambda a: a, state)  # a copy to poison
    _poison(state, ("blocks", "self_attn", "q", "kernel"), (1, 3, 3))
    bad = nnx.merge(g, state)
    assert nonfinite_param_names(nnx.state(bad)) == ["blocks.1.self_attn.q.kernel"]
    assert nonfinite_param_names(nnx.state(good)) == []
    pipe = WanI2VPipeline(good, good, vae=None)
    with pytest.raises(CheckpointError, match=r"low-noise expert.*blocks\.1\.self_attn\.q\.kernel"):
        pipe.replace_experts(good, bad)
    # from_pretrained: every component is checked (the loaders stubbed so the NaN expert loads)
    for d in ("high_noise_model", "low_noise_model", "google/umt5-xxl"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        (tmp_path / f).write_bytes(b"")
    monkeypatch.setattr(
        "wanjax.io.dit_loader.load_dit", lambda p, dtype=None: bad if p.endswith("low_noise_model") else good
    )
    monkeypatch.setattr("wanjax.io.vae_loader.load_vae", lambda *a, **k: pytest.fail("loaded past the NaN"))
    with pytest.raises(CheckpointError) as e:
        WanI2VPipeline.from_pretrained(tmp_path)
    assert "low_noise_model" in str(e.value) and "blocks.1.self_attn.q.kernel" in str(e.value)


def test_nan_from_the_vae_or_text_encoder_is_reported(monkeypatch, tiny):
    """The stage methods check their own output, so callers of the stages (the CLI) are covered too."""
    pipe = WanI2VPipeline(tiny, tiny, vae=None)
    ctx = jnp.zeros((2, 3, TINY.text_dim))
    gen = dataclasses.replace(GEN, max_area=16 * 16, steps=1)
    img = np.zeros((16, 16, 3), np.uint8)
    lat = jnp.zeros((1, 2, 2, 2, 16))
    monkeypatch.setattr("wanjax.model.vae.encode_image_video", lambda vae, image, num_frames: lat)
    monkeypatch.setattr("wanjax.model.vae.decode_video", lambda vae, z: jnp.full((1, 5, 16, 16, 3), jnp.nan))
    with pytest.raises(NonFiniteError, match="VAE decoder produced NaN/Inf from finite latents") as e:
        pipe.generate(img, context=ctx, gen=gen, progress=False)
    assert e.value.stage == "vae_decode"
    monkeypatch.setattr("wanjax.model.vae.encode_image_video", lambda vae, image, num_frames: lat * jnp.nan)
    with pytest.raises(NonFiniteError, match="VAE encoder") as e:
        pipe.prepare_condition(img, 5, 16 * 16)
    assert e.value.stage == "vae_encode"
    pipe.text_encoder = pipe.tokenizer = object()
    monkeypatch.setattr("wanjax.text.encode_prompts", lambda *a, **k: (jnp.full((2, 3, TINY.text_dim), jnp.inf), 0))
    with pytest.raises(NonFiniteError, match="text encoder") as e:
        pipe.generate(img, "a prompt", gen=gen, progress=False)
    assert e.value.stage == "text"
