"""What the 8-bit attention costs in video quality on the mini model (CPU; issue 32's generation-level gate).

    JAX_PLATFORMS=cpu python -m bench.attn8_quality --clips 8 [--backends attn8,fp8_reference] [--recipe w4a8]

Held-out directional clips (`wanjax.train.evaluate.heldout_set`, as `make demo` and docs/QUALITY.md) are generated
with the model's settings (models/mini/generation_config.json) by:

* BF16 experts, automatic attention (the reference);
* BF16 experts with each 8-bit backend (``--backends``: ``attn8`` = INT8 QK^T + FP8 PV, its jnp reference on the
  CPU; ``fp8_reference`` = the per-tensor FP8 emulation of cuDNN's FP8 attention) on the self-attention;
* W4A4 experts (``--recipe``, the default recipe by default, calibrated and quantized as
  `wanjax.demo.quantize_for_demo`) with automatic
  attention, then with each 8-bit backend.

Same noise for all. Reported per run: PSNR / SSIM of the decoded uint8 frames against the BF16 reference (mean and
min over clips), motion-direction accuracy (`wanjax.track.motion_direction`). The gate of issue 32: W4A4 + attn8
costs <= 0.3 dB against W4A4 with the automatic attention, direction accuracy unchanged. Result: ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np


def run_clips(pipe, gen, clips, backend: str | None):
    """Frames (uint8) and motion directions of every clip with the self-attention on ``backend`` (None: automatic);
    the pipeline's velocity is re-jitted so the backend is traced in."""
    from wanjax.model.attention import set_attention_backend
    from wanjax.pipeline import DEFAULT_NEGATIVE_PROMPT
    from wanjax.track import motion_direction
    from wanjax.video_io import to_uint8

    videos, caps, colours, _ = clips
    set_attention_backend(backend)
    try:
        pipe._velocity = pipe._jit_velocity(pipe._velocity_fn)  # a fresh trace under this backend
        frames, dirs, secs = [], [], []
        for i in range(len(caps)):
            ctx = pipe.encode_text([caps[i], DEFAULT_NEGATIVE_PROMPT])
            y, _ = pipe.prepare_condition(videos[i, 0], gen.num_frames, gen.max_area)
            t0 = time.perf_counter()
            lat, _ = pipe.denoise(y, ctx, dataclasses.replace(gen, seed=i), progress=False)
            fr = to_uint8(np.asarray(pipe.decode(lat)))
            secs.append(time.perf_counter() - t0)
            frames.append(fr)
            dirs.append(motion_direction(fr, colours[i])[0])
    finally:
        set_attention_backend(None)
    return frames, dirs, secs


def compare(frames, ref_frames, dirs, truth) -> dict:
    from wanjax.metrics import psnr, ssim

    p = [float(psnr(a, b)) for a, b in zip(frames, ref_frames)]
    s = [float(ssim(a, b)) for a, b in zip(frames, ref_frames)]
    return {
        "psnr_mean": float(np.mean(p)),
        "psnr_min": float(np.min(p)),
        "psnr": p,
        "ssim_mean": float(np.mean(s)),
        "direction_accuracy": float(np.mean([d == t for d, t in zip(dirs, truth)])),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mini")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--backends", default="attn8,fp8_reference", help="comma list of 8-bit attention backends")
    ap.add_argument("--out", default="bench/results/attn8_quality_mini.json")
    ap.add_argument("--recipe", default="default", help="the quantization recipe of the W4A4 runs (e.g. w4a8)")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]

    from wanjax.demo import quantize_for_demo
    from wanjax.generation_config import GenerationConfig
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.train.evaluate import heldout_set

    pipe = WanI2VPipeline.from_pretrained(args.model)
    clips = heldout_set(args.clips, seed=1000)
    truth = clips[3]
    gen = GenerationConfig.for_model(args.model).validate()
    res = {"model": args.model, "clips": args.clips, "gen": gen.describe(), "runs": {}}

    def record(name, frames, dirs, secs, ref):
        res["runs"][name] = compare(frames, ref, dirs, truth) | {"s_per_clip": float(np.mean(secs))}
        r = res["runs"][name]
        print(
            f"{name:<24} PSNR {r['psnr_mean']:.2f} (min {r['psnr_min']:.2f}) dB  SSIM {r['ssim_mean']:.4f}  "
            f"direction {r['direction_accuracy']:.2f}",
            flush=True,
        )
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    ref, ref_dirs, secs = run_clips(pipe, gen, clips, None)
    res["runs"]["bf16"] = {
        "direction_accuracy": float(np.mean([d == t for d, t in zip(ref_dirs, truth)])),
        "s_per_clip": float(np.mean(secs)),
    }
    print(f"bf16 reference: direction {res['runs']['bf16']['direction_accuracy']:.2f}", flush=True)
    for b in backends:
        record(f"bf16+{b}", *run_clips(pipe, gen, clips, b), ref)
    quantize_for_demo(pipe, dict(num_frames=gen.num_frames, max_area=gen.max_area, steps=gen.steps), recipe=args.recipe)
    res["recipe"] = args.recipe
    record("w4a4", *run_clips(pipe, gen, clips, None), ref)
    for b in backends:
        record(f"w4a4+{b}", *run_clips(pipe, gen, clips, b), ref)
    w = res["runs"]["w4a4"]["psnr_mean"]
    res["cost_db"] = {b: w - res["runs"][f"w4a4+{b}"]["psnr_mean"] for b in backends}
    res["gate"] = "W4A4 + attn8 within 0.3 dB of W4A4 with the automatic attention, direction accuracy unchanged"
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("PSNR cost of each 8-bit attention on W4A4 (dB):", {b: round(c, 3) for b, c in res["cost_db"].items()})


if __name__ == "__main__":
    main()
