"""`wanjax.train.lora` on TINY: the training-time LoRA branch is the model the written file gives once applied, the
caption transform of the reverse-motion task, the centred held-out clips, one training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wanjax.lora as L
from wanjax.config import TINY
from wanjax.model.dit import WanDiT
from wanjax.model.layers import linear_interceptor
from wanjax.model.names import BLOCK_LINEAR_NAMES
from wanjax.train import dit as D
from wanjax.train.lora import LoraTrainer, centred_heldout, init_lora, lora_branch, lora_state_dict, reverse_caption


def test_reverse_caption():
    assert reverse_caption("a red square moves left") == "a red square moves right"
    assert (
        reverse_caption("a blue ring moves up as the camera pans up") == "a blue ring moves down as the camera pans up"
    )
    with pytest.raises(ValueError, match="no 'moves left/right/up/down'"):
        reverse_caption("a blue ring rotates")


def test_branch_equals_the_written_file_applied():
    model = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    lora = init_lora(TINY, BLOCK_LINEAR_NAMES, 4, seed=1)
    assert all(float(jnp.abs(p["up"]).max()) == 0.0 for p in lora.values())  # starts at the base model
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), lora)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 2, 4, 4, TINY.in_dim)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 5, TINY.text_dim)), jnp.float32)
    t = jnp.array([500.0])
    unrolled = nnx.merge(*nnx.split(model))
    unrolled.scan_layers = False
    with linear_interceptor(lora_branch(lora, 2.0 / 4)):
        trained = unrolled(x, t, ctx)
    sd = lora_state_dict(lora, alpha=2.0)
    assert float(sd["diffusion_model.blocks.1.ffn.0.alpha"]) == 2.0
    assert sd["diffusion_model.blocks.1.ffn.0.lora_up.weight"].shape == (TINY.ffn_dim, 4)
    lw = L.parse_lora(sd, TINY)
    assert lw.format == "official (diffusion_model.; lora_down/lora_up, alpha)" and len(lw.modules) == 10 * 2
    applied = L.lora_model(model, [(lw, 1.0)])(x, t, ctx)
    base = model(x, t, ctx)
    assert float(jnp.linalg.norm(trained - applied) / jnp.linalg.norm(trained - base)) < 1e-4


def test_one_training_step_moves_only_the_lora():
    model = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    lora = init_lora(TINY, ["cross_attn.k", "cross_attn.v"], 2, seed=0)
    tr = LoraTrainer(model, lora, alpha=2.0, u_range=D.expert_u_range("high"))
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((2, 2, 4, 4, 16)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 2, 4, 4, 20)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, TINY.text_dim)), jnp.float32)
    before = jax.tree.map(np.asarray, nnx.state(model))
    loss = tr.step(x0, y, ctx, ctx[:1], jax.random.key(0), 1e-2)
    assert np.isfinite(float(loss)) and set(tr.lora) == {"cross_attn.k", "cross_attn.v"}
    assert float(jnp.abs(tr.lora["cross_attn.k"]["up"]).max()) > 0  # the LoRA moved
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))  # the base did not


def test_centred_heldout_clips_start_in_the_middle():
    videos, caps, colours, dirs = centred_heldout(4, 1000, frames=5, size=64)
    assert videos.shape == (4, 5, 64, 64, 3) and videos.dtype == np.uint8
    assert all(c.split(" moves ")[1].split()[0] == d for c, d in zip(caps, dirs))
    from wanjax.track import object_mask

    for v, c in zip(videos, colours):
        ys, xs = np.nonzero(object_mask(v[:1], c)[0])
        assert abs(xs.mean() - 32) < 4 and abs(ys.mean() - 32) < 4
