"""Training the mini Wan2.1 VAE on procedural clips.

The model is the real `wanjax.model.vae.WanVAE` (same chunked causal encode/decode the pipeline runs) with a small
base width. Loss: L1 + L2 reconstruction of a sampled latent ``z = mu + exp(logvar / 2) * eps`` plus a small KL
term. After training, `fold_latent_stats` rescales the latent so that the Wan2.1 normalisation constants stored in
`VAEConfig` (``latents_mean/std``, which the official ``.pth`` layout cannot change) map it to zero mean and unit
variance per channel: an exact per-channel affine change folded into ``quant_conv`` and ``post_quant_conv``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from wanjax.model.vae import ENCODE_CHUNK, VAEConfig, WanVAE, _run_chunks, init_vae

#: The shipped mini VAE: Wan2.1 topology (4 levels, 2 residual blocks, temporal down-sampling on the last two),
#: base width 16 instead of 96; z 16, stride (4, 8, 8).
MINI_VAE = VAEConfig(base_dim=16, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2)


def encode_moments(vae: WanVAE, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Raw latent mean and log-variance ``[B, F_lat, h, w, z]`` (fp32), through the same chunked encoder path as
    `WanVAE.encode_raw` (which returns the mean only)."""
    vae._check_video(video)
    b, f, h, w, c = video.shape
    x = video.astype(vae.dtype)
    n = (f - 1) // ENCODE_CHUNK
    rest = jnp.swapaxes(x[:, 1:].reshape(b, n, ENCODE_CHUNK, h, w, c), 0, 1) if n else None
    enc, _ = vae.quant_conv(_run_chunks(vae.encoder, x[:, :1], rest))
    z = vae.cfg.z_dim
    return enc[..., :z].astype(jnp.float32), jnp.clip(enc[..., z:].astype(jnp.float32), -30.0, 20.0)


def chroma(video: jax.Array) -> jax.Array:
    """The colour part of RGB pixels: each pixel minus the mean of its three channels (zero for grey)."""
    return video - jnp.mean(video, axis=-1, keepdims=True)


def patch_colour(video: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
    """Mean RGB of the pixels behind each latent element: ``[B, F_lat, h, w, 3]`` for ``video [B, F, H, W, 3]``.

    Latent frame 0 covers video frame 0, latent frame ``j >= 1`` the frames ``4j-3 .. 4j`` (the encoder's chunks);
    spatially each latent pixel covers one ``H/h x W/w`` patch."""
    b, f, hh, ww, c = video.shape
    _, fl, h, w = latent_shape[:4]
    sh, sw = hh // h, ww // w
    first = video[:, :1]
    groups = [first]
    if fl > 1:
        rest = video[:, 1:].reshape(b, fl - 1, ENCODE_CHUNK, hh, ww, c).mean(axis=2)
        groups.append(rest)
    frames = jnp.concatenate(groups, axis=1)  # [B, F_lat, H, W, 3]
    return frames.reshape(b, fl, h, sh, w, sw, c).mean(axis=(3, 5))


def vae_loss(
    vae: WanVAE,
    video: jax.Array,
    key: jax.Array,
    kl_weight: float = 1e-6,
    chroma_weight: float = 0.0,
    colour_weight: float = 0.0,
    colour_on: str = "sample",
) -> tuple[jax.Array, dict]:
    """L1 + L2 reconstruction + ``chroma_weight`` * L1 of the chroma (`chroma`) + ``kl_weight`` * KL (mean per
    latent element) + ``colour_weight`` * L1 between the first three raw latent channels (the sampled latent with
    ``colour_on="sample"``, its mean ``mu`` with ``"mean"``) and the mean colour of each latent element's patch
    (`patch_colour`); returns (loss, metrics). Metrics include the chroma part of that latent error
    (``latent_chroma_l1``) beside its value for a latent without colour (``grey_latent_chroma_l1``): equal values
    mean the latent carries no colour; ``colour_sigma`` is the mean sampling sigma of those three channels.

    The colour term keeps colour in the latent: without it the reduced VAE loses colour at the third (8x)
    down-sampling level (measurements: docs/MODEL_CARD.md). It pins three latent channels to the patch colour up to
    the later affine `fold_latent_stats`, which is exact.

    The mini VAE tends to settle on grey reconstructions (on the procedural clips grey costs only a small part of
    the L1 loss), and ``chroma_weight`` alone does not prevent it. The metric ``chroma_ratio`` (std of the
    reconstruction's chroma / std of the input's) shows it: ~0 for grey output, 1 for faithful colour."""
    mu, logvar = encode_moments(vae, video)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, jnp.float32)
    rec = vae.decode_raw(z)
    l1 = jnp.mean(jnp.abs(rec - video))
    l2 = jnp.mean(jnp.square(rec - video))
    lc = jnp.mean(jnp.abs(chroma(rec) - chroma(video)))
    kl = 0.5 * jnp.mean(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)
    pc = patch_colour(video, mu.shape)
    if colour_on not in ("sample", "mean"):
        raise ValueError(f"vae_loss: colour_on must be 'sample' or 'mean', got {colour_on!r}")
    lcol = jnp.mean(jnp.abs((z if colour_on == "sample" else mu)[..., :3] - pc))
    lcol_chroma = jnp.mean(jnp.abs(chroma(mu[..., :3]) - chroma(pc)))
    loss = l1 + l2 + chroma_weight * lc + kl_weight * kl + colour_weight * lcol
    ratio = jnp.std(chroma(rec)) / jnp.maximum(jnp.std(chroma(video)), 1e-6)
    return loss, {
        "loss": loss,
        "l1": l1,
        "l2": l2,
        "kl": kl,
        "chroma_l1": lc,
        "chroma_ratio": ratio,
        "latent_colour_l1": lcol,
        "latent_chroma_l1": lcol_chroma,
        "grey_latent_chroma_l1": jnp.mean(jnp.abs(chroma(pc))),
        "colour_sigma": jnp.mean(jnp.exp(0.5 * logvar[..., :3])),
    }


