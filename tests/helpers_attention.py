"""Shared by the attention tests (tests/test_attention8.py, tests/test_attention_fp8.py): rel-L2, the mini model's folder (`MINI`) and the q/k/v that
the mini model's self-attention layers see."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from helpers import MINI


def rel(a, b):
    """Relative L2 error of ``a`` against ``b`` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def mini_self_attention_qkv():
    """q/k/v (numpy, one triple a layer) of every self-attention layer of the mini model's high-noise expert
    (models/mini, its real weights) at t=900 on a 17-frame 128x128 latent: x = N(0,1) noise, y = the I2V mask + a
    zero image latent, an all-zero text context; captured with `attention_hook` (attention itself runs on XLA)."""
    from wanjax import conditioning
    from wanjax.io.dit_loader import load_dit
    from wanjax.model import attention as A

    dit = load_dit(os.path.join(MINI, "high_noise_model"), dtype=jnp.float32)
    cfg = dit.cfg
    f, h, w = 5, 16, 16
    mask = jnp.asarray(conditioning.i2v_mask(17, h, w))
    y = conditioning.concat_condition(mask, jnp.zeros((1, f, h, w, 16), jnp.float32)).astype(jnp.float32)
    x = jax.random.normal(jax.random.key(0), (1, f, h, w, 16), jnp.float32)
    ctx = jnp.zeros((1, cfg.text_len, cfg.text_dim), jnp.float32)
    captured = []

    def hook(q, k, v):
        if q.shape[1] == k.shape[1]:  # self-attention (cross-attention attends to the text tokens)
            jax.debug.callback(lambda *a: captured.append([np.asarray(t) for t in a]), q, k, v)
        return A.attention(q, k, v, backend="xla")

    with A.attention_hook(hook):
        out = dit(jnp.concatenate([x, y], -1), jnp.array([900.0]), ctx)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(captured) == cfg.num_layers, len(captured)
    return captured
