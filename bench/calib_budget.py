"""What a cheaper calibration budget costs in quality: the mini model quantized by the streamed path
(`wanjax.quant.stream.quantize_streamed`, what ``wanjax quantize --calib`` runs) at the ``seed`` and ``fast``
budgets, each artifact attached and evaluated against BF16 on held-out clips (decoded-frame PSNR / SSIM, latent
relative L2: the metrics of ``wanjax eval``). CPU is enough:

    JAX_PLATFORMS=cpu PYTHONPATH=. python -m bench.calib_budget [--clips 8] [--recipe default]

Calibration: 12 training-split procedural clips (``clip_seed`` 500..511, noise seeds 100..111, the kind of
``wanjax/evaluation/sets/calib_mini.json``); ``seed`` takes all 12 and every step of every bin, ``fast`` the first
4 and 2 steps per bin, ``fast-b`` the next 4 (samples 4..7) at the fast budget, so the spread between two
equally cheap calibrations is measured too. Evaluation: the first ``--clips`` clips of
``wanjax/evaluation/sets/eval_mini24.json`` (held-out split). Settings: the mini model's generation_config.json.
Results: ``bench/results/calib_budget_mini.json`` (and ``$OUT``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mini")
    ap.add_argument("--clips", type=int, default=8, help="evaluation clips (eval_mini24.json, first N)")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--work", default="out/calib_budget")
    ap.add_argument("--name", default="calib_budget_mini")
    a = ap.parse_args(argv)
    from bench.layout import ensure_package_layout

    ensure_package_layout()
    import shutil

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench.common import bench_log, device_facts, write_result
    from wanjax.conditioning import NEGATIVE_PROMPT
    from wanjax.evaluation.run import load_samples
    from wanjax.metrics import psnr, relative_l2, ssim
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.quant.artifact import attach_artifact
    from wanjax.quant.calibrate import CalibSample
    from wanjax.quant.stream import BUDGETS, calib_config, quantize_streamed
    from wanjax.video_io import to_uint8

    log = bench_log("calib_budget")
    t_all = time.perf_counter()
    pipe = WanI2VPipeline.from_pretrained(a.model, dtype=jnp.bfloat16)
    gen = pipe.generation_defaults
    size = int(round(float(np.sqrt(_area(gen.max_area)))))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    evals = load_samples(os.path.join(here, "wanjax/evaluation/sets/eval_mini24.json"), gen.num_frames, size)
    evals = evals[: a.clips]
    os.makedirs(a.work, exist_ok=True)
    calib_file = os.path.join(a.work, "calib12.json")
    with open(calib_file, "w") as f:
        f.write(str([{"clip_seed": 500 + i, "split": "train", "seed": 100 + i} for i in range(12)]).replace("'", '"'))
    calibs = load_samples(calib_file, gen.num_frames, size)

    def prepare(s):
        y, _ = pipe.prepare_condition(s.image, gen.num_frames, gen.max_area)
        ctx = pipe.encode_text([s.prompt, NEGATIVE_PROMPT])
        return jnp.asarray(y), jnp.asarray(ctx)

    t0 = time.perf_counter()
    cal_samples = []
    for s in calibs:
        y, ctx = prepare(s)
        cal_samples.append(CalibSample(y=y, context=ctx, seed=s.seed))
    preps = [prepare(s) for s in evals]
    log(f"prepared {len(calibs)} calibration + {len(evals)} evaluation samples in {time.perf_counter() - t0:.1f} s")

    def generate(p, prep, seed):
        y, ctx = prep
        noise = jax.random.normal(jax.random.key(seed), y.shape[:-1] + (p.cfg.out_dim,), jnp.float32)
        lat, _ = p.denoise(y, ctx, gen, noise=noise, progress=False)
        lat = jax.block_until_ready(lat)
        return np.asarray(lat, np.float32), to_uint8(np.asarray(p.decode(lat)))

    t0 = time.perf_counter()
    refs = [generate(pipe, prep, s.seed) for s, prep in zip(evals, preps)]
    log(f"BF16 references in {time.perf_counter() - t0:.1f} s")

    variants = {
        "seed": (BUDGETS["seed"], cal_samples),
        "fast": (BUDGETS["fast"], cal_samples),
        "fast-b": (BUDGETS["fast"], cal_samples[4:8]),
    }
    out = {
        "device": device_facts(),
        "model": a.model,
        "recipe": a.recipe,
        "gen": {"num_frames": gen.num_frames, "max_area": str(gen.max_area), "steps": gen.steps},
        "eval_clips": [s.name for s in evals],
        "calib_clips": [s.name for s in calibs],
        "command": "JAX_PLATFORMS=cpu PYTHONPATH=. python -m bench.calib_budget " + " ".join(argv or sys.argv[1:]),
        "variants": {},
    }
    for name, (budget, samples) in variants.items():
        chosen = budget.select(samples)
        cfg = calib_config(a.recipe, gen, budget)
        qdir, work = os.path.join(a.work, name), os.path.join(a.work, f"{name}.calib")
        for d in (qdir, work):
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        res = quantize_streamed(pipe, chosen, a.recipe, qdir, work_dir=work, cfg=cfg, progress=False)
        t_quant = time.perf_counter() - t0
        kinds = {}
        for u in res.units:
            kinds[u["kind"]] = kinds.get(u["kind"], 0.0) + u["seconds"]
        qp = WanI2VPipeline(
            nnx.merge(pipe.graphdef, pipe._params_high),
            nnx.merge(pipe.graphdef, pipe._params_low),
            pipe.vae,
        )
        attach_artifact(qp, qdir, mode="fake")
        rows = []
        for s, prep, (lat_ref, fr_ref) in zip(evals, preps, refs):
            lat, frames = generate(qp, prep, s.seed)
            rows.append(
                {
                    "psnr": psnr(frames, fr_ref),
                    "ssim": ssim(frames, fr_ref, data_range=255.0),
                    "latent_rel_l2": relative_l2(lat, lat_ref),
                }
            )
        r = {
            "budget": dataclasses.asdict(budget),
            "samples": len(chosen),
            "captured_steps_per_sample": int(sum(len(s) for s in _captured(cfg))),
            "quantize_s": t_quant,
            "seconds_by_kind": kinds,
            "psnr": float(np.mean([x["psnr"] for x in rows])),
            "ssim": float(np.mean([x["ssim"] for x in rows])),
            "latent_rel_l2": float(np.mean([x["latent_rel_l2"] for x in rows])),
            "per_clip": rows,
        }
        out["variants"][name] = r
        log(
            f"{name}: {r['samples']} samples x {r['captured_steps_per_sample']} captured steps, quantized in "
            f"{t_quant:.1f} s; PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, latent rel-L2 {r['latent_rel_l2']:.4f}"
        )
        write_result(a.name, out)
    v = out["variants"]
    out["fast_minus_seed_db"] = v["fast"]["psnr"] - v["seed"]["psnr"]
    out["fast_b_minus_fast_db"] = v["fast-b"]["psnr"] - v["fast"]["psnr"]
    out["seconds"] = time.perf_counter() - t_all
    write_result(a.name, out)
    log(
        f"fast - seed: {out['fast_minus_seed_db']:+.2f} dB; fast-b - fast (two cheap calibrations): "
        f"{out['fast_b_minus_fast_db']:+.2f} dB; {out['seconds']:.0f} s in all"
    )
    return 0


def _area(max_area) -> int:
    from wanjax.conditioning import max_area_from_size

    return max_area_from_size(max_area)


def _captured(cfg):
    from wanjax.quant.calibrate import captured_steps

    c = cfg.resolved()
    return [captured_steps(c, b) for b in c.bins.names]


if __name__ == "__main__":
    sys.exit(main())
