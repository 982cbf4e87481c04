"""Classifier-free guidance: the guided velocity of one DiT expert, the ``velocity_fn`` every denoise loop calls.

`guided_velocity` is the one implementation: the pipeline (`wanjax.pipeline.WanI2VPipeline`) jits it per expert
pair, calibration (`wanjax.quant.calibrate`) samples its trajectories with it, `wanjax.quant.apply` wraps it with
the active timestep bin of quantized experts, and `wanjax.nonfinite.locate_nonfinite` re-runs its stages with the
same batching (`cfg_batch`) and combination (`cfg_combine`) to name a layer that produced a NaN/Inf.

The conditional and unconditional forwards run as ONE batch of 2B (cond rows first), so a single compiled forward
serves both; on a mesh ``constrain`` splits that batch over the "data" axis.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["cfg_batch", "cfg_combine", "cond_inputs", "guided_velocity"]


def cfg_batch(x, y, ctx, t):
    """The model inputs of one guided step, cond and uncond batched as 2B: ``(inputs [2B, F, H, W, C_x + C_y],
    timesteps [2B] f32, context [2B, L, D])``. ``x``: latent [B, ...]; ``y``: image condition (cast to x's dtype);
    ``ctx``: [2, L, D] = (cond, uncond); ``t``: scalar timestep."""
    inp = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
    b = x.shape[0]
    return (
        jnp.concatenate([inp, inp], 0),
        jnp.full((2 * b,), t, jnp.float32),
        jnp.repeat(ctx, b, axis=0) if b > 1 else ctx,
    )


def cond_inputs(x, y, ctx, t):
    """The model inputs of one unguided (conditional-only) step, batch B: ``(inputs [B, F, H, W, C_x + C_y],
    timesteps [B] f32, context [B, L, D])``; ``ctx``: [1, L, D] (the positive prompt alone)."""
    inp = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
    b = x.shape[0]
    return inp, jnp.full((b,), t, jnp.float32), jnp.repeat(ctx, b, axis=0) if b > 1 else ctx


def cfg_combine(v, guide):
    """``v_uncond + guide * (v_cond - v_uncond)`` of a 2B batch of velocities (cond rows first)."""
    b = v.shape[0] // 2
    v_cond, v_uncond = v[:b], v[b:]
    return v_uncond + guide * (v_cond - v_uncond)


def guided_velocity(graphdef, params, x, y, ctx, t, guide, constrain: Callable | None = None) -> jax.Array:
    """Classifier-free-guided velocity of one expert at ``(x, t)``.

    Args:
      graphdef, params: the expert as ``nnx.split(model)`` gives it (a `wanjax.model.dit.WanDiT`, or one whose
        block linears were replaced by quantized ones); ``params`` is an argument so that one compilation serves
        both experts.
      x: latent [B, F, H, W, C]; y: image condition [B, F, H, W, C_y]; ctx: text contexts [2, L, D] = (cond,
        uncond), or [1, L, D] = (cond,) for a step without guidance (guidance 1: the conditional forward alone,
        half the work; the pipeline passes it so whenever an expert's guidance scale is exactly 1, as in the
        Lightning preset); t: timestep (scalar, may be traced); guide: guidance scale (may be traced).
      constrain: mesh runs: applied to each batched model input (e.g. to split (cond, uncond) over "data").

    Returns the guided velocity [B, F, H, W, C_out]. The signature is the ``velocity_fn`` hook of
    `wanjax.sampling.sample` callers and of ``WanI2VPipeline.replace_experts``.
    """
    model = nnx.merge(graphdef, params)
    if ctx.shape[0] == 1:  # CFG off: the conditional forward alone, batch B (``guide`` is not used)
        args = cond_inputs(x, y, ctx, t)
        if constrain is not None:
            args = tuple(constrain(a) for a in args)
        return model(*args)
    args = cfg_batch(x, y, ctx, t)
    if constrain is not None:
        args = tuple(constrain(a) for a in args)
    return cfg_combine(model(*args), guide)
