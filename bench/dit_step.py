"""One denoising forward of an expert: the benchmark resolutions, inputs, the jitted forward and its timing."""

from __future__ import annotations

import time

import numpy as np

from bench.common import memory
from bench.random_weights import random_array
from bench.timing import time_fn

#: latent (F, H, W) and pixel (frames, height, width) per resolution name
RES = {
    "480p": ((21, 60, 104), (81, 480, 832)),
    "720p": ((21, 90, 160), (81, 720, 1280)),
    "tiny": ((3, 8, 12), (9, 64, 96)),
}


def get_config(name: str):
    from wanjax.config import I2V_A14B, TINY

    return {"I2V_A14B": I2V_A14B, "TINY": TINY}[name]


def make_forward(graphdef):
    """The one jitted forward of both variants: ``(state, x, t, context, bin) -> velocity``."""
    import jax
    from flax import nnx

    from wanjax.quant.qlinear import active_bin

    def fwd(state, x, t, ctx, b):
        with active_bin(b):
            return nnx.merge(graphdef, state)(x, t, ctx)

    return jax.jit(fwd)


def dit_inputs(cfg, latent_fhw, seed: int = 1):
    """Random ``x [1, F, H, W, in_dim]`` f32, ``t [1]``, ``context [1, text_len, text_dim]`` bf16, bin 0."""
    import jax.numpy as jnp

    f, h, w = latent_fhw
    x = random_array(seed, (1, f, h, w, cfg.in_dim), jnp.float32)
    ctx = random_array(seed + 1, (1, cfg.text_len, cfg.text_dim), jnp.bfloat16)
    return x, jnp.array([900.0], jnp.float32), ctx, jnp.int32(0)


def memory_analysis(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
        return {
            k: int(getattr(m, k))
            for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
            if hasattr(m, k)
        }
    except Exception:  # not every backend reports it
        return None


def time_forward(fwd, state, inputs, iters: int) -> tuple[dict, np.ndarray, object]:
    """Compile (timed) and run ``fwd`` ``1 + iters`` times; returns (record, output as numpy, compiled)."""
    import jax

    t0 = time.perf_counter()
    compiled = fwd.lower(state, *inputs).compile()
    rec = {"compile_s": time.perf_counter() - t0, "memory_analysis": memory_analysis(compiled)}
    rec.update(time_fn(compiled, state, *inputs, warmup=1, iters=iters))
    out = np.asarray(jax.device_get(compiled(state, *inputs)))
    rec["finite"] = bool(np.isfinite(out).all())
    rec.update(memory())
    return rec, out, compiled