class Trainer:
    """Functional trainer: ``params``/``opt_state`` pytrees and one jitted step
    ``(params, opt_state, video, key, lr) -> (params, opt_state, metrics)`` (AdamW; ``lr`` traced)."""

    def __init__(
        self,
        vae: WanVAE,
        kl_weight: float = 1e-6,
        weight_decay: float = 1e-4,
        chroma_weight: float = 0.0,
        colour_weight: float = 0.0,
        colour_on: str = "sample",
    ):
        self.graphdef, self.params, self.rest = nnx.split(vae, nnx.Param, ...)
        self.tx = optax.chain(
            optax.clip_by_global_norm(1.0), optax.scale_by_adam(b2=0.99), optax.add_decayed_weights(weight_decay)
        )
        self.opt_state = self.tx.init(self.params)
        graphdef, rest, tx = self.graphdef, self.rest, self.tx
        branch = branch_mask(self.params)

        def step(params, opt_state, video, key, lr, gate):
            def loss_fn(p):
                return vae_loss(
                    nnx.merge(graphdef, p, rest), video, key, kl_weight, chroma_weight, colour_weight, colour_on
                )

            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            grads = jax.tree.map(lambda g, b: g * gate if b else g, grads, branch)
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u, b: u * gate if b else u, updates, branch)
            params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
            return params, opt_state, metrics

        self._step = jax.jit(step, donate_argnums=(0, 1))

    def step(self, video, key, lr: float, train_branches: bool = True) -> dict:
        """One AdamW step; ``train_branches=False`` holds the last layer of every residual / attention branch
        (`branch_mask`) fixed (its gradient and update are zeroed; with `zero_residual_init` the model is then the
        plain conv chain of the shortcuts). The flag is traced: switching it does not recompile."""
        self.params, self.opt_state, m = self._step(
            self.params, self.opt_state, video, key, jnp.float32(lr), jnp.float32(1.0 if train_branches else 0.0)
        )
        return m

    def model(self) -> WanVAE:
        return nnx.merge(self.graphdef, jax.tree.map(lambda a: jnp.array(a, copy=True), self.params), self.rest)


def new_vae(cfg: VAEConfig = MINI_VAE, seed: int = 0, dtype=jnp.float32, zero_residual: bool = False) -> WanVAE:
    """Random-init VAE with fp32 parameters and ``dtype`` compute; ``zero_residual`` applies `zero_residual_init`."""
    vae = init_vae(cfg, seed=seed, dtype=dtype, param_dtype=jnp.float32)
    return zero_residual_init(vae) if zero_residual else vae


