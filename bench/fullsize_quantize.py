"""Full-size `wanjax quantize` on one GPU, resumable across calls: random bf16 I2V-A14B experts written in the official
layout, read by the real loader, quantized by the real streamed path (`wanjax.quant.stream.quantize_streamed`, the
code ``wanjax quantize --calib`` runs) within a wall-time budget per call; per-unit times, peaks and a projection.

    PYTHONPATH=. python3 -m bench.fullsize_quantize --budget fast --budget-s 540     # repeat until it says done
    PYTHONPATH=. python3 -m bench.fullsize_quantize --budget seed --budget-s 540 --work out/fq_seed
    PYTHONPATH=. python3 -m bench.fullsize_quantize --num-layers 10 --samples 1 --work out/fq10   # every kind of
        # unit of the exact shapes in ~2 calls (10 blocks, one sample), projected to 40 blocks and 12 / 4 samples
    PYTHONPATH=. python3 -m bench.fullsize_quantize --tiny --work /tmp/fq              # CPU, the TINY config (tests)

Each call:

1. writes the checkpoint once (skipped when ``WORK/model/.complete.json`` says it is there): ``WORK/model/
   high_noise_model/`` = ``config.json`` + ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` shards (<= 5 GB) +
   the index, every tensor of the official key set and shape (`wanjax.io.keymap.official_shapes`) in bf16, drawn on
   the device from a counter hash of (seed, key) (`bench.random_weights`: kernels std 1/sqrt(fan_in), norm weights
   1 + 0.1 noise, modulation tables 1/sqrt(dim), biases 0.02), one tensor at a time and written one shard at a time
   (host memory: one shard). ``--experts one`` (default) makes ``low_noise_model`` a link to the same directory
   (both experts identical: 28.6 GB on disk; the device has 64 GB); ``--experts both`` draws a second expert (57 GB);
2. loads both experts with `wanjax.io.load_dit` (the high-noise one on the GPU, the low-noise one in host memory)
   into a `WanI2VPipeline` with ``expert_placement="swap"`` and no VAE / text encoder: the calibration samples carry
   a random condition ``y`` and text context of the right shapes (`CalibSample(y=, context=)`), so the 11 GB UMT5
   is not needed (its cost is one encode per sample, not part of this benchmark);
3. runs `quantize_streamed` with ``deadline = start + --budget-s``: it stops between units (a capture between
   samples, saving its accumulators) and the next call resumes from ``WORK/calib``; ``WORK/artifact`` appears when
   done, and the call then also times `load_artifact` of it;
4. writes ``bench/results/<--name>.json`` (and ``$OUT/<name>.json``): every call so far (its units with seconds,
   the GPU peak ``peak_bytes_in_use``, host RSS and disk after each, load and compile times), and the projected
   total for both experts at the ``seed`` and ``fast`` budgets, from the per-step costs measured so far.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

from bench.layout import ROOT

KINDS = ("trajectory", "capture", "quantize", "assemble", "publish")


#: seconds assumed at full size for units not yet measured in the work dir (an H100 at 480p / 81 frames: a trajectory
#: is 40 forwards of ~3.2 s plus compilation; writing an 8 GB expert file with its sha256), so that a call does not
#: start one it cannot finish before --budget-s
FULLSIZE_ESTIMATES = {"trajectory": 200.0, "assemble": 150.0, "publish": 30.0}


class _Kill(Exception):
    """``--max-units``: end the call as a kill would (tests)."""


# ------------------------------------------------------------------------------------------------ checkpoint
def _fan_in(shape) -> int:
    return int(math.prod(shape[1:])) if len(shape) >= 2 else 1


def draw_official(key: str, shape: tuple, seed: int):
    """One random official tensor (bf16 numpy) of ``shape``, drawn on the device from ``(seed, key)``
    (`bench.random_weights.random_array`): linear / conv weights (torch layout ``[out, in, ...]``) std
    1/sqrt(fan_in), norm weights 1 + 0.1 noise, modulation tables std 1/sqrt(dim), biases and the rest 0.02."""
    import jax.numpy as jnp
    import numpy as np

    from bench.random_weights import leaf_seed, random_array

    z = random_array(leaf_seed(seed, key), tuple(shape), jnp.float32)  # unit variance
    name = key.rsplit(".", 1)[-1]
    if key.endswith("modulation"):
        a = z * (1.0 / math.sqrt(shape[-1]))
    elif name == "weight" and "norm" in key:
        a = 1.0 + 0.1 * z
    elif name == "weight" and len(shape) >= 2:
        a = z * (1.0 / math.sqrt(_fan_in(shape)))
    else:
        a = z * 0.02
    return np.asarray(a.astype(jnp.bfloat16))


def write_checkpoint(expert_dir: str, cfg, seed: int, log, max_shard_bytes: int = 5 << 30) -> dict:
    """The official layout of one random expert in ``expert_dir`` (skipped when complete); returns facts."""
    from safetensors.numpy import save_file

    from wanjax.config import official_config_dict
    from wanjax.io.atomic import make_temp_dir, publish_dir, write_json_atomic
    from wanjax.io.keymap import official_shapes

    stem = "diffusion_pytorch_model"
    shapes = official_shapes(cfg)
    marker = os.path.join(expert_dir, ".complete.json")
    want = {"seed": seed, "config": official_config_dict(cfg), "tensors": len(shapes)}
    if os.path.isfile(marker):
        with open(marker) as f:
            have = json.load(f)
        if have.get("spec") == want:
            return {"written": False, "bytes": have["bytes"], "seconds": 0.0}
        raise SystemExit(
            f"{expert_dir}: holds another checkpoint ({have.get('spec')}); remove it or use another --work"
        )
    if os.path.exists(expert_dir):
        shutil.rmtree(expert_dir)  # an incomplete earlier write (no marker)
    t0 = time.perf_counter()
    total = sum(2 * math.prod(s) for s in shapes.values())
    plan, cur, size = [], [], 0  # shard boundaries from the sizes alone
    for k, s in shapes.items():
        nb = 2 * math.prod(s)
        if cur and size + nb > max_shard_bytes:
            plan.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    plan.append(cur)
    tmp = make_temp_dir(expert_dir, "tmp")
    try:
        weight_map = {}
        for i, keys in enumerate(plan, 1):
            fname = f"{stem}-{i:05d}-of-{len(plan):05d}.safetensors"
            shard = {k: draw_official(k, shapes[k], seed) for k in keys}
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in keys})
            del shard
            log(f"checkpoint: shard {i}/{len(plan)} written ({time.perf_counter() - t0:.0f} s)")
        with open(os.path.join(tmp, f"{stem}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(official_config_dict(cfg), f, indent=2)
        write_json_atomic(os.path.join(tmp, ".complete.json"), {"spec": want, "bytes": total})
        publish_dir(tmp, expert_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"written": True, "bytes": total, "seconds": time.perf_counter() - t0, "shards": len(plan)}


# ------------------------------------------------------------------------------------------------ measures
def _rss() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out["rss_bytes" if k == "VmRSS" else "rss_peak_bytes"] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _gpu() -> dict:
    import jax

    s = jax.devices()[0].memory_stats() or {}
    return {"gpu_bytes_in_use": s.get("bytes_in_use"), "gpu_peak_bytes": s.get("peak_bytes_in_use")}


def _du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for n in files:
            p = os.path.join(d, n)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def _disk(work: str) -> dict:
    parts = {
        k: _du(os.path.join(work, k)) for k in ("model", "calib", "artifact") if os.path.exists(os.path.join(work, k))
    }
    u = shutil.disk_usage(work)
    return {"disk_bytes": parts, "disk_work_bytes": sum(parts.values()), "disk_free_bytes": u.free}


def _key(u: dict) -> tuple:
    """What a unit's compilation depends on: its kind, and the layer for a quantized unit."""
    return (u["kind"], u.get("path"))


