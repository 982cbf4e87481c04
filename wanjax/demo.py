"""`make demo`: image-to-video with the shipped mini Wan2.2 MoE (``models/mini``), end to end on CPU.

Loads ``models/mini`` (official Wan2.2 layout: two DiT experts, Wan2.1-architecture VAE, UMT5 encoder, tokenizer)
through `WanI2VPipeline.from_pretrained`, takes the first frame and caption of a held-out procedural clip (a
(shape, colour) pair never seen in training), generates a video with the real pipeline (official FlowUniPC schedule,
high-noise expert for t >= 900, CFG) and writes ``out/demo.mp4`` plus ``out/demo_strip.png`` (rows: the held-out
clip, the BF16 generation, and the W4A4 generation: both experts calibrated per timestep bin and quantized with
the default recipe).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import numpy as np

import wanjax
from wanjax.video_io import save_gif, save_mp4, side_by_side

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "mini")


def _default_model() -> str:
    """The shipped mini model (`wanjax.mini.mini_model_path`: installed wheel or checkout), else `DEFAULT_MODEL`."""
    try:
        from wanjax.mini import mini_model_path
    except ImportError:
        return DEFAULT_MODEL
    try:
        return mini_model_path()
    except FileNotFoundError:
        return DEFAULT_MODEL


def quantize_for_demo(pipe, gen: dict, clips: int = 2, recipe: str = "default"):
    """Calibrate both experts on ``clips`` training clips (first frame + caption; disjoint from the held-out
    evaluation clip), quantize them to W4A4 with ``recipe`` and attach them to ``pipe`` (in place; returned).

    Calibration runs the real sampler with the demo's settings (``gen``), capturing per (expert, layer, timestep bin)
    statistics; the quantized layers run in 'fake' mode on CPU (simulated W4A4) and 'real' mode (the low-bit
    kernels) on GPUs that have them.
    """
    import tempfile

    from wanjax.data.procedural import make_clips
    from wanjax.pipeline import GenerationConfig
    from wanjax.quant.apply import attach_to_pipeline
    from wanjax.quant.calibrate import CalibConfig, CalibSample, calibrate
    from wanjax.quant.quantize import CalibrationSource, quantize
    from wanjax.video_io import to_uint8

    videos, captions = make_clips(clips, split="train", seed=7)[:2]
    firsts = to_uint8(videos[:, 0])  # [-1, 1] -> uint8, as images arrive
    samples = [CalibSample(image=f, prompt=c, seed=100 + i) for i, (f, c) in enumerate(zip(firsts, captions))]
    g = GenerationConfig(**gen)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        stats = calibrate(
            pipe,
            samples,
            CalibConfig(gen=g, reservoir=256, rows_per_call=256),
            work_dir=work,
            mode="online",
            progress=False,
        )
        t1 = time.perf_counter()
        q, reports = quantize(pipe, recipe, CalibrationSource(stats), progress=False)
        t2 = time.perf_counter()
    sq = np.concatenate([np.ravel(v) for r in reports.values() for v in r["sqnr_db"].values()])
    print(
        f"W4A4 ({recipe}): calibrated on {clips} training clips in {t1 - t0:.1f}s, quantized {sq.size} "
        f"(layer, bin) pairs in {t2 - t1:.1f}s; layer SQNR median {np.median(sq):.1f} dB, min {sq.min():.1f} dB"
    )
    attach_to_pipeline(pipe, q["high"], q["low"], stats.bins)
    return pipe


def main(argv=None):
    from wanjax.track import motion_direction
    from wanjax.pipeline import WanI2VPipeline
    from wanjax import metrics
    from wanjax.train.evaluate import heldout_set
    from wanjax.train.report import strip_png

    psnr = functools.partial(metrics.psnr, data_range=255.0)  # uint8 frames: peak 255
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the shipped mini model)")
    ap.add_argument("--out", default="out/demo.mp4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guide", type=float, default=3.5)
    ap.add_argument("--clip", type=int, default=0, help="which held-out clip to use")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-quant", action="store_true", help="skip the W4A4 half of the demo")
    args = ap.parse_args(argv)
    args.model = args.model or _default_model()
    print(f"wanjax {wanjax.__version__} | jax {jax.__version__} on {jax.devices()[0].platform}")
    if not os.path.isdir(os.path.join(args.model, "high_noise_model")):
        raise SystemExit(
            f"{args.model}: the mini model is not there (expected the official layout with "
            "high_noise_model/). It ships in the repository's models/mini: pass --model DIR pointing at "
            "a copy, or train one with `python -m wanjax.train run` + `assemble`"
        )
    t0 = time.perf_counter()
    pipe = WanI2VPipeline.from_pretrained(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s")
    videos, caps, colours, dirs = heldout_set(args.clip + 1, seed=1000)
    truth, caption = videos[args.clip], caps[args.clip]
    print(f"held-out caption: {caption!r}")
    gen = dict(
        num_frames=truth.shape[0],
        max_area=truth.shape[1] * truth.shape[2],
        steps=args.steps,
        guide_scale=(args.guide, args.guide),
        seed=args.seed,
    )
    out = pipe.generate(truth[0], caption, **gen)
    d = motion_direction(out.frames, colours[args.clip])[0]
    print(
        f"BF16: {out.frames.shape} frames; experts per step "
        f"{''.join('H' if e == 'high' else 'L' for e in out.experts)}; frame-0 PSNR vs the condition "
        f"{psnr(out.frames[0], truth[0]):.2f} dB; tracked motion {d!r} (caption says {dirs[args.clip]!r}); "
        + ", ".join(f"{k} {v:.1f}s" for k, v in out.seconds.items())
    )
    rows = [truth, out.frames]
    report = [
        f"# wanjax demo ({args.model})",
        "",
        f"held-out caption: {caption!r}; {gen['num_frames']} frames, {gen['steps']} steps, seed {args.seed}",
        "",
        "| | BF16 | W4A4 |",
        "|---|---|---|",
    ]
    bf16_bytes = _weight_bytes(pipe)
    times = {"BF16 generate": sum(out.seconds.values())}
    qpipe = None if args.no_quant else quantize_for_demo(pipe, gen)
    if qpipe is not None:
        from wanjax.metrics import ssim

        qout = qpipe.generate(truth[0], caption, **gen)
        q_psnr, q_ssim = psnr(qout.frames, out.frames), ssim(qout.frames, out.frames, data_range=255.0)
        q_bytes = _weight_bytes(qpipe)
        print(
            f"W4A4: PSNR vs BF16 {q_psnr:.2f} dB, SSIM {q_ssim:.4f}; DiT weights {bf16_bytes / 1e6:.2f} MB (BF16) "
            f"-> {q_bytes / 1e6:.2f} MB (W4A4, incl. low-rank branches, scales and per-bin tables)"
        )
        rows.append(qout.frames)
        qd = motion_direction(qout.frames, colours[args.clip])[0]
        print(f"W4A4: frame-0 PSNR vs the condition {psnr(qout.frames[0], truth[0]):.2f} dB; tracked motion {qd!r}")
        report += [
            f"| frame-0 PSNR vs the condition | {psnr(out.frames[0], truth[0]):.2f} dB | "
            f"{psnr(qout.frames[0], truth[0]):.2f} dB |",
            f"| tracked motion (caption: {dirs[args.clip]!r}) | {d!r} | {qd!r} |",
            f"| DiT weights, both experts | {bf16_bytes / 1e6:.2f} MB | {q_bytes / 1e6:.2f} MB |",
            f"| PSNR / SSIM vs BF16 | — | {q_psnr:.2f} dB / {q_ssim:.4f} |",
            f"| generate time | {times['BF16 generate']:.1f} s | {sum(qout.seconds.values()):.1f} s |",
        ]
    else:
        report += [f"| DiT weights, both experts | {bf16_bytes / 1e6:.2f} MB | (skipped) |"]
    side = side_by_side(rows, gap=0)
    path = save_mp4(side, args.out, fps=16)
    stem = os.path.splitext(args.out)[0]
    strip = strip_png(rows, stem + "_strip.png")
    gif = save_gif(side, stem + ".gif", fps=16)
    report += [
        "",
        f"frame-0 PSNR of the BF16 video vs the condition: {psnr(out.frames[0], truth[0]):.2f} dB; "
        "side by side: held-out clip | BF16 | W4A4",
        "",
    ]
    with open(stem + "_report.md", "w") as f:
        f.write("\n".join(report) + "\n")
    print(f"wrote {path}, {gif}, {strip} and {stem}_report.md (side by side: held-out clip | BF16 | W4A4)")


def _weight_bytes(pipe) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves((pipe._params_high, pipe._params_low)))


if __name__ == "__main__":
    main()