_BRANCH_LAST = ("conv2/kernel", "conv2/bias", "proj_kernel", "proj_bias")


def branch_mask(params) -> Any:
    """Pytree of bools like ``params`` (an ``nnx.State`` of a VAE): True for the last layer of each residual branch
    (``ResidualBlock.conv2``) and attention branch (``AttentionBlock.proj``), the layers `zero_residual_init` zeroes."""

    def is_branch(path, _):
        return "/".join(str(k.key) for k in path if hasattr(k, "key")).endswith(_BRANCH_LAST)

    return jax.tree_util.tree_map_with_path(is_branch, params)


def zero_residual_init(vae: WanVAE) -> WanVAE:
    """Zero the last layer of every residual branch (``ResidualBlock.conv2`` and ``AttentionBlock.proj``) so that
    at initialisation every residual block is its shortcut and every attention block the identity (SkipInit-style;
    the architecture and the checkpoint layout are unchanged, the branches learn from zero). Modifies ``vae`` in
    place and returns it."""
    from wanjax.model.vae_layers import AttentionBlock, ResidualBlock

    n = 0
    for _, m in nnx.iter_graph(vae):
        if isinstance(m, ResidualBlock):
            m.conv2.kernel[...] = jnp.zeros_like(m.conv2.kernel[...])
            m.conv2.bias[...] = jnp.zeros_like(m.conv2.bias[...])
            n += 1
        elif isinstance(m, AttentionBlock):
            m.proj_kernel[...] = jnp.zeros_like(m.proj_kernel[...])
            m.proj_bias[...] = jnp.zeros_like(m.proj_bias[...])
            n += 1
    if n == 0:
        raise ValueError("zero_residual_init: the VAE has no residual or attention blocks")
    return vae


def fold_latent_stats(vae: WanVAE, mean: np.ndarray, std: np.ndarray) -> WanVAE:
    """Rescale the latent so that ``vae.encode`` (which normalises with the fixed ``cfg.latents_mean/std``) returns
    ``(mu_old - mean) / std`` and ``vae.decode`` inverts it; ``mean``/``std`` [z] are statistics of the old raw
    latent ``mu_old``. Modifies ``vae`` in place (``quant_conv`` rows of the mean, ``post_quant_conv`` input)."""
    z = vae.cfg.z_dim
    m = np.asarray(mean, np.float64)
    s = np.asarray(std, np.float64)
    if m.shape != (z,) or s.shape != (z,) or np.any(s <= 0):
        raise ValueError(f"fold_latent_stats: mean/std must be [{z}] with std > 0, got {m.shape}/{s.shape}")
    cm = np.asarray(vae.cfg.latents_mean, np.float64)
    cs = np.asarray(vae.cfg.latents_std, np.float64)
    a = cs / s  # mu_new = a * mu_old + (cm - a * m)
    qk = np.asarray(vae.quant_conv.kernel[...], np.float64).copy()  # [1, 1, 1, 2z, 2z] (in, out)
    qb = np.asarray(vae.quant_conv.bias[...], np.float64).copy()
    qk[..., :z] *= a
    qb[:z] = a * qb[:z] + cm - a * m
    pk = np.asarray(vae.post_quant_conv.kernel[...], np.float64).copy()  # [1, 1, 1, z, z]; input is mu_new
    pb = np.asarray(vae.post_quant_conv.bias[...], np.float64).copy()
    # mu_old = (mu_new - (cm - a m)) / a
    inv = 1.0 / a
    off = -(cm - a * m) * inv
    pb = pb + np.einsum("i,io->o", off, pk[0, 0, 0])
    pk = pk * inv[None, None, None, :, None]
    dt = vae.quant_conv.kernel[...].dtype
    vae.quant_conv.kernel[...] = jnp.asarray(qk, dt)
    vae.quant_conv.bias[...] = jnp.asarray(qb, dt)
    vae.post_quant_conv.kernel[...] = jnp.asarray(pk, dt)
    vae.post_quant_conv.bias[...] = jnp.asarray(pb, dt)
    return vae


def cast_params(model: Any, dtype) -> Any:
    """Round every parameter to ``dtype`` and back to its storage dtype (what shipping in ``dtype`` does)."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda a: a.astype(dtype).astype(a.dtype), state))
    return model
