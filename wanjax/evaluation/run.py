"""The ``wanjax eval`` driver: every recipe (and the default recipe's ablations) side by side against BF16.

    results = run_eval(pipe, eval_samples, calib_samples, gen, "report/", recipes=["rtn", "default"])

What it does, in order (all on the pipeline given, e.g. ``WanI2VPipeline.from_pretrained("models/mini")``):

1. checks that the evaluation and calibration sets are disjoint (no shared clip / image, no shared prompt);
2. captures the calibration set's layer inputs with ONE bin per sampling step (`wanjax.quant.calibrate`, online,
   conditional-only trajectory as the seed, one Hessian per expert), and the evaluation set's the same way
   (CFG trajectory: the rows the evaluated generation really sees); `wanjax.evaluation.sqnr.RebinnedSource`
   regroups them into the bins each variant uses (seed bins = 3 per expert; 6 per expert for one ablation);
3. generates every evaluation sample with the BF16 pipeline (fixed noise from the sample's seed);
4. per variant (a named recipe, or an ablation of ``default``): quantizes both experts on the calibration
   statistics, attaches them to the pipeline (per-bin tables, traced bin), generates the same samples with the same
   noise and measures: PSNR / SSIM of the decoded frames vs BF16, relative L2 of the final latents, the I2V task
   metrics (frame-0 PSNR vs the condition image, motion-direction accuracy with `wanjax.track`), weight bytes,
   quantize / denoise wall time, and the per-layer SQNR per (expert, bin) on the EVALUATION set's captured inputs;
5. with ``cache=`` (`wanjax.evaluation.cache.CacheEval`, ``wanjax eval --cache``): BF16 and every variant are
   also generated with the step cache (`wanjax.sampling.cache`), calibrated per precision on the calibration set
   with that precision's experts (or read from one file), and compared with the uncached run of the *same*
   precision: PSNR / SSIM of the frames, latent rel-L2, forwards computed / skipped, the task metrics, denoise
   time (`wanjax.evaluation.cache`: the measurement ``bench/cache_fidelity.py`` reports too);
6. writes ``results.json``, PNG plots and ``report.md`` (`wanjax.evaluation.report`).

Evaluation-set file (``--eval-set``; the calibration set ``--calib-set`` has the same format): a JSON list (or
JSON lines) of objects, each either a procedural clip or an image:

    [{"clip_seed": 1000},                                   # held-out procedural clip 0 of seed 1000
     {"clip_seed": 7, "split": "train", "seed": 3},         # a training-split clip, noise seed 3
     {"image": "cat.png", "prompt": "a cat surfing", "seed": 0, "colour": "red", "direction": "left"}]

``clip_seed`` renders ``wanjax.data.procedural.make_clips(1, split, clip_seed, directional_only=True)`` at the
generation size (split default ``"heldout"``; its first frame is the condition image, its caption the prompt unless
``prompt`` is given; colour and direction feed the motion metric). ``image`` + ``prompt`` take any image;
``colour`` / ``direction`` are optional there (no direction accuracy without them). ``seed``: the noise seed
(default 0). A calibration set drawn from the ``"train"`` split and an evaluation set from ``"heldout"`` have
disjoint captions by construction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.evaluation.report import write_report
from wanjax.evaluation.sqnr import RebinnedSource, activation_ranges, layer_sqnr_table, step_bins
from wanjax.evaluation.variants import Variant, plan_variants
from wanjax.io.atomic import write_json_atomic
from wanjax.metrics import psnr, relative_l2, ssim

__all__ = ["EvalSample", "check_disjoint", "check_settings", "load_samples", "run_eval"]


@dataclasses.dataclass
class EvalSample:
    """One evaluation (or calibration) sample.

    Attributes:
      name: label (``"heldout:1000"``, the image path, ...).
      image: condition image (uint8 ``[H, W, 3]`` or a path).
      prompt: caption (None only with a precomputed ``context``).
      seed: noise seed.
      colour, direction: the object's colour / planted motion direction (motion metric), or None.
      context: optional precomputed text context ``[2, L, D]`` (positive, negative).
      key: identity used by the disjointness check (clip id or image path).
    """

    name: str
    image: Any
    prompt: str | None = None
    seed: int = 0
    colour: str | None = None
    direction: str | None = None
    context: Any = None
    key: str | None = None


def _read_entries(path: str) -> list[dict]:
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: neither a JSON list nor JSON lines: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"{path}: expected a non-empty JSON list of objects, got {type(data).__name__}")
    return data


def load_samples(path: str, num_frames: int, size: int) -> list[EvalSample]:
    """Reads an eval/calibration set file (format in the module docstring); clips are rendered at ``size``."""
    from wanjax.data import procedural
    from wanjax.video_io import to_uint8

    out = []
    for i, d in enumerate(_read_entries(path)):
        seed = int(d.get("seed", 0))
        if "clip_seed" in d:
            split = d.get("split", "heldout")
            if split not in procedural.SPLITS:
                raise ValueError(f"{path}[{i}]: split must be one of {sorted(procedural.SPLITS)}, got {split!r}")
            clips, caps, params = procedural.make_clips(
                1, split, int(d["clip_seed"]), num_frames, size, directional_only=True
            )
            key = f"{split}:{int(d['clip_seed'])}"
            out.append(
                EvalSample(
                    name=key,
                    image=to_uint8(clips[0, :1])[0],
                    prompt=d.get("prompt", caps[0]),
                    seed=seed,
                    colour=params["colour_name"][0],
                    direction=params["motion_name"][0].split()[1],
                    key=key,
                )
            )
        elif "image" in d:
            if "prompt" not in d:
                raise ValueError(f"{path}[{i}]: an 'image' entry needs a 'prompt', got keys {sorted(d)}")
            img = d["image"] if os.path.isabs(d["image"]) else os.path.join(os.path.dirname(path), d["image"])
            out.append(
                EvalSample(
                    name=d["image"],
                    image=img,
                    prompt=d["prompt"],
                    seed=seed,
                    colour=d.get("colour"),
                    direction=d.get("direction"),
                    key=os.path.abspath(img),
                )
            )
        else:
            raise ValueError(f"{path}[{i}]: each entry needs 'clip_seed' or 'image' (+ 'prompt'), got keys {sorted(d)}")
    return out


def check_disjoint(eval_samples: Sequence[EvalSample], calib_samples: Sequence[EvalSample]) -> dict:
    """Raises ``ValueError`` if the sets share a clip / image or a prompt; returns a summary for the report."""
    ek = {s.key or s.name for s in eval_samples}
    ck = {s.key or s.name for s in calib_samples}
    if ek & ck:
        raise ValueError(f"evaluation and calibration sets share inputs: {sorted(ek & ck)}")
    ep = {s.prompt for s in eval_samples if s.prompt is not None}
    cp = {s.prompt for s in calib_samples if s.prompt is not None}
    if ep & cp:
        raise ValueError(f"evaluation and calibration sets share prompts: {sorted(ep & cp)}")
    return {"eval": sorted(ek), "calib": sorted(ck), "shared_inputs": 0, "shared_prompts": 0}


# ------------------------------------------------------------------------------------------------ helpers
def _bytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def _block_linear_bytes(model) -> int:
    from wanjax.model.names import BLOCK_LINEARS, fused_parent
    from wanjax.quant.apply import get_submodule

    def present(p):  # a Linear, or the fused layer that took its place (a fuse_qkv recipe)
        try:
            get_submodule(model, p)
            return p
        except KeyError:
            return fused_parent(p) or p

    return sum(_bytes(nnx.state(get_submodule(model, p))) for p in dict.fromkeys(map(present, BLOCK_LINEARS)))


def _bin_layouts(gen) -> dict:
    from wanjax.quant.bins import seed_bins, uniform_bins
    from wanjax.sampling import flow_schedule

    sched = flow_schedule(gen.steps, shift=gen.shift)
    fine = step_bins(sched, gen.boundary)
    n = {e: len(fine.expert_bins(e)) for e in ("high", "low")}
    return fine, {
        "seed": lambda: seed_bins(sched, gen.boundary),
        "6": lambda: uniform_bins(sched, min(6, *n.values()), gen.boundary),
    }


def _prepare(pipe, s: EvalSample, gen):
    from wanjax import conditioning
    from wanjax.pipeline import DEFAULT_NEGATIVE_PROMPT
    from wanjax.video_io import to_uint8

    ctx = s.context
    if ctx is None:
        ctx = pipe.encode_text([s.prompt, DEFAULT_NEGATIVE_PROMPT])
    y, _ = pipe.prepare_condition(s.image, gen.num_frames, gen.max_area)
    cond = to_uint8(conditioning.preprocess_image(s.image, gen.max_area)[None])[0]
    noise = jax.random.normal(jax.random.key(s.seed), y.shape[:-1] + (pipe.cfg.out_dim,), jnp.float32)
    return {"y": jnp.asarray(y), "ctx": jnp.asarray(ctx), "cond": cond, "noise": noise}


def _generate(pipe, prep, gen, cache=None):
    from wanjax.video_io import to_uint8

    t0 = time.perf_counter()
    lat, _ = pipe.denoise(prep["y"], prep["ctx"], gen, noise=prep["noise"], progress=False, cache=cache)
    lat = jax.block_until_ready(lat)
    dt = time.perf_counter() - t0
    frames = to_uint8(np.asarray(pipe.decode(lat)))
    return np.asarray(lat, np.float32), frames, dt


def _task(frames, prep, s: EvalSample) -> dict:
    from wanjax.track import motion_direction

    out = {"frame0_psnr": psnr(frames[0], prep["cond"])}
    if s.colour is not None and s.direction is not None:
        got = motion_direction(frames, s.colour)[0]
        out.update(direction=got, direction_ok=float(got == s.direction))
    return out


def _summ(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        out[k] = float(np.median(vals) if k.endswith("_s") else np.mean(vals))  # times: median (1st compiles)
    return out


def check_settings(gen, variants: Sequence[Variant]) -> None:
    """Raise ``ValueError`` (before any model work) if ``gen``'s schedule cannot hold the bins a variant needs:
    the seed bins need 3 steps per expert, the one-bin-per-step capture one; the message names the steps, the
    boundary and the variant."""
    try:
        _, layouts = _bin_layouts(gen)
    except ValueError as e:
        raise ValueError(f"{gen.steps} steps (shift {gen.shift:g}, boundary {gen.boundary:g}): {e}") from None
    for kind in sorted({v.bins for v in variants}):
        try:
            layouts[kind]()
        except ValueError as e:
            names = [v.name for v in variants if v.bins == kind]
            raise ValueError(
                f"{gen.steps} steps (shift {gen.shift:g}, boundary {gen.boundary:g}) cannot hold the "
                f"timestep bins of {names}: {e}"
            ) from None


def _cache_calibration(cache, gen):
    """The calibration a `CacheEval` names, for ``gen`` (None when each precision is calibrated on the set)."""
    if cache is None or cache.calibration is None:
        return None
    from wanjax.sampling.cache import CacheCalibration

    return CacheCalibration.load(cache.calibration, gen.steps, gen.shift, gen.boundary, gen.solver)


def _eval_cache(pipe, label, cache, cal, gen, samples, preps, refs, ref_rows, calib_samples, cpreps, log) -> dict:
    """``pipe`` (one precision) with the step cache on every evaluation sample vs its own uncached runs (``refs``:
    (latents, frames), ``ref_rows``: their rows); calibrated here on the calibration set unless ``cal`` is given."""
    from wanjax.evaluation.cache import compare_to_uncached, summarize
    from wanjax.quant.calibrate import CalibSample
    from wanjax.quant.step_cache import calibrate_step_cache
    from wanjax.sampling.cache import StepCache

    t0 = time.perf_counter()
    if cal is None:
        use = list(zip(calib_samples, cpreps))[: cache.samples]
        cal = calibrate_step_cache(
            pipe, [CalibSample(y=p["y"], context=p["ctx"], seed=s.seed) for s, p in use], gen, precision=label
        )
        where = f"calibrated on {len(use)} calibration sample(s) with these experts"
    else:
        where = f"{cache.calibration} ({cal.precision}, {cal.samples} samples)"
    t_cal = time.perf_counter() - t0
    rows = []
    for s, p, (lat_ref, fr_ref), ref in zip(samples, preps, refs, ref_rows):
        sc = StepCache(cache.config, cal)
        lat, frames, dt = _generate(pipe, p, gen, cache=sc)
        row = {
            **compare_to_uncached(frames, fr_ref, sc),
            "latent_rel_l2": relative_l2(lat, lat_ref),
            "denoise_s": dt,
            "uncached_denoise_s": ref["denoise_s"],
            **_task(frames, p, s),
        }
        if "direction" in row and "direction" in ref:
            row["direction_agree"] = float(row["direction"] == ref["direction"])
        rows.append(row)
    out = {
        "precision": label,
        "calibration": where,
        "calibrate_s": t_cal,
        "per_sample": rows,
        **{k: v for k, v in _summ(rows).items() if k not in ("psnr", "ssim")},
        **summarize(rows, gen.steps),
    }
    log(
        f"eval: {label} cached: {out['computed']:.1f}/{gen.steps} forwards computed ({out['speedup_forwards']:.2f}x "
        f"fewer), PSNR {out['psnr_mean']:.2f} (min {out['psnr_min']:.2f}) dB, SSIM {out['ssim_mean']:.4f} vs uncached, "
        f"denoise {out['denoise_s']:.1f} s (uncached {out['uncached_denoise_s']:.1f} s)"
    )
    return out


def _eta(done: int, total: int, t0: float) -> str:
    if done <= 0:
        return ""
    left = (time.perf_counter() - t0) / done * (total - done)
    return f", ETA {left:.0f} s" if left >= 1 else ""


# ------------------------------------------------------------------------------------------------ the driver
def run_eval(
    pipe,
    eval_samples: Sequence[EvalSample],
    calib_samples: Sequence[EvalSample],
    gen,
    out_dir: str,
    *,
    recipes: Sequence[str] = ("rtn", "smoothquant", "quarot", "svdquant", "seed", "default", "w8a8"),
    ablations: Sequence[str] | bool = False,
    reservoir: int = 256,
    eval_reservoir: int = 128,
    calib_seed: int = 0,
    plot_layers: Sequence[str] = ("self_attn.q", "ffn.fc2"),
    heatmaps: bool = True,
    log: Callable[[str], None] = print,
    progress: bool = False,
    cache=None,
) -> dict:
    """Evaluates ``recipes`` (and ablations of ``default``: True for all of `ABLATIONS`, or a list of names) on
    ``eval_samples`` against the BF16 ``pipe``; calibrates on ``calib_samples`` (``reservoir`` rows per layer input and
    step drawn with ``calib_seed``). Writes ``out_dir/report.md``, ``results.json`` and ``plots/*.png``; returns the results dict (see `wanjax.evaluation.report`).

    ``cache``: a `wanjax.evaluation.cache.CacheEval`: also run every precision with the step cache and compare it
    with that precision's uncached run (``results["bf16"]["cache"]``, ``variant["cache"]``); its calibration file,
    if one is named, is read and checked against ``gen`` before any model work."""
    from wanjax.evaluation import plots
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.quant.apply import attach_to_pipeline
    from wanjax.quant.calibrate import CalibConfig, CalibSample, calibrate
    from wanjax.quant.quantize import quantize
    from wanjax.quant.recipes import recipe_to_dict
    from wanjax.quant.step_cache import precision_label

    t_start = time.perf_counter()
    eval_samples, calib_samples = list(eval_samples), list(calib_samples)
    if not eval_samples or not calib_samples:
        raise ValueError(
            f"run_eval: need evaluation and calibration samples, got {len(eval_samples)} and {len(calib_samples)}"
        )
    disjoint = check_disjoint(eval_samples, calib_samples)
    variants = plan_variants(recipes, ablations)
    check_settings(gen, variants)  # before any model work: bins vs steps
    if cache is not None:
        cache.validate()
    cache_cal = _cache_calibration(cache, gen)  # a file named: read and checked before any model work
    fine, layouts = _bin_layouts(gen)
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)

    n_prep = len(eval_samples) + len(calib_samples)
    log(f"eval: preparing {len(eval_samples)} eval + {len(calib_samples)} calibration samples (text encoder, VAE)")
    t0 = time.perf_counter()
    preps, cpreps = [], []
    for i, s in enumerate(list(eval_samples) + list(calib_samples)):
        (preps if i < len(eval_samples) else cpreps).append(_prepare(pipe, s, gen))
        log(f"eval: prepared {i + 1}/{n_prep} {s.name}{_eta(i + 1, n_prep, t0)}")
    log(
        f"eval: calibrating on {len(calib_samples)} samples, then capturing the eval set's layer inputs "
        f"({gen.steps} steps each)"
    )
    t0 = time.perf_counter()
    calib = calibrate(
        pipe,
        [CalibSample(y=p["y"], context=p["ctx"], seed=s.seed) for s, p in zip(calib_samples, cpreps)],
        CalibConfig(gen=gen, bins=fine, reservoir=reservoir, hessian_per_bin=False, seed=calib_seed),
        work_dir=os.path.join(out_dir, "work", "calib"),
        mode="online",
        progress=progress,
    )
    t_calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    cap = calibrate(
        pipe,
        [CalibSample(y=p["y"], context=p["ctx"], seed=s.seed) for s, p in zip(eval_samples, preps)],
        CalibConfig(gen=gen, bins=fine, reservoir=eval_reservoir, hessian=False, cfg_mode="both"),
        work_dir=os.path.join(out_dir, "work", "eval_capture"),
        mode="online",
        progress=progress,
    )
    t_capture = time.perf_counter() - t0
    log(f"eval: calibration {t_calib:.1f} s, eval-set capture {t_capture:.1f} s")

    split = {"high": pipe._params_high, "low": pipe._params_low}
    ref_models = {e: nnx.merge(pipe.graphdef, split[e]) for e in ("high", "low")}
    refs, bf16_rows = [], []
    t0 = time.perf_counter()
    for i, (s, p) in enumerate(zip(eval_samples, preps)):
        lat, frames, dt = _generate(pipe, p, gen)
        refs.append((lat, frames))
        bf16_rows.append({"denoise_s": dt, **_task(frames, p, s)})
        log(f"eval: bf16 clip {i + 1}/{len(eval_samples)} {s.name} {dt:.1f} s{_eta(i + 1, len(eval_samples), t0)}")
    bf16 = {
        "name": "bf16",
        "group": "reference",
        "per_sample": bf16_rows,
        **_summ(bf16_rows),
        "weight_bytes": _bytes(split),
        "block_linear_bytes": sum(_block_linear_bytes(m) for m in ref_models.values()),
    }
    log(f"eval: bf16 {bf16['denoise_s']:.1f} s/clip, frame-0 PSNR {bf16['frame0_psnr']:.2f} dB")
    cache_args = (cache, cache_cal, gen, eval_samples, preps)
    if cache is not None:
        bf16["cache"] = _eval_cache(pipe, "bf16", *cache_args, refs, bf16_rows, calib_samples, cpreps, log)

    L = pipe.cfg.num_layers
    blocks = sorted({0, L // 2, L - 1})
    act_plots = {}
    for e in ("high", "low"):
        rng = activation_ranges(cap, e, [(b, l) for b in blocks for l in plot_layers])
        act_plots[e] = os.path.relpath(
            plots.activation_range_plot(
                rng,
                f"{e}-noise expert: layer input range over timesteps (eval set, BF16)",
                os.path.join(out_dir, "plots", f"act_range_{e}.png"),
            ),
            out_dir,
        )
    out = {
        "gen": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(gen).items()},
        "eval_set": [s.name for s in eval_samples],
        "calib_set": [s.name for s in calib_samples],
        "disjoint": disjoint,
        "calib": {"reservoir": reservoir, "seed": calib_seed},
        "bf16": bf16,
        "variants": [],
        "act_range_plots": act_plots,
        "step_bins": fine.table(),
        "seconds": {"calibrate": t_calib, "eval_capture": t_capture, "total": 0.0},
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "complete": False,
        "planned": [v.name for v in variants],
    }
    if cache is not None:
        out["cache"] = {
            "config": dataclasses.asdict(cache.config),
            "calibration": cache.calibration or f"per precision, {cache.samples} calibration sample(s)",
        }
    sources: dict = {}
    results = out["variants"]
    t_variants = time.perf_counter()
    for k, v in enumerate(variants):
        log(f"eval: variant {k + 1}/{len(variants)} {v.name}: quantizing")
        bins = layouts[v.bins]()
        if v.bins not in sources:
            sources[v.bins] = (RebinnedSource(calib, bins), RebinnedSource(cap, bins))
        src, eval_src = sources[v.bins]
        t0 = time.perf_counter()
        q, reps = quantize(ref_models, v.recipe, src, progress=progress)
        t_quant = time.perf_counter() - t0
        qp = WanI2VPipeline(ref_models["high"], ref_models["low"], pipe.vae)
        attach_to_pipeline(qp, q["high"], q["low"], bins)
        rows, own = [], []
        for i, (s, p, (lat_ref, fr_ref)) in enumerate(zip(eval_samples, preps, refs)):
            lat, frames, dt = _generate(qp, p, gen)
            if cache is not None:
                own.append((lat, frames))
            rows.append(
                {
                    "psnr": psnr(frames, fr_ref),
                    "ssim": ssim(frames, fr_ref, data_range=255.0),
                    "latent_rel_l2": relative_l2(lat, lat_ref),
                    "denoise_s": dt,
                    **_task(frames, p, s),
                }
            )
            log(f"eval: variant {k + 1}/{len(variants)} {v.name}: clip {i + 1}/{len(eval_samples)} {s.name} {dt:.1f} s")
        sq_eval = {e: layer_sqnr_table(q[e], ref_models[e], eval_src, e) for e in ("high", "low")}
        sq_calib = {e: reps[e]["sqnr_db"] for e in ("high", "low")}
        r = {
            "name": v.name,
            "group": v.group,
            "recipe": v.recipe.name,
            "bins": v.bins,
            "calibration": v.recipe.calibration,
            "what": v.what,
            "bin_names": {e: list(bins.expert_bins(e)) for e in ("high", "low")},
            "per_sample": rows,
            **_summ(rows),
            "quantize_s": t_quant,
            "weight_bytes": _bytes({e: nnx.state(q[e]) for e in q}),
            "block_linear_bytes": sum(_block_linear_bytes(m) for m in q.values()),
            "sqnr_eval_mean": float(np.mean([np.mean(list(t.values())) for t in sq_eval.values()])),
            "sqnr_eval_min": float(np.min([np.min(list(t.values())) for t in sq_eval.values()])),
            "sqnr_calib_mean": float(np.mean([np.mean(list(t.values())) for t in sq_calib.values()])),
            "sqnr_eval": {e: {p: np.asarray(a).tolist() for p, a in t.items()} for e, t in sq_eval.items()},
        }
        if cache is not None:
            label = precision_label(dict(recipe_to_dict(v.recipe), name=v.name))
            r["cache"] = _eval_cache(qp, label, *cache_args, own, rows, calib_samples, cpreps, log)
        if heatmaps and v.group == "recipe":
            r["plots"] = [
                os.path.relpath(
                    plots.sqnr_heatmap(
                        sq_eval[e],
                        bins.expert_bins(e),
                        f"{v.name}: layer SQNR (dB), {e}-noise expert, eval set",
                        os.path.join(out_dir, "plots", f"sqnr_{v.name}_{e}.png"),
                    ),
                    out_dir,
                )
                for e in ("high", "low")
            ]
        results.append(r)
        _save(out, out_dir, t_start)  # a partial report after every variant
        log(
            f"eval: {v.name:14s} PSNR {r['psnr']:6.2f} dB  SSIM {r['ssim']:.4f}  latent rel-L2 {r['latent_rel_l2']:.4f}"
            f"  SQNR {r['sqnr_eval_mean']:5.1f} dB  quantize {t_quant:.1f} s  denoise {r['denoise_s']:.1f} s/clip"
            f"  [{k + 1}/{len(variants)}{_eta(k + 1, len(variants), t_variants)}]"
        )

    out["complete"] = True
    _save(out, out_dir, t_start)
    return out


def _save(out: dict, out_dir: str, t_start: float) -> None:
    out["seconds"]["total"] = time.perf_counter() - t_start
    write_json_atomic(os.path.join(out_dir, "results.json"), out, indent=1)
    write_report(out, out_dir)
