"""`make demo`: the main job end to end on the embedded default model.

Until the shipped mini model exists (issue [5 of 8]) this runs the TINY configuration through the public API:
two random experts are written in the official Wan2.2 checkpoint layout, loaded back with `wanjax.load_dit`, checked,
and a short image-to-video generation (tiny random VAE, random text features) runs through the real pipeline
(official FlowUniPC schedule, expert switch at t = 900, CFG) and is written as an mp4.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax
from wanjax.io.export import save_dit
from wanjax.model.vae import VAEConfig, WanVAE
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.video_io import save_mp4

DEMO_VAE = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo.mp4")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    print(f"wanjax {wanjax.__version__} | jax {jax.__version__} on {jax.devices()[0].platform}")
    cfg = wanjax.TINY
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed in (("high_noise_model", 1), ("low_noise_model", 2)):
            m = wanjax.WanDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
            save_dit(m, os.path.join(tmp, name), layout="official")
        t0 = time.perf_counter()
        high = wanjax.load_dit(os.path.join(tmp, "high_noise_model"), dtype=jnp.float32)
        low = wanjax.load_dit(os.path.join(tmp, "low_noise_model"), dtype=jnp.float32)
        print(f"loaded two experts from the official layout in {time.perf_counter() - t0:.2f}s "
              f"({sum(x.size for x in jax.tree.leaves(nnx.state(high, nnx.Param))):,} params each)")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 3, 8, 12, cfg.in_dim)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 7, cfg.text_dim)), jnp.float32)
    fwd = nnx.jit(lambda m, x, t, c: m(x, t, c))
    t0 = time.perf_counter()
    v = jax.block_until_ready(fwd(high, x, jnp.array([950.0]), ctx[:1]))
    t1 = time.perf_counter()
    jax.block_until_ready(fwd(high, x, jnp.array([950.0]), ctx[:1]))
    print(f"forward: x {tuple(x.shape)} -> v {tuple(v.shape)} {v.dtype}; first call {t1 - t0:.2f}s, "
          f"then {time.perf_counter() - t1:.4f}s; finite={bool(jnp.isfinite(v).all())}")
    pipe = WanI2VPipeline(high, low, WanVAE(DEMO_VAE, rngs=nnx.Rngs(3)))
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    gen = GenerationConfig(num_frames=args.frames, max_area=64 * 96, steps=args.steps)
    out = pipe.generate(image, context=ctx, gen=gen)
    print(f"generated {out.frames.shape} uint8 frames; experts per step: "
          f"{''.join('H' if e == 'high' else 'L' for e in out.experts)}; timings "
          + ", ".join(f"{k} {v:.2f}s" for k, v in out.seconds.items()))
    path = save_mp4(out.frames, args.out, fps=gen.fps)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