def _timings(calib_dir: str) -> dict:
    p = os.path.join(calib_dir, "quant", "timings.json")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ projection
def project(
    calls: list,
    cfg_model,
    gen,
    budget_s: float,
    samples_by_budget: dict,
    blocks_per_group: int,
    timings: dict,
    target_layers: int | None = None,
) -> dict:
    """Projected seconds for both experts at each budget from the per-unit times measured so far, for a model of
    ``target_layers`` blocks (default: the measured one's; ``--num-layers`` measures fewer blocks of the exact
    shapes: trajectories and expert files then scale by the block count, capture by each group's end block).

    Per kind, a unit's steady time is the median of its units that were not the first of their kind in a call
    (those include compilation; used when nothing else is known), and a call's fixed cost is its load time plus the
    extra time of each kind's first unit. Capture: seconds per (captured step x sample) per block group, the last
    sample's as the streamed run records it (``timings``: ``WORK/calib/quant/timings.json``; a capture unit resumed
    from saved accumulators covers fewer samples), else from the units; groups not measured are scaled from a
    measured one by ``g1`` (a group's forward runs blocks 0..g1-1)."""
    import numpy as np

    from wanjax.quant.calibrate import CalibConfig, block_groups, captured_steps
    from wanjax.quant.stream import BUDGETS
    from wanjax.model.names import BLOCK_LINEARS

    units = [u for c in calls for u in c.get("units", [])]
    steady = lambda xs: float(np.median(xs)) if xs else None  # noqa: E731

    def per(kind, key=lambda u: None):  # steady seconds by key: the median of warm units, else of cold ones
        warm, cold = {}, {}
        for u in units:
            if u["kind"] == kind:
                (cold if u["first"] else warm).setdefault(key(u), []).append(u["norm_s"])
        return {k: steady(warm.get(k) or cold.get(k)) for k in set(warm) | set(cold)}

    traj = per("trajectory").get(None)
    cap = per("capture", lambda u: u["g1"])  # seconds per captured step and sample, by group end
    measured = cfg_model.num_layers
    target = target_layers or measured
    size = blocks_per_group or measured
    for k, v in timings.items():
        if k.startswith("capture_step:"):
            g0 = int(k.split(":")[1])
            cap[min(g0 + size, measured)] = float(v)
    quant = per("quantize", lambda u: u["path"])  # seconds per block, by path
    asm = per("assemble").get(None)
    pub = per("publish").get(None)
    overhead = [c.get("load_s", 0.0) + c.get("compile_extra_s", 0.0) for c in calls if c.get("units")]
    call_overhead = steady(overhead) if overhead else None
    out = {
        "measured_blocks": measured,
        "projected_blocks": target,
        "per_unit": {
            "trajectory_s": traj,
            "capture_step_s_by_g1": cap,
            "quantize_block_s_by_path": quant,
            "assemble_s": asm,
            "publish_s": pub,
            "call_overhead_s": call_overhead,
        },
    }
    for name, b in BUDGETS.items():
        cfg = CalibConfig(gen=gen, steps_per_bin=b.steps_per_bin, blocks_per_group=blocks_per_group).resolved()
        s = samples_by_budget[name]
        groups = block_groups(cfg, target)
        parts, missing = {}, []
        parts["trajectory_s"] = None if traj is None else s * traj * target / measured
        if cap:
            ref_g1, ref_t = max(cap.items())
            t_cap = 0.0
            for _, g1 in groups:
                t_step = cap.get(g1, ref_t * g1 / ref_g1)
                t_cap += sum(s * len(captured_steps(cfg, bn)) * t_step for bn in cfg.bins.names)
            parts["capture_s"] = t_cap
        else:
            parts["capture_s"] = None
        if quant:
            known = [quant.get(p) for p in BLOCK_LINEARS]
            fill = float(np.mean([v for v in known if v is not None]))
            parts["quantize_s"] = 2 * target * sum(fill if v is None else v for v in known)
            missing += [p for p, v in zip(BLOCK_LINEARS, known) if v is None]
        else:
            parts["quantize_s"] = None
        parts["assemble_s"] = None if asm is None else 2 * asm * target / measured + (pub or 0.0)
        known_total = sum(v for v in parts.values() if v is not None)
        complete = all(v is not None for v in parts.values())
        calls_needed = None
        if call_overhead is not None and budget_s > call_overhead:
            calls_needed = math.ceil(known_total / (budget_s - call_overhead))
        out[name] = {
            "samples": s,
            "captured_steps_per_sample": sum(len(captured_steps(cfg, bn)) for bn in cfg.bins.names),
            **parts,
            "compute_s": known_total,
            "complete": complete,
            "quantize_paths_extrapolated": missing,
            "calls_of_budget": calls_needed,
            "total_with_call_overheads_s": None if calls_needed is None else known_total + calls_needed * call_overhead,
        }
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "fullsize_quantize"), help="model, progress, artifact")
    ap.add_argument("--tiny", action="store_true", help="the TINY config, 5 frames of 64x64, 8 steps (CPU tests)")
    ap.add_argument("--experts", default="one", choices=("one", "both"), help="distinct random experts on disk")
    ap.add_argument("--budget", default="fast", choices=("seed", "fast"), help="calibration budget")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default: the budget's: 12 / 4)")
    ap.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="blocks per expert (default 40; fewer: the exact layer shapes, a shorter run, projected to 40)",
    )
    ap.add_argument("--project-samples", type=int, default=12, help="samples of the seed budget in the projection")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall seconds of this call, from its start")
    ap.add_argument("--frames", type=int, default=None, help="default 81 (tiny: 5)")
    ap.add_argument("--size", default=None, help="maximum area, default 480p (tiny: 64x64)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps, default 40 (tiny: 8)")
    ap.add_argument("--blocks-per-group", type=int, default=10)
    ap.add_argument("--reservoir", type=int, default=None, help="rows per input and bin (default: the budget's)")
    ap.add_argument("--keep-calib", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="result name (default fullsize_quantize_<budget>[_tiny])")
    ap.add_argument("--max-units", type=int, default=0, help="end the call after N units, as a kill (tests)")
    ap.add_argument("--no-load-check", action="store_true", help="do not time load_artifact when done")
    a = ap.parse_args(argv)
    t_start = time.time()  # the call's budget counts from here (loading and compilation included)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # headroom for the 28.6 GB expert + work

    from bench.layout import ensure_package_layout

    ensure_package_layout()
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import wanjax.config as C
    from bench.common import bench_log, device_facts, write_result
    from bench.random_weights import random_array
    from wanjax.conditioning import i2v_size, num_latent_frames
    from wanjax.generation_config import GenerationConfig
    from wanjax.io.atomic import write_json_atomic
    from wanjax.io.dit_loader import load_dit
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.quant.calibrate import CalibSample, captured_steps
    from wanjax.quant.stream import BUDGETS, calib_config, quantize_streamed

    log = bench_log("fullsize_quantize")
    full = C.TINY if a.tiny else C.I2V_A14B
    cfg_model = dataclasses.replace(full, num_layers=a.num_layers) if a.num_layers else full
    name = a.name or f"fullsize_quantize_{a.budget}{'_tiny' if a.tiny else ''}"
    gen = GenerationConfig(
        num_frames=a.frames or (5 if a.tiny else 81),
        max_area=a.size or ("64x64" if a.tiny else "480p"),
        steps=a.steps or (8 if a.tiny else 40),
    )
    budget = BUDGETS[a.budget]
    if a.reservoir:
        budget = dataclasses.replace(budget, reservoir=a.reservoir)
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "artifact")
    calib_dir = os.path.join(work, "calib")
    state_path = os.path.join(work, "bench_state.json")
    state = json.load(open(state_path)) if os.path.isfile(state_path) else {"calls": []}
    call = {"start": t_start, "argv": list(sys.argv[1:] if argv is None else argv), "units": []}
    state["calls"].append(call)

    def save(extra=None):
        call["end"] = time.time()
        call.update(_rss(), **_gpu())
        write_json_atomic(state_path, state, indent=1)
        n_seed = a.project_samples
        payload = {
            "device": device_facts(),
            "config": ("TINY" if a.tiny else "I2V_A14B") + (f" with {a.num_layers} blocks" if a.num_layers else ""),
            "experts_on_disk": a.experts,
            "budget": a.budget,
            "recipe": a.recipe,
            "gen": {"num_frames": gen.num_frames, "max_area": str(gen.max_area), "steps": gen.steps},
            "budget_s": a.budget_s,
            "blocks_per_group": a.blocks_per_group,
            "command": "PYTHONPATH=. python3 -m bench.fullsize_quantize " + " ".join(call["argv"]),
            "calls": state["calls"],
            "peak": {
                "gpu_peak_bytes": max((c.get("gpu_peak_bytes") or 0) for c in state["calls"]) or None,
                "rss_peak_bytes": max((c.get("rss_peak_bytes") or 0) for c in state["calls"]) or None,
                "disk_work_bytes": max(
                    [u.get("disk_work_bytes", 0) for c in state["calls"] for u in c.get("units", [])] + [0]
                ),
            },
            "projection": project(
                state["calls"],
                cfg_model,
                gen,
                a.budget_s,
                {"seed": n_seed, "fast": min(n_seed, BUDGETS["fast"].samples)},
                a.blocks_per_group,
                _timings(calib_dir),
                full.num_layers,
            ),
            **(extra or {}),
        }
        write_result(name, payload)
        return payload

    # 1. the checkpoint
    model_dir = os.path.join(work, "model")
    os.makedirs(model_dir, exist_ok=True)
    ck = {"high": write_checkpoint(os.path.join(model_dir, "high_noise_model"), cfg_model, a.seed, log)}
    low_dir = os.path.join(model_dir, "low_noise_model")
    if a.experts == "both":
        if os.path.islink(low_dir):
            os.remove(low_dir)
        ck["low"] = write_checkpoint(low_dir, cfg_model, a.seed + 1, log)
    elif not os.path.islink(low_dir):
        if os.path.exists(low_dir):
            shutil.rmtree(low_dir)
        os.symlink("high_noise_model", low_dir)
    call["checkpoint"] = ck
    log(f"checkpoint: {ck}")

    if os.path.isdir(out):
        log(f"done already: {out}")
        call["done"] = True
        save()
        return 0

    # 2. the pipeline (the high-noise expert on the device, the low-noise one in host memory)
    t0 = time.perf_counter()
    high = load_dit(os.path.join(model_dir, "high_noise_model"), dtype=jnp.bfloat16)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    low = load_dit(low_dir, dtype=jnp.bfloat16, sharding=cpu)
    pipe = WanI2VPipeline(high, low, vae=None, expert_placement="swap")
    del high, low
    call["load_s"] = time.perf_counter() - t0
    call.update(_gpu())
    log(f"loaded both experts in {call['load_s']:.1f} s (GPU in use {call['gpu_bytes_in_use']})")

    # 3. calibration samples: random condition and context of the pipeline's shapes
    # the official 480p / 720p frame (832x480 -> latent 60x104, 32,760 tokens at 81 frames), else a 480:832 image's
    h, w = {"480p": (480, 832), "720p": (720, 1280)}.get(str(gen.max_area), None) or i2v_size((480, 832), gen.max_area)
    f_lat = num_latent_frames(gen.num_frames)
    n = a.samples or (12 if a.budget == "seed" else BUDGETS["fast"].samples)
    samples = [
        CalibSample(
            y=random_array(1000 + 2 * i, (1, f_lat, h // 8, w // 8, 20), jnp.float32),
            context=random_array(1001 + 2 * i, (2, cfg_model.text_len, cfg_model.text_dim), jnp.bfloat16) * 0.1,
            seed=i,
        )
        for i in range(n)
    ]
    samples = budget.select(samples)
    cfg = calib_config(a.recipe, gen, budget, blocks_per_group=a.blocks_per_group)
    log(f"{len(samples)} samples, latent {f_lat}x{h // 8}x{w // 8}, {gen.steps} steps, budget {budget}")

    firsts = set()

    def on_unit(kind, unit, seconds):
        rec = {"kind": kind, "unit": unit, "seconds": seconds, "t": time.time() - t_start, "norm_s": seconds}
        if kind == "capture":  # seconds per captured step and sample
            e, blocks, bin_name = unit.split(".")
            g0, g1 = (int(x) for x in blocks[len("blocks") :].split("-"))
            rec.update(g0=g0, g1=g1 + 1, bin=bin_name)
            rec["norm_s"] = seconds / max(1, len(captured_steps(cfg_r, bin_name)) * len(samples))
        elif kind == "quantize":  # seconds per block
            e, blocks, path = unit.split(".", 2)
            g0, g1 = (int(x) for x in blocks[len("blocks") :].split("-"))
            rec.update(path=path, g0=g0, g1=g1 + 1)
            rec["norm_s"] = seconds / (g1 + 1 - g0)
        rec["first"] = _key(rec) not in firsts  # the first of its kind (and layer) in this call compiles
        firsts.add(_key(rec))
        rec.update(**_gpu(), **_rss(), **_disk(work))
        call["units"].append(rec)
        log(f"{kind} {unit}: {seconds:.2f} s (GPU peak {rec['gpu_peak_bytes']}, RSS {rec.get('rss_bytes')})")
        if len(call["units"]) % 5 == 0 or kind in ("assemble", "publish"):
            save()
        if a.max_units and len(call["units"]) >= a.max_units:
            raise _Kill

    cfg_r = cfg.resolved()
    deadline = t_start + a.budget_s
    res = None
    try:
        res = quantize_streamed(
            pipe,
            samples,
            a.recipe,
            out,
            work_dir=calib_dir,
            cfg=cfg,
            keep_calib=a.keep_calib,
            deadline=deadline,
            progress=True,
            on_unit=on_unit,
            estimates=None if a.tiny else {k: v * cfg_model.num_layers / 40 for k, v in FULLSIZE_ESTIMATES.items()},
        )
    except _Kill:
        log(f"--max-units {a.max_units}: ended like a kill")
        call["killed"] = True
    # compile overhead of this call: each first unit of a kind (and layer) minus that one's steady time
    extra = 0.0
    for u in call["units"]:
        if u["first"]:
            warm = [
                x["norm_s"] for c in state["calls"] for x in c.get("units", []) if not x["first"] and _key(x) == _key(u)
            ]
            if warm:
                extra += max(0.0, u["norm_s"] - float(np.median(warm))) * (u["seconds"] / max(u["norm_s"], 1e-12))
    call["compile_extra_s"] = extra
    call["done"] = bool(res is not None and res.done)
    call["stopped"] = None if res is None else res.stopped
    call["remaining"] = None if res is None else res.remaining
    result = {}
    if call["done"]:
        man = json.load(open(os.path.join(out, "manifest.json")))
        result["artifact"] = {
            e: {"bytes": os.path.getsize(os.path.join(out, m["file"])), "sha256": m["sha256"]}
            for e, m in man["experts"].items()
        }
        if not a.no_load_check and time.time() < deadline:
            from wanjax.quant.artifact import load_artifact

            del pipe
            t0 = time.perf_counter()
            experts, _ = load_artifact(out)
            jax.block_until_ready(jax.tree.leaves(nnx_state(experts)))
            result["artifact_load_s"] = time.perf_counter() - t0
            del experts
    payload = save(result)
    log(
        f"{'done' if call['done'] else 'not done'} ({call['stopped'] or ('killed' if call.get('killed') else '')}); "
        f"left {call['remaining']}; projection fast {payload['projection']['fast']['compute_s']:.0f} s, "
        f"seed {payload['projection']['seed']['compute_s']:.0f} s (compute); results/{name}.json"
    )
    return 0


def nnx_state(experts: dict):
    from flax import nnx

    return {e: nnx.state(m) for e, m in experts.items()}


if __name__ == "__main__":
    sys.exit(main())
