"""Flow-matching training of the mini Wan2.2 DiT experts (optax), as Wan trains them.

* noisy latent ``x_t = (1 - sigma) x0 + sigma * noise``, target velocity ``noise - x0`` (the direction the sampler
  integrates), model timestep ``t = 1000 sigma``;
* ``sigma`` drawn with the flow shift: ``u ~ U[u_lo, u_hi)``, ``sigma = shift u / (1 + (shift - 1) u)``. The base
  model uses all of ``[0, 1)``; the high-noise expert only ``t >= 900`` and the low-noise expert ``t < 900``
  (`expert_u_range`);
* image-to-video conditioning ``y`` = 4 mask + 16 VAE-latent channels of ``[first frame, black frames]``, built by
  `wanjax.conditioning` exactly as the pipeline builds it (`condition_latents`);
* text: contexts from `wanjax.text.encode_prompts` (as the pipeline); with probability ``drop_text`` the caption is
  replaced by the negative prompt's context (what the pipeline's classifier-free guidance uses as unconditional).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from wanjax import conditioning
from wanjax.config import WanConfig
from wanjax.model.dit import WanDiT
from wanjax.model.vae import encode_video

#: The shipped mini expert: dim 256 = 2 heads x 128 (RoPE split 44/42/42 as the real model), 6 layers.
MINI_DIT = WanConfig(
    dim=256, ffn_dim=768, num_heads=2, num_layers=6, in_dim=36, out_dim=16, text_dim=256, text_len=32, freq_dim=256
)


def shift_sigma(u, shift: float):
    """``shift u / (1 + (shift - 1) u)``."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def expert_u_range(expert: str, shift: float = 5.0, boundary: float = 0.9) -> tuple[float, float]:
    """The range of ``u`` whose shifted sigma lies in the expert's band (``"base"``, ``"high"``, ``"low"``)."""
    u_b = boundary / (shift - (shift - 1.0) * boundary)  # inverse of shift_sigma at the boundary
    return {"base": (0.0, 1.0), "high": (u_b, 1.0), "low": (0.0, u_b)}[expert]


def condition_latents(vae, first_frames: jax.Array, num_frames: int) -> jax.Array:
    """y [B, F_lat, h, w, 20] for first frames [B, H, W, 3] in [-1, 1] (mask + latent of [image, black frames])."""
    b, h, w, _ = first_frames.shape
    video = jnp.zeros((b, num_frames, h, w, 3), jnp.float32).at[:, 0].set(first_frames)
    lat = encode_video(vae, video)
    mask = conditioning.i2v_mask(num_frames, lat.shape[2], lat.shape[3])
    return conditioning.concat_condition(jnp.asarray(mask), lat)


def fm_loss(model: WanDiT, x0, y, ctx, key, u_lo: float, u_hi: float, shift: float) -> jax.Array:
    """Flow-matching MSE of the velocity on a batch (x0 [B, F, h, w, 16], y [..., 20], ctx [B, L, D])."""
    b = x0.shape[0]
    k1, k2 = jax.random.split(key)
    u = jax.random.uniform(k1, (b,), jnp.float32, u_lo, u_hi)
    sigma = shift_sigma(u, shift)
    noise = jax.random.normal(k2, x0.shape, jnp.float32)
    s = sigma[:, None, None, None, None]
    xt = (1.0 - s) * x0 + s * noise
    v = model(jnp.concatenate([xt, y.astype(jnp.float32)], -1), sigma * 1000.0, ctx)
    return jnp.mean(jnp.square(v - (noise - x0)))


def lr_at(step: int, lr: float, progress: float, warmup: int = 200) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``lr / 10`` as ``progress`` goes 0 -> 1
    (host-side; passed to the step as a traced scalar). ``progress`` is the larger of the step fraction and the
    time-budget fraction, so a run cut by its time budget still ends at the low learning rate."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + np.cos(np.pi * p)))


def make_tx(weight_decay: float = 0.01) -> optax.GradientTransformation:
    """AdamW without its learning rate (the step scales the update by a traced ``lr``, so one compiled step
    serves every stage and schedule)."""
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.scale_by_adam(b2=0.99), optax.add_decayed_weights(weight_decay)
    )


class Trainer:
    """Functional flow-matching trainer of a `WanDiT`: ``params``/``opt_state`` pytrees and one jitted step
    ``(params, opt_state, x0, y, ctx, neg_ctx, key, lr, u_lo, u_hi) -> (params, opt_state, loss)``.

    ``neg_ctx`` [1, L, D] replaces a sample's context with probability ``drop_text``.
    """

    def __init__(self, model: WanDiT, shift: float = 5.0, drop_text: float = 0.1, weight_decay: float = 0.01):
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.tx = make_tx(weight_decay)
        self.opt_state = self.tx.init(self.params)
        graphdef, rest, tx = self.graphdef, self.rest, self.tx

        def loss_fn(params, x0, y, ctx, key, u_lo, u_hi):
            return fm_loss(nnx.merge(graphdef, params, rest), x0, y, ctx, key, u_lo, u_hi, shift)

        def step(params, opt_state, x0, y, ctx, neg_ctx, key, lr, u_lo, u_hi):
            kd, kl = jax.random.split(key)
            drop = jax.random.uniform(kd, (x0.shape[0], 1, 1)) < drop_text
            c = jnp.where(drop, neg_ctx.astype(ctx.dtype), ctx)
            loss, grads = jax.value_and_grad(loss_fn)(params, x0, y, c, kl, u_lo, u_hi)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
            return params, opt_state, loss

        self._step = jax.jit(step, donate_argnums=(0, 1))
        self.eval_loss = jax.jit(loss_fn)

    def reset_optimizer(self):
        self.opt_state = self.tx.init(self.params)

    def step(self, x0, y, ctx, neg_ctx, key, lr: float, u_range) -> jax.Array:
        self.params, self.opt_state, loss = self._step(
            self.params,
            self.opt_state,
            x0,
            y,
            ctx,
            neg_ctx,
            key,
            jnp.float32(lr),
            jnp.float32(u_range[0]),
            jnp.float32(u_range[1]),
        )
        return loss

    def model(self) -> WanDiT:
        """The current model (a fresh module over copies of the parameters)."""
        return nnx.merge(self.graphdef, jax.tree.map(lambda a: jnp.array(a, copy=True), self.params), self.rest)


def new_dit(cfg: WanConfig = MINI_DIT, seed: int = 0, dtype=jnp.bfloat16) -> WanDiT:
    """fp32 parameters, ``dtype`` compute. The modulation tables start at zero-mean small values and the head at
    zero, so training starts from the identity-ish residual network with zero velocity."""
    m = WanDiT(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    m.head.head.kernel[...] = jnp.zeros_like(m.head.head.kernel[...])
    return m


def batches(n: int, batch: int, seed: int):
    """Endless random index batches over ``n`` items (numpy, reproducible)."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.integers(0, n, batch)
