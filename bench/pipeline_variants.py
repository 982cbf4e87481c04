"""``bench.pipeline``'s generation variants at full size: the Lightning preset, LoRAs of Lightning's shape on the
experts, and the step cache (issues 36 and 37).

* ``--pipeline-preset lightning``  `GenerationConfig.lightning`: 4 Euler steps, shift 5, guidance 1 on both experts
  (CFG off: the conditional forward alone, batch 1, as `WanI2VPipeline.denoise` runs it), boundary 0.9.
* ``--pipeline-lora-rank R``        a random LoRA per expert in the Lightning release's key layout
  (``diffusion_model.blocks.N.<layer>.lora_down.weight`` [R, K] / ``lora_up.weight`` [N, R] / ``alpha``, float32,
  all 400 block Linears) written to a ``.safetensors`` file and applied with `wanjax.lora.apply_lora` (the real
  reader and the real W4A4 path: rank 32 + R in every low-rank branch). On BF16 experts a LoRA is merged into the
  weights, which leaves the forward's cost unchanged, so the BF16 phase does not apply it (said in the record).
* ``--pipeline-cache T[:CAP],...``  after the uncached loop, one cached loop per spec (`wanjax.sampling.cache`,
  MagCache rule, threshold T, at most CAP skips in a row) on the same latent, condition and context. Random weights
  have no meaningful residual ratios, so the skip plan comes from a calibration file of the same schedule
  (``--pipeline-cache-calibration``, default the mini model's W4A4 40-step calibration): the time of a cached run
  depends only on how many forwards it computes. The cached executables (compute, skip) are compiled before the
  timed loop and their compile time is reported on its own.

Each variant's numbers land in the phase record (``lora``, ``cache_runs``) and in ``generation`` where they replace
the loop (``cache_runs[i].generation_s``: T5 + VAE encode + cached loop + VAE decode of the phase).
"""

from __future__ import annotations

import os
import time

import numpy as np

from bench.layout import ROOT

DEFAULT_CACHE_CALIBRATION = os.path.join(ROOT, "bench", "results", "cache_calibration_mini_w4a4.json")


def add_args(ap) -> None:
    """The variant flags of ``bench.pipeline`` (pipeline phases only)."""
    ap.add_argument(
        "--pipeline-preset",
        default="official",
        choices=["official", "lightning"],
        help="generation settings: the official 40-step schedule (steps from --pipeline-steps) or the Lightning "
        "4-step preset (CFG off)",
    )
    ap.add_argument(
        "--pipeline-lora-rank",
        type=int,
        default=0,
        help="a random Lightning-layout LoRA of this rank on every block Linear of each W4A4 expert (0: none)",
    )
    ap.add_argument(
        "--pipeline-cache",
        default="",
        help="comma list of THRESHOLD[:MAX_SKIPS]: a cached loop per entry after the uncached one",
    )
    ap.add_argument("--pipeline-cache-calibration", default=DEFAULT_CACHE_CALIBRATION)
    ap.add_argument(
        "--pipeline-uncached-steps",
        type=int,
        default=0,
        help="run only this many steps of the uncached loop and extrapolate the rest from the warm step times "
        "(labelled EXTRAPOLATED; 0: all)",
    )
    ap.add_argument(
        "--pipeline-warm-repeat",
        action="store_true",
        help="after the generation, run it again in the same process (VAE encode, denoise, VAE decode; everything "
        "compiled): the time of a second video, or of a first one with the compilation cache warm",
    )


def generation_config(args, frames: int):
    """The `GenerationConfig` of the phase's denoise loop."""
    from wanjax.pipeline import GenerationConfig

    base = GenerationConfig(num_frames=frames, steps=args.pipeline_steps)
    if getattr(args, "pipeline_preset", "official") == "lightning":
        return GenerationConfig.lightning(GenerationConfig(num_frames=frames))
    return base


