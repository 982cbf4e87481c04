"""The step cache's calibration for quantized experts: what ``wanjax quantize`` writes into the artifact as
``cache_calibration.json`` (issue 37, docs/CACHING.md), and `wanjax eval --cache` runs per precision.

The step cache (`wanjax.sampling.cache`) skips a step's block stack when the calibrated magnitude ratios of the
residual say it barely changes. Those ratios are per expert step and per CFG branch (cond, uncond), and they belong
to the experts that will run: for an artifact, the quantized ones. What the quantization calibration provides and
what has to be computed again:

* **reused**: the calibration samples as the calibration prepared them (`stored_samples`:
  the VAE-encoded condition, the text context of the prompt *and* the negative prompt, the noise seed) and its
  generation settings (frames, size, steps, shift, boundary, solver, guidance). No image, text encoder or VAE is
  needed again, so this works with ``wanjax quantize --stats DIR`` as well.
* **recomputed**: the trajectory and the residuals. The quantization calibration samples a conditional-only
  trajectory (``cfg_mode="cond"``) with the BF16 experts and records layer inputs, not residuals; the cache needs
  the residuals of both CFG rows, on the guided trajectory, of the quantized experts. So each of the first
  ``samples`` calibration samples (default `DEFAULT_SAMPLES`) is sampled once more, uncached, with the quantized
  experts (simulated W4A4, ``mode="fake"``: the experts `wanjax.quant.quantize.quantize` returned, before they are
  saved) and a recording `StepCache`: one guided generation (2 forwards a step) per sample.

Per-sample results are kept in ``resume_dir`` (``wanjax quantize``: ``WORK_DIR/step_cache/<key>/``, the key a hash
of the calibration manifest, the recipe, the precision and the settings), so a run interrupted after them does not
sample them again; the merged calibration goes into the artifact directory before it is published
(`save_artifact_with_cache`), so the artifact appears with it or not at all.

    cal = calibrate_step_cache(pipe, samples, gen, precision="bf16")               # the pipeline's own experts
    cal = artifact_step_cache(pipe, experts, stats, recipe_to_dict(recipe))      # quantized, from a calibration
    save_artifact_with_cache(qdir, experts, cal, recipe=..., bins=..., source=pipe)  # + qdir/cache_calibration.json
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Sequence

from wanjax.sampling.cache import CacheCalibration, CacheCalibrationError, StepCache, calibration_from_runs

__all__ = [
    "DEFAULT_SAMPLES",
    "artifact_step_cache",
    "calibrate_step_cache",
    "merge_calibrations",
    "precision_label",
    "record_sample",
    "save_artifact_with_cache",
    "stored_samples",
    "with_quantized_experts",
]

#: Calibration samples the step cache is calibrated on by default: the ratio curve hardly depends on the input (its
#: spread over samples is ~3e-4 on the mini model, docs/CACHING.md), so two are enough.
DEFAULT_SAMPLES = 2

_BITS = {"int4": 4, "mxfp4": 4, "nvfp4": 4, "int8": 8, "fp8": 8, "float8_e4m3fn": 8}


def precision_label(recipe: dict) -> str:
    """``"w4a4:<name>"`` (weight / activation bits from the recipe's formats, ``a16`` when weight-only) for a recipe
    dict (`wanjax.quant.recipes.recipe_to_dict`): the ``precision`` a calibration records."""
    w = (recipe.get("weight") or {}).get("fmt")
    a = (recipe.get("act") or {}).get("fmt") if recipe.get("act") else None
    return f"w{_BITS.get(w, w)}a{_BITS.get(a, a) if a else 16}:{recipe.get('name', '?')}"


def stored_samples(work_dir: str | os.PathLike):
    """The generation settings and the prepared samples of a finished stream-mode calibration in ``work_dir``
    (`wanjax.quant.calibrate.calibrate`): ``(gen, [CalibSample(y=..., context=..., seed=...)])`` from its manifest
    and its trajectory files ``traj/sample_<k>.npz`` (the VAE-encoded condition ``y``, the text context [2, L, D]
    of the prompt and the negative prompt in its own dtype; the noise seed from the manifest), so the samples can be
    sampled again without their images, the text encoder or the VAE.

    ``ValueError`` naming the file when the manifest is unreadable or a trajectory is missing (an online-mode
    calibration keeps none)."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from wanjax.generation_config import GenerationConfig
    from wanjax.quant.calibrate import CalibSample

    work_dir = os.fspath(work_dir)
    path = os.path.join(work_dir, "manifest.json")
    try:
        man = _manifest(work_dir)
        n, hashes, g = int(man["samples"]), man["sample_hashes"], dict(man["config"]["gen"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable calibration manifest ({type(e).__name__}: {e})") from None
    fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    g = {k: v for k, v in g.items() if k in fields}
    if "guide_scale" in g:
        g["guide_scale"] = tuple(float(v) for v in g["guide_scale"])
    gen = GenerationConfig(**g)
    samples = []
    for k in range(n):
        traj = os.path.join(work_dir, "traj", f"sample_{k:05d}.npz")  # as calibrate's stream mode names them
        if not os.path.isfile(traj):
            raise ValueError(f"{traj}: no trajectory of calibration sample {k} (an online-mode calibration keeps none)")
        with np.load(traj) as z:  # y and ctx stored as float32, ctx's own dtype by name
            y, ctx, ctx_dtype = z["y"], z["ctx"], str(z["ctx_dtype"])
        context = jnp.asarray(ctx, jnp.dtype(ctx_dtype))
        samples.append(CalibSample(y=jnp.asarray(y), context=context, seed=int(hashes[k]["seed"])))
    return gen, samples


def with_quantized_experts(pipe, experts: dict, bins):
    """A shallow copy of ``pipe`` that denoises with the quantized ``experts`` (``{"high", "low"}``) and ``bins``
    (`wanjax.quant.apply.attach_to_pipeline` on the copy); ``pipe`` itself keeps its experts, and the copy shares its
    VAE, text encoder and mesh."""
    from wanjax.quant.apply import attach_to_pipeline

    missing = sorted({"high", "low"} - set(experts))
    if missing:
        raise ValueError(f"with_quantized_experts: no {missing} expert among {sorted(experts)}")
    qpipe = copy.copy(pipe)
    attach_to_pipeline(qpipe, experts["high"], experts["low"], bins)
    return qpipe


def record_sample(pipe, sample, gen, *, precision: str = "bf16", progress: bool = False) -> CacheCalibration:
    """One uncached guided run of ``pipe`` (its current experts) on ``sample`` with a recording `StepCache`: the
    `CacheCalibration` of that single run (``samples=1``).

    ``sample``: a `wanjax.quant.calibrate.CalibSample` (a precomputed ``y`` / ``context`` is used as is, an image /
    prompt is encoded; the context needs both rows, positive and negative: the cache records both CFG branches);
    ``gen``: the settings (its seed is replaced by the sample's)."""
    import dataclasses

    from wanjax.quant.calibrate import _prepare

    gen = dataclasses.replace(gen, seed=int(sample.seed))
    y, ctx = _prepare(pipe, sample, gen, "both")  # a one-row (conditional-only) context is refused there
    rec = StepCache(record=True)
    _, experts = pipe.denoise(y, ctx, gen, progress=progress, cache=rec)
    sched = gen.sigma_schedule(pipe.cfg.num_train_timesteps)
    return calibration_from_runs(
        [rec.recorded],
        [int(t) for t in sched.timesteps],
        experts,
        steps=gen.steps,
        shift=gen.shift,
        boundary=gen.boundary,
        solver=gen.solver,
        precision=precision,
        rel_input=[rec.recorded_input],
        rel_output=[rec.recorded_output],
    )


def merge_calibrations(cals: Sequence[CacheCalibration]) -> CacheCalibration:
    """Calibrations of one setting, one run each (`record_sample`), averaged into one as if recorded together
    (`wanjax.sampling.cache.calibration_from_runs`: mean ratios, their spread, TeaCache's polynomial refitted);
    a calibration of several runs counts as one run (its mean curve)."""
    cals = list(cals)
    if not cals:
        raise ValueError("merge_calibrations: no calibrations")
    first = cals[0]
    for c in cals[1:]:
        if c.key() != first.key() or c.timesteps != first.timesteps or c.experts != first.experts:
            raise ValueError(
                f"merge_calibrations: calibrations of different settings ({first.key()} vs {c.key()}); "
                "merge only runs of one setting"
            )
    tea = all(c.tea for c in cals)
    return calibration_from_runs(
        [c.ratios for c in cals],
        first.timesteps,
        first.experts,
        steps=first.steps,
        shift=first.shift,
        boundary=first.boundary,
        solver=first.solver,
        precision=first.precision,
        rel_input=[c.tea["rel_input"] for c in cals] if tea else (),
        rel_output=[c.tea["rel_output"] for c in cals] if tea else (),
    )


def calibrate_step_cache(
    pipe,
    samples: Sequence,
    gen,
    *,
    precision: str = "bf16",
    resume_dir: str | os.PathLike | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> CacheCalibration:
    """The step cache's calibration of ``pipe``'s experts (BF16, or quantized ones attached) for ``gen``: one
    uncached guided run per sample (`record_sample`), merged (`merge_calibrations`).

    ``resume_dir``: each sample's calibration is written there (``sample_00000.json``, ...) when recorded and read
    back instead of sampling again when it exists and matches (settings and precision); None keeps nothing."""
    samples = list(samples)
    if not samples:
        raise ValueError("calibrate_step_cache: no samples")
    gen = gen.validate()
    cals = []
    for k, s in enumerate(samples):
        path = None if resume_dir is None else os.path.join(os.fspath(resume_dir), f"sample_{k:05d}.json")
        cal = _resumed(path, gen, precision, log)
        if cal is None:
            cal = record_sample(pipe, s, gen, precision=precision, progress=progress)
            if path is not None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if os.path.exists(path):  # a stale or unreadable one: replaced, not merged
                    os.remove(path)
                cal.save(path)
            if log:
                log(f"step cache: sample {k + 1}/{len(samples)} recorded ({gen.steps} steps, {precision})")
        cals.append(cal)
    return merge_calibrations(cals)


def _resumed(path, gen, precision, log) -> CacheCalibration | None:
    if path is None or not os.path.isfile(path):
        return None
    try:
        cal = CacheCalibration.load(path, gen.steps, gen.shift, gen.boundary, gen.solver)
    except CacheCalibrationError as e:
        if log:
            log(f"step cache: {path} not reused ({e}); sampling it again")
        return None
    if cal.precision != precision:
        return None
    if log:
        log(f"step cache: reusing {path}")
    return cal


def artifact_step_cache(
    pipe,
    experts: dict,
    stats,
    recipe: dict,
    *,
    samples: int = DEFAULT_SAMPLES,
    resume: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
) -> CacheCalibration:
    """The step cache's calibration of quantized ``experts`` (``{"high", "low"}`` from
    `wanjax.quant.quantize.quantize`, or an artifact directory, e.g. one written but not yet published, whose
    experts and bins are loaded: `wanjax.quant.artifact.load_artifact`) on the first ``samples`` samples of the
    quantization calibration ``stats`` (a `wanjax.quant.calibrate.CalibStats` or its work dir), at the settings that
    calibration used; ``pipe`` (the BF16 pipeline they were quantized from) is not modified.

    ``recipe``: the recipe dict (`wanjax.quant.recipes.recipe_to_dict`), for the ``precision`` label and the
    resume key. ``resume``: keep per-sample results under ``WORK_DIR/step_cache/<key>/`` (pass False when the work
    dir is an input that must not be written to). ``ValueError`` when the calibration kept no trajectories (an
    online-mode calibration) or ``samples < 1``."""
    from wanjax.quant.bins import TimestepBins

    if samples < 1:
        raise ValueError(f"artifact_step_cache: samples must be >= 1, got {samples}")
    work_dir = os.fspath(getattr(stats, "work_dir", stats))
    gen, prepared = stored_samples(work_dir)
    bins = stats.bins if hasattr(stats, "bins") else TimestepBins.from_dict(_manifest(work_dir)["config"]["bins"])
    if isinstance(experts, (str, os.PathLike)):
        from wanjax.quant.artifact import load_artifact

        experts, manifest = load_artifact(experts, ("high", "low"))
        bins = TimestepBins.from_dict(manifest["bins"])
    precision = precision_label(recipe)
    resume_dir = None
    if resume:
        key = {
            "calibration": hashlib.sha256(json.dumps(_manifest(work_dir), sort_keys=True).encode()).hexdigest(),
            "recipe": recipe,
            "precision": precision,
            "gen": gen.to_dict(),
            "mode": "fake",
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        resume_dir = os.path.join(work_dir, "step_cache", digest)
    qpipe = with_quantized_experts(pipe, experts, bins)
    return calibrate_step_cache(
        qpipe, prepared[:samples], gen, precision=precision, resume_dir=resume_dir, progress=progress, log=log
    )


def _manifest(work_dir: str) -> dict:
    with open(os.path.join(work_dir, "manifest.json")) as f:
        return json.load(f)


def save_artifact_with_cache(qdir, experts: dict, calibration: CacheCalibration, *, overwrite: bool = False, **kw):
    """`wanjax.quant.artifact.save_artifact` (``kw``: ``recipe``, ``bins``, ``report``, ``source``, ``inputs``...)
    with ``calibration`` saved into the directory (``cache_calibration.json``), published together: the artifact is
    written under a temporary name beside ``qdir``, the calibration added, and the directory renamed into place
    (`wanjax.io.atomic.publish_dir`: an existing ``qdir``, with ``overwrite``, is replaced only then). Any error or
    interrupt leaves nothing behind. Returns ``qdir``."""
    from wanjax.io.atomic import check_not_overlapping, publish_dir
    from wanjax.quant.artifact import save_artifact

    qdir = os.path.abspath(os.fspath(qdir))
    inputs = tuple(kw.get("inputs", ())) + (getattr(kw.get("source"), "model_dir", None),)
    check_not_overlapping(qdir, *inputs, what="artifact directory")
    if os.path.exists(qdir) and not overwrite:
        raise FileExistsError(f"save_artifact_with_cache: {qdir} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(qdir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(qdir)}-cache-", dir=parent)
    try:
        staged = save_artifact(tmp, experts, overwrite=True, **kw)  # replaces the empty temporary dir
        calibration.save(staged)
        publish_dir(staged, qdir, inputs=[p for p in inputs if p], what="artifact directory")
    finally:
        if os.path.exists(tmp):  # not published: an error or an interrupt
            shutil.rmtree(tmp, ignore_errors=True)
    return qdir
