"""Wan2.1 VAE (full size, random bf16 weights) encode/decode at 480p/81 frames on one GPU.

    python -m bench.vae [--frames 81] [--hw 480,832] [--iters 3]

Writes bench/results/vae_<H>x<W>x<F>.json (and $OUT/ when set).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.common import device_facts, peak_memory_bytes, write_result
from bench.timing import time_fn
from wanjax.model.vae import WAN21_VAE, decode_video, encode_video, init_vae


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--hw", default="480,832")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    h, w = (int(v) for v in args.hw.split(","))
    vae = init_vae(WAN21_VAE, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    video = jax.random.uniform(jax.random.key(0), (1, args.frames, h, w, 3), jnp.float32, -1, 1)
    res = {"hw": [h, w], "frames": args.frames}
    enc = time_fn(encode_video, vae, video, warmup=1, iters=args.iters)
    res["encode"] = enc | {"peak_bytes_after": peak_memory_bytes()}
    lat = encode_video(vae, video)
    dec = time_fn(decode_video, vae, lat, warmup=1, iters=args.iters)
    res["decode"] = dec | {"peak_bytes_after": peak_memory_bytes()}
    res.update(device_facts())
    write_result(f"vae_{h}x{w}x{args.frames}", res)
    print(res)


if __name__ == "__main__":
    main()