def cache_specs(text: str) -> list[tuple[float, int]]:
    """``"0.05,0.13:2"`` -> ``[(0.05, 2), (0.13, 2)]`` (cap 2 unless given)."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        thr, _, cap = part.partition(":")
        out.append((float(thr), int(cap) if cap else 2))
    return out


def write_random_lora(cfg, rank: int, seed: int, path: str) -> dict:
    """A random LoRA of ``rank`` on every block Linear of ``cfg`` in the Lightning release's layout (float32, alpha =
    rank, small values), written to ``path``; returns its facts (params, bytes, seconds)."""
    from safetensors.numpy import save_file

    from wanjax.model.names import block_linear_shapes

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    official = {"self_attn": "self_attn", "cross_attn": "cross_attn", "ffn.fc1": "ffn.0", "ffn.fc2": "ffn.2"}
    sd, n = {}, 0
    for path_, (k, nout) in block_linear_shapes(cfg).items():
        name = path_[len("blocks.") :]
        mod = official.get(name) or name
        for i in range(cfg.num_layers):
            b = f"diffusion_model.blocks.{i}.{mod}"
            down = rng.standard_normal((rank, k), dtype=np.float32) * np.float32(1.0 / np.sqrt(k))
            up = rng.standard_normal((nout, rank), dtype=np.float32) * np.float32(1e-3)
            sd[f"{b}.lora_down.weight"], sd[f"{b}.lora_up.weight"] = down, up
            sd[f"{b}.alpha"] = np.asarray(float(rank), np.float32)
            n += down.size + up.size
    tmp = path + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, path)
    return {"rank": rank, "params": n, "file_bytes": os.path.getsize(path), "write_s": time.perf_counter() - t0}


def apply_random_loras(pipe, cfg, rank: int, seed: int, workdir: str) -> dict:
    """Write one random LoRA per expert and apply both through `wanjax.lora.apply_lora` (file -> reader -> W4A4
    low-rank branch); returns what it did and how long each part took."""
    import jax

    from wanjax.lora import active_loras, apply_lora

    out = {"files": {}}
    for i, expert in enumerate(("high", "low")):
        path = os.path.join(workdir, f"lora_{expert}_r{rank}.safetensors")
        out["files"][expert] = write_random_lora(cfg, rank, seed + i, path)
        t0 = time.perf_counter()
        apply_lora(pipe, path, expert=expert)
        jax.block_until_ready(pipe.expert_params(expert))
        out["files"][expert]["apply_s"] = time.perf_counter() - t0
        os.remove(path)
    out["active"] = [{k: v for k, v in a.items() if isinstance(v, (str, int, float))} for a in active_loras(pipe)]
    return out


def run_cached(pipe, y, ctx, gen, specs, calibration: str, rec: dict, fits, log) -> list[dict]:
    """One cached denoise loop per ``(threshold, max_skips)`` in ``specs`` (see the module docstring). ``fits(s)``
    tells whether ``s`` more seconds fit in the phase's budget; a run that would not is recorded as skipped."""
    import jax
    import jax.numpy as jnp

    from wanjax.sampling.cache import CacheCalibration, CacheConfig, StepCache

    cal = CacheCalibration.load(calibration, gen.steps, gen.shift, gen.boundary, gen.solver)
    runs = []
    compute, skip, _ = pipe._jit_cached()
    t0 = time.perf_counter()
    x0 = jnp.zeros(y.shape[:-1] + (pipe.cfg.out_dim,), jnp.float32)
    params = pipe.expert_params("high")
    v, r = compute(params, x0, y, ctx, jnp.float32(999.0), jnp.float32(gen.guide_scale[1]))
    jax.block_until_ready(skip(params, x0, y, ctx, jnp.float32(999.0), jnp.float32(gen.guide_scale[1]), r))
    del v, r
    compile_s = time.perf_counter() - t0
    den = rec["stages"].get("denoise") or {}
    warm = [s["s"] for s in den.get("steps") or [] if s.get("warm") and s.get("in_loop")]
    step_s = float(np.median(warm)) if warm else None
    for thr, cap in specs:
        cache = StepCache(CacheConfig(threshold=thr, max_skips=cap), cal)
        entry = {"threshold": thr, "max_skips": cap, "calibration": os.path.relpath(calibration, ROOT)}
        ts = [int(t) for t in gen.sigma_schedule(pipe.cfg.num_train_timesteps).timesteps]
        cache.begin(ts, [pipe.expert_for(t, gen.boundary) for t in ts])
        computed = sum(1 for s in cache._plan if not s) if cache._plan is not None else gen.steps
        est = None if step_s is None else computed * step_s * 1.05 + 2.0
        entry["planned_computed"] = computed
        if est is not None and not fits(est):
            entry["skipped"] = f"~{est:.0f} s would not fit in the phase's budget"
            runs.append(entry)
            continue
        t1 = time.perf_counter()
        lat, _ = pipe.denoise(y, ctx, gen, progress=False, cache=cache)
        jax.block_until_ready(lat)
        entry.update(
            loop_s=time.perf_counter() - t1,
            computed=cache.computed,
            skipped_forwards=cache.skipped,
            schedule=cache.schedule,
            fewer_forwards=(cache.computed + cache.skipped) / max(cache.computed, 1),
            compile_s_before=compile_s,
        )
        log(f"cached loop thr={thr} cap={cap}: {cache.summary()} in {entry['loop_s']:.1f}s [{cache.schedule}]")
        runs.append(entry)
    return runs
