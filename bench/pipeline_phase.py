"""``bench.pipeline``'s pipeline phases: the I2V pipeline at full size with random weights, stage by stage.

One phase per expert variant (``--pipeline-experts w4a4,bf16``), each in its own process like the other phases:

* ``pipeline``       both W4A4 experts (default-recipe structure, RTN of the random bf16 weights, real kernels);
                     the phase keeps its old name, so earlier result files read the same.
* ``pipeline_bf16``  both BF16 experts (``random_bf16_expert``, 2 x 28.6 GB at full size).

Stage order: UMT5-XXL encode of (prompt, negative) and release -> both experts + VAE (placed by
``WanI2VPipeline``'s ``expert_placement``: "auto" keeps both on the device unless they take more than 60 % of its
memory, then the inactive one waits in host memory and is swapped in at the boundary; when it will be swapped, the
low-noise expert is built first and moved to the host before the high-noise one is made, so the two never share the
device) -> VAE encode of the condition -> ``--pipeline-steps`` guided steps through ``WanI2VPipeline.denoise``
(CFG batch 2 or two passes, the official schedule and expert switch) -> chunked VAE decode.

Recorded per step: expert, timestep, seconds (blocking), memory; the first step compiles the guided velocity (one
compilation serves both experts). Per expert: the median of its warm steps; an expert whose steps in the loop were
all compile steps gets one extra warm step after the loop (``extra_warm_steps``), so both experts always have a warm
time. Swaps (device <-> host) are timed on their own.

Time budget: the denoise loop stops cleanly before a step that would not fit in the phase's deadline (the
orchestrator's timeout for the phase, ``--pipeline-budget-s`` if smaller), keeping room for the VAE decode
(1.2 x the VAE encode time; at full size the decode took 0.86 x the encode). The decode then runs on the latent
reached. A stopped run reports the steps done, the measured loop time, and the rest of the steps **extrapolated**
from each expert's warm step time (plus the remaining swaps): ``denoise.extrapolated_s`` and
``generation.extrapolated``, never mixed with the measured numbers.
``peak_bytes_in_use`` never resets in JAX, so the number after each stage is the peak so far.
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import numpy as np

from bench.common import device_facts, memory, state_bytes
from bench.dit_step import RES, get_config, memory_analysis
from bench.phase_runner import PhaseRecord, brief, error_text, log
from bench.random_weights import fill_random, random_array, random_bf16_expert
from bench.w4a4_expert import build_w4a4_expert, default_bins
from bench import pipeline_variants

#: the device memory the pipeline should fit in (its peak is compared with it)
MEMORY_TARGET_BYTES = 24e9
#: --pipeline-experts variant -> phase name
PIPELINE_PHASES = {"w4a4": "pipeline", "bf16": "pipeline_bf16"}
#: the time kept for the VAE decode after the denoise loop, in units of the VAE encode's time
DECODE_RESERVE = 1.2
#: seconds a phase run as a child stops before its orchestrator deadline (result file, process exit)
DEADLINE_MARGIN_S = 10.0


class OutOfTime(Exception):
    """Raised from the denoise loop's velocity before a step that would not fit in the phase's deadline."""


def _t5_config(cfg):
    import jax.numpy as jnp

    from wanjax.model.t5 import UMT5_XXL, T5Config

    if cfg.text_dim == UMT5_XXL.dim:
        return UMT5_XXL.replace(text_len=cfg.text_len)
    return T5Config(
        vocab_size=300,
        dim=cfg.text_dim,
        dim_attn=cfg.text_dim,
        dim_ffn=2 * cfg.text_dim,
        num_heads=4,
        num_layers=2,
        text_len=cfg.text_len,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )


def _vae_config(cfg):
    from wanjax.config import I2V_A14B
    from wanjax.model.vae import WAN21_VAE

    return WAN21_VAE if cfg == I2V_A14B else WAN21_VAE.replace(base_dim=4)


def encode_text_stage(cfg, seed: int) -> tuple[object, dict]:
    """UMT5 encoder (full UMT5-XXL for the full config) with random weights: encode 2 random prompts of
    ``text_len`` tokens (positive, negative), then release it. Returns (context [2, L, D], record)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from wanjax.model.t5 import UMT5Encoder

    tcfg = _t5_config(cfg)
    t0 = time.perf_counter()
    enc = fill_random(nnx.eval_shape(lambda: UMT5Encoder(tcfg, rngs=nnx.Rngs(0))), seed + 100)
    graphdef, state = nnx.split(enc)
    del enc
    jax.block_until_ready(state)
    rec = {
        "params": int(sum(math.prod(a.shape) for a in jax.tree.leaves(state))),
        "weight_bytes": state_bytes(state),
        "init_s": time.perf_counter() - t0,
    }
    ids = jnp.asarray(np.random.default_rng(seed + 7).integers(0, tcfg.vocab_size, (2, cfg.text_len)), jnp.int32)
    mask = jnp.ones((2, cfg.text_len), jnp.int32)
    t0 = time.perf_counter()
    encode = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    ctx = jax.block_until_ready(encode(state, ids, mask))
    rec["encode_first_call_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()  # a second call, compiled: what a second video in the same process pays
    jax.block_until_ready(encode(state, ids, mask))
    rec["encode_warm_s"] = time.perf_counter() - t0
    rec["finite"] = bool(jnp.isfinite(ctx.astype(jnp.float32)).all())
    rec["before_release"] = memory()
    del state
    rec["after_release"] = memory()
    return ctx, rec


def _cfg_two_pass_velocity(bins, graphdef, params, x, y, ctx, t, guide, constrain=None):
    """Guided velocity with the conditional and unconditional passes run one after the other at batch 1 (the
    signature of ``WanI2VPipeline.replace_experts``'s ``velocity`` once ``bins`` is bound; unsharded only)."""
    import jax.numpy as jnp
    from flax import nnx

    from wanjax.quant.qlinear import active_bin

    model = nnx.merge(graphdef, params)
    inp = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    with active_bin(bins.local_lookup(t)):
        v_c = model(inp, tt, ctx[:1])
        v_u = model(inp, tt, ctx[1:2])
    return v_u + guide * (v_c - v_u)


def resolve_placement(placement: str, expert_state) -> str:
    """The placement ``WanI2VPipeline(expert_placement=placement)`` picks for two experts of ``expert_state``'s
    size, by the pipeline's own rule (known before the second expert is made)."""
    import types

    from wanjax.pipeline import WanI2VPipeline

    probe = types.SimpleNamespace(_params_high=expert_state, _params_low=expert_state)
    return WanI2VPipeline._choose_placement(probe, placement)


def _to_host(module):
    """The module with its arrays copied to host memory (its device arrays are freed with the last reference)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.device_get(state))


def _deadline(args, t_phase: float) -> float | None:
    """The phase's deadline on the ``perf_counter`` clock: the orchestrator's (``--deadline``, epoch seconds,
    minus ``DEADLINE_MARGIN_S``) or ``--pipeline-budget-s`` from the phase's start, whichever comes first."""
    ends = []
    if getattr(args, "deadline", None):
        ends.append(t_phase + (args.deadline - time.time()) - DEADLINE_MARGIN_S)
    if getattr(args, "pipeline_budget_s", None):
        ends.append(t_phase + args.pipeline_budget_s)
    return min(ends) if ends else None


def step_estimate(steps: list[dict], expert: str) -> tuple[float | None, str]:
    """(seconds, basis) of one more guided step of ``expert``: the median of its warm steps, else of any warm step,
    else the first (compile) step's time. Steps are warm except the first of the run (``i`` 0)."""
    own = [s["s"] for s in steps if s.get("expert") == expert and s.get("warm")]
    if own:
        return statistics.median(own), f"{expert} warm median"
    warm = [s["s"] for s in steps if s.get("warm")]
    if warm:
        return statistics.median(warm), "other expert's warm median"
    if steps:
        return steps[0]["s"], "first step (compile included)"
    return None, "nothing measured"


def per_expert(steps: list[dict]) -> dict:
    out = {}
    for name in ("high", "low"):
        mine = [s for s in steps if s.get("expert") == name]
        warm = [s["s"] for s in mine if s.get("warm")]
        out[name] = {
            "steps": sum(1 for s in mine if s.get("in_loop")),
            "warm_s": warm,
            "warm_median_s": statistics.median(warm) if warm else None,
            "first_s": mine[0]["s"] if mine else None,
            "first_compiles": bool(mine and not mine[0]["warm"]),
        }
    return out


def extrapolate(
    planned: list[str], done: int, steps: list[dict], swaps: list[dict], placement: str, resident: str | None
) -> dict:
    """The denoise time of the ``planned`` steps (expert per step) not run, from the measured step times."""
    rest = planned[done:]
    est, basis = 0.0, {}
    for name in rest:
        s, b = step_estimate(steps, name)
        if s is None:
            return {"error": "no step measured"}
        est += s
        basis[name] = b
    n_swaps = 0
    if placement == "swap":
        cur = resident
        for name in rest:
            n_swaps += name != cur
            cur = name
    swap_s = statistics.median([w["s"] for w in swaps]) if swaps else None
    if n_swaps:
        est += swap_s or 0.0
    return {
        "steps_left": len(rest),
        "steps_left_by_expert": {e: rest.count(e) for e in ("high", "low")},
        "steps_left_s": est,
        "basis": basis,
        "swaps_left": n_swaps,
        "swap_s_basis": swap_s if n_swaps else None,
        "note": "EXTRAPOLATED, not measured: the steps not run at the measured warm step time of their expert"
        + ("" if not n_swaps or swap_s else "; the remaining swap is not counted (none measured)"),
    }


def phase_pipeline(args, workdir: str) -> dict:
    """The pipeline with both W4A4 experts resident (phase ``pipeline``)."""
    return run_pipeline(args, workdir, "w4a4")


def phase_pipeline_bf16(args, workdir: str) -> dict:
    """The pipeline with both BF16 experts (phase ``pipeline_bf16``)."""
    return run_pipeline(args, workdir, "bf16")


def run_pipeline(args, workdir: str, experts: str) -> dict:
    """The I2V pipeline with both ``experts`` ("w4a4" / "bf16") experts, stage by stage (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from wanjax.model.vae import init_vae
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.quant.apply import attach_to_pipeline

    t_phase = time.perf_counter()
    deadline = _deadline(args, t_phase)
    phase = PIPELINE_PHASES[experts]
    rec = PhaseRecord(workdir, phase)
    rec.update(device_facts())
    cfg = get_config(args.config)
    res = args.res[0]
    latent, (frames, height, width) = RES[res]
    label = {"w4a4": "W4A4", "bf16": "BF16"}[experts]
    rec.update(
        experts=experts,
        res=res,
        cfg_mode=args.cfg_mode,
        steps=args.pipeline_steps,
        stages={},
        target_bytes=MEMORY_TARGET_BYTES,
        time_budget_s=None if deadline is None else deadline - t_phase,
        skipped_stages=["t5"] * args.skip_t5 + ["vae_encode", "vae_decode"] * args.skip_vae,
        order="T5 encode + release -> experts + VAE -> VAE encode -> denoise (CFG) -> VAE decode",
    )
    st = rec["stages"]

    def stage(name, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
            st[name] = (st.get(name) or {}) | {"s": time.perf_counter() - t0} | memory()
        except Exception as e:
            st[name] = (st.get(name) or {}) | {"error": error_text(e)} | memory()
            out = None
        log(f"{phase} {name}:", brief(st[name]))
        rec.save()
        return out

    if args.skip_t5:
        ctx = random_array(5, (2, cfg.text_len, cfg.text_dim), jnp.bfloat16)
    else:

        def t5():
            c, r = encode_text_stage(cfg, args.seed)
            st["t5"] = r
            return c

        ctx = stage("t5", t5)
        if ctx is None:
            ctx = random_array(5, (2, cfg.text_len, cfg.text_dim), jnp.bfloat16)
    bins = default_bins()
    nbins = len(bins.expert_bins("high"))

    def build(seed):
        if experts == "w4a4":
            return build_w4a4_expert(cfg, seed=seed, nbins=nbins, rank=args.rank)
        return random_bf16_expert(cfg, seed=seed)

    def make_experts():
        low = build(args.seed + 1)
        low_state = nnx.state(low)
        jax.block_until_ready(low_state)
        placement = resolve_placement(args.pipeline_placement, low_state)
        st["experts"] = {
            "expert_bytes": 2 * state_bytes(low_state),
            "placement_requested": args.pipeline_placement,
            "placement": placement,
        }
        del low_state
        if placement == "swap":  # the low-noise expert waits on the host: the two never share the device
            low = _to_host(low)
        high = build(args.seed)
        vae = init_vae(_vae_config(cfg), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        pipe = WanI2VPipeline(high, low, vae, expert_placement=placement)
        if experts == "w4a4":
            attach_to_pipeline(pipe, high, low, bins)
        if args.cfg_mode == "twopass":
            pipe.replace_experts(high, low, velocity=functools.partial(_cfg_two_pass_velocity, bins))
        jax.block_until_ready(pipe._params_high)
        rec["placement"] = pipe.expert_placement
        return pipe

    pipe = stage("experts", make_experts)
    if pipe is None:
        return rec
    lora_rank = getattr(args, "pipeline_lora_rank", 0)
    if lora_rank and experts == "w4a4":
        st["lora"] = {}
        stage("lora", lambda: st["lora"].update(pipeline_variants.apply_random_loras(pipe, cfg, lora_rank, 7, workdir)))
    elif lora_rank:
        rec["lora_note"] = (
            "BF16 experts: a LoRA is merged into the weights (no change to the forward's cost); not applied here"
        )
    image = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    max_area = height * width + height + width  # the official size rule floors 480x832 at "480p" to 464x832

    def vae_encode():
        y, hw = pipe.prepare_condition(image, frames, max_area)
        if tuple(hw) != (height, width) or tuple(y.shape[1:4]) != tuple(latent):
            raise ValueError(f"condition is {tuple(y.shape)} for {hw}, expected latent {latent}")
        return jax.block_until_ready(y)

    if args.skip_vae:
        f, h, w = latent
        y = jnp.zeros((1, f, h, w, cfg.in_dim - cfg.out_dim), jnp.float32)
    else:
        y = stage("vae_encode", vae_encode)
        if y is None:
            return rec
    gen = pipeline_variants.generation_config(args, frames)
    rec.update(preset=getattr(args, "pipeline_preset", "official"), lora_rank=lora_rank, gen=gen.describe())
    planned = [pipe.expert_for(int(t), gen.boundary) for t in gen.sigma_schedule(cfg.num_train_timesteps).timesteps]
    steps, swaps, last = [], [], {}
    den = st["denoise"] = {
        "steps": steps,
        "steps_planned": len(planned),
        "planned_by_expert": {e: planned.count(e) for e in ("high", "low")},
        "swaps": swaps,
    }
    reserve = 2.0 + (0.0 if args.skip_vae else DECODE_RESERVE * (st.get("vae_encode") or {}).get("s", 0.0))
    fetch = pipe.expert_params

    def timed_expert_params(name):  # times the swaps (host <-> device) on their own
        before, t0 = pipe.swaps, time.perf_counter()
        params = fetch(name)
        if pipe.swaps != before:
            jax.block_until_ready(params)
            swaps.append({"to": name, "s": time.perf_counter() - t0} | memory())
        return params

    pipe.expert_params = timed_expert_params

    def fits(name) -> tuple[bool, float]:
        est = step_estimate(steps, name)[0] or 0.0
        return deadline is None or time.perf_counter() + est + reserve <= deadline, est

    def timed_step(name, params, x, yy, c, t, guide, in_loop: bool):
        if float(guide) == 1.0:  # CFG off: the conditional forward alone, as WanI2VPipeline.denoise runs it
            c = c[:1]
        t0 = time.perf_counter()
        v = jax.block_until_ready(pipe._velocity(params, x, yy, c, t, guide))
        steps.append(
            {
                "i": len(steps),
                "expert": name,
                "t": float(t),
                "s": time.perf_counter() - t0,
                "warm": bool(steps),
                "in_loop": in_loop,
            }
            | memory()
        )
        return v

    def timed_velocity(name, params, x, yy, c, t, guide):
        cap = getattr(args, "pipeline_uncached_steps", 0)
        if cap and len(steps) >= cap:
            raise OutOfTime(f"--pipeline-uncached-steps {cap}: the other steps are extrapolated")
        if steps:
            ok, est = fits(name)
            if not ok:
                raise OutOfTime(
                    f"step {len(steps) + 1} of {len(planned)} ({name}, ~{est:.1f}s) and the VAE decode "
                    f"(~{reserve:.1f}s) would end past the phase's time budget"
                )
        last["x"] = x
        v = timed_step(name, params, x, yy, c, t, guide, True)
        if len(steps) == 1 or len(steps) % 5 == 0:
            log(f"{phase} step {len(steps)}/{len(planned)} {name}: {steps[-1]['s']:.2f}s")
            rec.save()
        return v

    def denoise():
        t0 = time.perf_counter()
        try:
            lat, used = pipe.denoise(y, ctx, gen, progress=False, velocity_fn=timed_velocity)
            lat = jax.block_until_ready(lat)
            den.update(stopped_early=False)
        except OutOfTime as e:
            lat, used = last["x"], [s["expert"] for s in steps]
            den.update(stopped_early=True, stop_reason=str(e))
            log(f"{phase}: denoise stopped cleanly after {len(steps)} of {len(planned)} steps: {e}")
        den.update(loop_s=time.perf_counter() - t0, steps_done=len(steps), experts_used=used)
        for name in ("high", "low"):  # a warm step of each expert (its loop steps may all have compiled)
            if any(s["expert"] == name and s["warm"] for s in steps):
                continue
            ok, _ = fits(name)
            if not ok:
                den.setdefault("extra_warm_steps_skipped", []).append(name)
                continue
            t = next((s["t"] for s in steps if s["expert"] == name), 999.0 if name == "high" else 500.0)
            g = gen.guide_scale[1] if name == "high" else gen.guide_scale[0]
            timed_step(name, pipe.expert_params(name), lat, y, ctx, jnp.float32(t), jnp.float32(g), False)
        den["extra_warm_steps"] = [s for s in steps if not s["in_loop"]]
        den["per_expert"] = per_expert(steps)
        if den["stopped_early"]:
            loop_steps = [s for s in steps if s["in_loop"]]
            den["extrapolation"] = extrapolate(
                planned, len(loop_steps), steps, swaps, pipe.expert_placement, getattr(pipe, "_resident", None)
            )
            if "steps_left_s" in den["extrapolation"]:
                den["extrapolated_s"] = den["loop_s"] + den["extrapolation"]["steps_left_s"]
        try:  # XLA's own account of one guided step (the executable is cached: no second compilation)
            resident = getattr(pipe, "_resident", "high")
            den["step_memory_analysis"] = memory_analysis(
                pipe._velocity.lower(
                    pipe.expert_params(resident), lat, y, ctx, jnp.float32(900.0), jnp.float32(3.5)
                ).compile()
            )
        except Exception as e:
            den["step_memory_analysis"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
        return lat

    lat = stage("denoise", denoise)
    specs = pipeline_variants.cache_specs(getattr(args, "pipeline_cache", ""))
    if lat is not None and specs:

        def cached():
            def fits_s(s):
                return deadline is None or time.perf_counter() + s + reserve <= deadline

            rec["cache_runs"] = pipeline_variants.run_cached(
                pipe, y, ctx, gen, specs, args.pipeline_cache_calibration, rec, fits_s, log
            )

        stage("cache_runs", cached)
    if lat is not None and not args.skip_vae:

        def vae_decode():
            video = jax.block_until_ready(pipe.decode(lat))
            st["vae_decode"] = {
                "shape": list(video.shape),
                "finite": bool(jnp.isfinite(video).all()),
                "input": "the latent after the last step run" if den.get("stopped_early") else "the final latent",
            }

        stage("vae_decode", vae_decode)
    if getattr(args, "pipeline_warm_repeat", False) and lat is not None and not den.get("stopped_early"):
        first = sum((st.get(k) or {}).get("s") or 0.0 for k in ("vae_encode", "vae_decode")) + den.get("loop_s", 0.0)
        if deadline is not None and time.perf_counter() + first + 2.0 > deadline:
            st["warm_repeat"] = {"skipped": f"would not fit the phase's time budget (~{first:.0f} s)"}
        else:

            def warm_repeat():
                out, t0 = {}, time.perf_counter()
                y2 = y
                if not args.skip_vae:
                    y2 = jax.block_until_ready(pipe.prepare_condition(image, frames, max_area)[0])
                    out["vae_encode_s"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                lat2 = jax.block_until_ready(pipe.denoise(y2, ctx, gen, progress=False)[0])
                out["denoise_s"] = time.perf_counter() - t1
                if not args.skip_vae:
                    t2 = time.perf_counter()
                    jax.block_until_ready(pipe.decode(lat2))
                    out["vae_decode_s"] = time.perf_counter() - t2
                t5 = (st.get("t5") or {}).get("encode_first_call_s")
                t5w = (st.get("t5") or {}).get("encode_warm_s")
                out["total_s"] = time.perf_counter() - t0
                out["total_with_t5_first_call_s"] = None if t5 is None else out["total_s"] + t5
                out["total_with_t5_warm_s"] = None if t5w is None else out["total_s"] + t5w
                out["note"] = (
                    "the same generation again in the same process, everything compiled; the text encoder is "
                    "released after its stage, so its second (compiled) call, timed there, is added in "
                    "total_with_t5_warm_s, and its first call, compilation included, in total_with_t5_first_call_s"
                )
                st["warm_repeat"] = out

            stage("warm_repeat", warm_repeat)
    peaks = [s.get("peak_bytes_in_use") for s in st.values() if isinstance(s, dict)]
    peaks = [p for p in peaks if p is not None]
    rec["peak_bytes"] = max(peaks) if peaks else None
    rec["meets_target"] = None if rec["peak_bytes"] is None else rec["peak_bytes"] <= MEMORY_TARGET_BYTES
    rec["generation"] = generation_time(rec)
    fixed = [rec["generation"]["parts_s"].get(k) for k in ("t5", "vae_encode", "vae_decode")]
    for run in rec.get("cache_runs") or []:
        if "loop_s" in run and None not in fixed:
            run["generation_s"] = sum(fixed) + run["loop_s"]
    rec["phase_s"] = time.perf_counter() - t_phase
    log(f"{phase} ({label} experts, {rec.get('placement')}): generation", rec["generation"])
    rec.save()
    return rec


def generation_time(p: dict) -> dict:
    """Full generation wall time of a pipeline record: T5 encode + VAE encode + denoise loop + VAE decode (first
    calls, compilation included; weight loading/creation excluded). Uses the extrapolated denoise time when the
    loop stopped early, and says so. Stages skipped by flag (``--skip-t5``, ``--skip-vae``) are left out and listed
    in ``not_included``; a failed stage leaves the total None."""
    st = p.get("stages") or {}
    den = st.get("denoise") or {}
    stopped = bool(den.get("stopped_early"))
    skipped = set(p.get("skipped_stages") or [])
    parts = {
        "t5": (st.get("t5") or {}).get("encode_first_call_s"),
        "vae_encode": (st.get("vae_encode") or {}).get("s"),
        "denoise": den.get("extrapolated_s") if stopped else den.get("loop_s"),
        "vae_decode": (st.get("vae_decode") or {}).get("s"),
    }
    missing = [k for k, v in parts.items() if v is None and k not in skipped]
    out = {
        "steps": den.get("steps_planned"),
        "steps_run": den.get("steps_done"),
        "extrapolated": stopped,
        "parts_s": {k: v for k, v in parts.items() if k not in skipped},
        "s": None if missing else sum(v for k, v in parts.items() if k not in skipped),
        "excludes": "weight creation/loading (random weights here), VAE/T5 init",
    }
    if skipped:
        out["not_included"] = sorted(skipped)
    if missing:
        out["missing"] = missing
    if stopped:
        out["note"] = (
            f"EXTRAPOLATED: {den.get('steps_done')} of {den.get('steps_planned')} denoise steps measured "
            f"({_f(den.get('loop_s'))} s), the rest at the warm step time of their expert"
        )
    return out


def _f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def pipeline_summary(p: dict) -> dict:
    """The numbers of one pipeline phase's record that the summary and the table report."""
    st = p.get("stages") or {}
    den = st.get("denoise") or {}
    loop = [s for s in den.get("steps") or [] if isinstance(s, dict) and s.get("in_loop", True)]
    warm = [s["s"] for s in loop[1:] if "s" in s]  # the first step compiles
    per = den.get("per_expert") or {}
    g = p.get("generation") or {}
    return {
        "experts": p.get("experts"),
        "placement": p.get("placement"),
        "cfg_mode": p.get("cfg_mode"),
        "steps_planned": den.get("steps_planned"),
        "steps_done": den.get("steps_done"),
        "stopped_early": den.get("stopped_early"),
        "t5_encode_s": (st.get("t5") or {}).get("encode_first_call_s"),
        "vae_encode_s": (st.get("vae_encode") or {}).get("s"),
        "vae_decode_s": (st.get("vae_decode") or {}).get("s"),
        "first_step_s": loop[0].get("s") if loop else None,
        "step_warm_s": statistics.median(warm) if warm else None,
        "step_warm_s_by_expert": {e: (per.get(e) or {}).get("warm_median_s") for e in ("high", "low")},
        "swap_s": [w.get("s") for w in den.get("swaps") or []],
        "denoise_s": None if den.get("stopped_early") else den.get("loop_s"),
        "denoise_measured_s": den.get("loop_s"),
        "denoise_extrapolated_s": den.get("extrapolated_s"),
        "generation_s": g.get("s"),
        "generation_extrapolated": g.get("extrapolated"),
        "generation_not_included": g.get("not_included"),
        "peak_bytes": p.get("peak_bytes"),
        "meets_24GB": p.get("meets_target"),
    }


def pipeline_tables(results: dict) -> list[str]:
    """Markdown lines: the stage table of each pipeline phase, then one row per variant (full generation)."""
    lines, rows = [], []
    for variant, phase in PIPELINE_PHASES.items():
        p = results["phases"].get(phase)
        if not p or "skipped" in p and len(p) == 1:
            continue
        label = {"w4a4": "W4A4", "bf16": "BF16"}[variant]
        lines += [
            "",
            f"| pipeline stage (both {label} experts, {p.get('placement') or '?'}) | s | in use GB | peak so far GB |",
            "|---|---|---|---|",
        ]
        for name, s in (p.get("stages") or {}).items():
            if not isinstance(s, dict):
                continue
            note = f" (error: {s['error'].splitlines()[0][:60]})" if s.get("error") else ""
            lines.append(
                f"| {name}{note} | {_f(s.get('s'))} | {_f((s.get('bytes_in_use') or 0) / 1e9 or None)} | "
                f"{_f((s.get('peak_bytes_in_use') or 0) / 1e9 or None)} |"
            )
        if p.get("error") and not p.get("stages"):
            lines.append(f"| (phase failed: {str(p['error']).splitlines()[0][:70]}) | - | - | - |")
        s = pipeline_summary(p)
        pk = s["peak_bytes"]
        lines.append(
            f"\npipeline peak ({label} experts): {_f(pk / 1e9 if pk else None)} GB (target <= 24 GB: "
            f"{s['meets_24GB']}); one guided step ({s['cfg_mode']}, warm): {_f(s['step_warm_s'], '.3f')} s"
        )
        rows.append((label, s))
        runs = p.get("cache_runs") or []
        if runs:
            lines += [
                "",
                f"| step cache ({label} experts) | threshold | cap | forwards computed | loop s | generation s |",
                "|---|---|---|---|---|---|",
            ]
            for r in runs:
                done = f"{r.get('computed')} / {r.get('computed', 0) + r.get('skipped_forwards', 0)}"
                lines.append(
                    f"| {r.get('skipped') or 'ran'} | {r['threshold']} | {r['max_skips']} | "
                    f"{done if 'loop_s' in r else r.get('planned_computed')} | {_f(r.get('loop_s'))} | "
                    f"{_f(r.get('generation_s'))} |"
                )
    if rows:
        lines += [
            "",
            "| pipeline, full generation | placement | T5 encode s | VAE encode s | first step s (compile) | "
            "warm step high s | warm step low s | denoise s (steps run) | VAE decode s | generation s | "
            "peak GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, s in rows:
            w = s["step_warm_s_by_expert"]
            run = f"{s['steps_done']}/{s['steps_planned']}"
            if s["stopped_early"]:
                den = f"≈{_f(s['denoise_extrapolated_s'])} EXTRAPOLATED ({run} run: {_f(s['denoise_measured_s'])})"
                gen = f"≈{_f(s['generation_s'])} EXTRAPOLATED"
            else:
                den, gen = f"{_f(s['denoise_s'])} ({run})", _f(s["generation_s"])
            if s["generation_not_included"] and s["generation_s"] is not None:
                gen += f" (without {', '.join(s['generation_not_included'])})"
            lines.append(
                f"| {label} experts | {s['placement'] or '-'} | {_f(s['t5_encode_s'])} | "
                f"{_f(s['vae_encode_s'])} | {_f(s['first_step_s'])} | {_f(w['high'], '.3f')} | "
                f"{_f(w['low'], '.3f')} | {den} | {_f(s['vae_decode_s'])} | {gen} | "
                f"{_f((s['peak_bytes'] or 0) / 1e9 or None)} |"
            )
    return lines
