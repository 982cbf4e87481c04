"""Step-cache fidelity on the mini model (CPU): cached vs uncached video of the same precision, BF16 and W4A4.

    JAX_PLATFORMS=cpu python -m bench.cache_fidelity --clips 8 --steps 20 40

For each precision (BF16; W4A4 = the default recipe in fake mode, calibrated and quantized as `wanjax.demo`'s
``quantize_for_demo``) and step count: the cache is calibrated on training clips (disjoint from the held-out ones)
with `WanI2VPipeline.calibrate_cache` on the experts of that precision, thresholds are picked from the calibrated
(input-independent) schedule to reach about 1.5x, 2x and 2.5x fewer forwards, and each held-out clip is generated
uncached and cached (same noise). Reported per setting: forwards computed / skipped, PSNR and SSIM of the cached
frames vs the uncached ones (uint8, peak 255), motion-direction accuracy (`wanjax.track.motion_direction`, as the
demo) of both, their agreement, and the denoise time. Results: ``--out`` (JSON); calibrations: ``--calib-out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np


def pick_configs(cal, targets, max_skips_list, warmup: int, rules=("mag", "tea"), scale_at=()):
    """For each rule, target speed-up and skip cap: the smallest threshold whose schedule reaches the target (the
    MagCache schedule is exact; TeaCache's is estimated on the calibration runs' mean input changes, a real run
    measures its own). ``scale_at``: targets where the MagCache residual-scaling variant is also run."""
    from wanjax.sampling.cache import CacheConfig, plan_skips, plan_tea

    n = len(cal.experts)
    grid = np.geomspace(1e-3, 4.0, 400)
    out, seen = [], set()
    for rule in rules:
        for target in targets:
            for k in max_skips_list:
                for thr in grid:
                    cfg = CacheConfig(threshold=float(round(thr, 5)), rule=rule, max_skips=k, warmup=warmup)
                    skip = plan_skips(cal.ratios, cal.experts, cfg)[0] if rule == "mag" else plan_tea(cal, cfg)
                    if n / (n - sum(skip)) >= target - 1e-9 and not any(
                        t == target and c.rule == rule for t, c in out
                    ):  # the smallest cap that reaches the target
                        variants = [cfg] + (
                            [dataclasses.replace(cfg, scale_residual=True)]
                            if rule == "mag" and target in scale_at
                            else []
                        )
                        for c in variants:
                            if c not in seen:
                                seen.add(c)
                                out.append((target, c))
                        break
    return out


def run_setting(pipe, label, gen, clips, calib, args, calib_file):
    """Calibrate, pick thresholds, generate uncached + cached for every clip; returns the result rows."""
    from wanjax.evaluation.cache import compare_to_uncached, summarize
    from wanjax.pipeline import DEFAULT_NEGATIVE_PROMPT
    from wanjax.sampling.cache import StepCache
    from wanjax.track import motion_direction
    from wanjax.video_io import to_uint8

    t0 = time.perf_counter()
    cal = pipe.calibrate_cache(calib, gen, precision=label)
    cal.save(calib_file)
    print(
        f"[{label} {gen.steps} steps] calibrated on {len(calib)} clips in {time.perf_counter() - t0:.1f}s -> {calib_file}"
    )
    print("  cond ratios  ", " ".join(f"{r:.3f}" for r in cal.ratios["cond"]))
    print("  uncond ratios", " ".join(f"{r:.3f}" for r in cal.ratios["uncond"]))
    configs = pick_configs(cal, args.targets, args.max_skips, args.warmup, rules=args.rules, scale_at=args.scale_at)
    videos, caps, colours, dirs = clips
    rows = {c: {"fidelity": [], "dir": [], "sec": []} for _, c in configs}
    ref_dirs, ref_sec = [], []
    for i in range(len(caps)):
        ctx = pipe.encode_text([caps[i], DEFAULT_NEGATIVE_PROMPT])
        y, _ = pipe.prepare_condition(videos[i, 0], gen.num_frames, gen.max_area)
        g = dataclasses.replace(gen, seed=i)
        t1 = time.perf_counter()
        lat, _ = pipe.denoise(y, ctx, g, progress=False)
        lat.block_until_ready()
        ref_sec.append(time.perf_counter() - t1)
        ref = to_uint8(np.asarray(pipe.decode(lat)))
        ref_dirs.append(motion_direction(ref, colours[i])[0])
        for _, c in configs:
            cache = StepCache(c, cal)
            t1 = time.perf_counter()
            lat, _ = pipe.denoise(y, ctx, g, progress=False, cache=cache)
            lat.block_until_ready()
            sec = time.perf_counter() - t1
            fr = to_uint8(np.asarray(pipe.decode(lat)))
            r = rows[c]
            r["fidelity"].append(compare_to_uncached(fr, ref, cache))
            r["dir"].append(motion_direction(fr, colours[i])[0])
            r["sec"].append(sec)
        print(f"  clip {i}: uncached direction {ref_dirs[-1]!r} (caption {dirs[i]!r})", flush=True)
    n = len(caps)
    acc_ref = float(np.mean([d == t for d, t in zip(ref_dirs, dirs)]))
    result = {
        "precision": label,
        "steps": gen.steps,
        "clips": n,
        "high_steps": cal.experts.count("high"),
        "calibration_file": os.path.relpath(calib_file),
        "calibration_samples": len(calib),
        "uncached": {"direction_accuracy": acc_ref, "denoise_s_mean": float(np.mean(ref_sec[1:] or ref_sec))},
        "cached": [],
    }
    for target, c in configs:
        r = rows[c]
        res = {
            "target_speedup": target,
            "threshold": c.threshold,
            "max_skips": c.max_skips,
            "warmup": c.warmup,
            "scale_residual": c.scale_residual,
            "rule": c.rule,
            **summarize(r["fidelity"], gen.steps),  # forwards, schedule, PSNR / SSIM vs uncached
            "direction_accuracy": float(np.mean([d == t for d, t in zip(r["dir"], dirs)])),
            "direction_agreement_with_uncached": float(np.mean([d == t for d, t in zip(r["dir"], ref_dirs)])),
            "denoise_s_mean": float(np.mean(r["sec"][1:] or r["sec"])),
        }
        result["cached"].append(res)
        print(
            f"  {label} {gen.steps} steps {c.rule} thr {c.threshold:<8g} K {c.max_skips} scale {int(c.scale_residual)}: "
            f"{res['computed']:.1f}/{gen.steps} computed ({res['speedup_forwards']:.2f}x) {res['schedule']}  PSNR "
            f"{res['psnr_mean']:.2f} (min {res['psnr_min']:.2f}) dB  SSIM {res['ssim_mean']:.4f}  dir acc "
            f"{res['direction_accuracy']:.2f} (uncached {acc_ref:.2f}, agree {res['direction_agreement_with_uncached']:.2f})",
            flush=True,
        )
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mini")
    ap.add_argument("--clips", type=int, default=8, help="held-out clips (default: %(default)s)")
    ap.add_argument("--calib-clips", type=int, default=2, help="training clips for the cache calibration")
    ap.add_argument("--steps", type=int, nargs="+", default=[20])
    ap.add_argument("--precisions", nargs="+", default=["bf16", "w4a4"], choices=("bf16", "w4a4"))
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 2.5])
    ap.add_argument("--max-skips", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rules", nargs="+", default=["mag", "tea"], choices=("mag", "tea"))
    ap.add_argument("--scale-at", type=float, nargs="*", default=[2.0], help="targets that also run scale_residual")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="bench/results/cache_mini.json")
    ap.add_argument("--calib-out", default="bench/results", help="dir for cache_calibration_mini[_w4a4].json")
    args = ap.parse_args(argv)

    from wanjax.data.procedural import make_clips
    from wanjax.demo import quantize_for_demo
    from wanjax.pipeline import GenerationConfig, WanI2VPipeline
    from wanjax.train.evaluate import heldout_set
    from wanjax.video_io import to_uint8

    pipe = WanI2VPipeline.from_pretrained(args.model)
    clips = heldout_set(args.clips, seed=1000)
    tv, tc = make_clips(args.calib_clips, split="train", seed=11)[:2]
    firsts = to_uint8(tv[:, 0])  # [-1, 1] -> uint8, as images arrive (wanjax.demo)
    calib = [(f, c, 500 + i) for i, (f, c) in enumerate(zip(firsts, tc))]
    base = dict(num_frames=clips[0].shape[1], max_area=clips[0].shape[2] * clips[0].shape[3], guide_scale=(3.5, 3.5))
    results = {"model": args.model, "settings": [], "args": vars(args)}
    for label in args.precisions:
        if label == "w4a4":
            quantize_for_demo(pipe, dict(base, steps=20))
        for steps in args.steps:
            gen = GenerationConfig(**base, steps=steps)
            name = "cache_calibration_mini" + ("" if label == "bf16" else "_w4a4") + ".json"
            results["settings"].append(
                run_setting(pipe, label, gen, clips, calib, args, os.path.join(args.calib_out, name))
            )
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
