"""The single-expert phases of `bench.pipeline`: one denoising forward of the BF16 expert and of the W4A4 expert
(real kernels) at each resolution, and the W4A4 artifact round trip (save, load, one forward compared bit-exactly)."""

from __future__ import annotations

import glob
import math
import os
import shutil
import time

import numpy as np

from bench.common import device_facts, memory, state_bytes
from bench.dit_step import RES, dit_inputs, get_config, make_forward, time_forward
from bench.phase_runner import PhaseRecord, brief, error_text, log
from bench.random_weights import random_bf16_expert
from bench.w4a4_expert import build_w4a4_expert, default_bins
from wanjax.metrics import relative_l2


def res_iters(args, res: str) -> int:
    """Timed forwards at resolution ``res`` (``--iters``, ``--iters-720p`` at 720p)."""
    return args.iters_720p if res == "720p" else args.iters


def phase_bf16(args, workdir: str) -> dict:
    """Random bf16 expert; forward at each resolution (compile, median, peak); saves the outputs for rel-L2."""
    import jax
    from flax import nnx

    from wanjax.model import attention as attn_mod

    rec = PhaseRecord(workdir, "bf16")
    rec.update(device_facts())
    cfg = get_config(args.config)
    t0 = time.perf_counter()
    model = random_bf16_expert(cfg, seed=args.seed)
    graphdef, state = nnx.split(model)
    del model
    jax.block_until_ready(state)
    rec.update(
        init_s=time.perf_counter() - t0,
        params=int(sum(math.prod(a.shape) for a in jax.tree.leaves(state))),
        weight_bytes=state_bytes(state),
        after_init=memory(),
        res={},
    )
    log(f"bf16: {rec['params']:,} params, {rec['weight_bytes'] / 1e9:.2f} GB, init {rec['init_s']:.1f}s")
    rec.save()
    fwd = make_forward(graphdef)
    for res in args.res:
        latent = RES[res][0]
        inputs = dit_inputs(cfg, latent)
        tok = latent[0] * latent[1] * latent[2] // 4
        rec["res"][res] = r = {
            "latent_fhw": list(latent),
            "tokens": tok,
            "attention": attn_mod.default_backend(tok, tok, jax.numpy.bfloat16),
        }
        try:
            out_rec, out, _ = time_forward(fwd, state, inputs, res_iters(args, res))
            r.update(out_rec)
            np.save(os.path.join(workdir, f"bf16_{res}.npy"), out)
        except Exception as e:
            r["error"] = error_text(e)
        log(f"bf16 {res}:", brief(r))
        rec.save()
    return rec


def phase_w4a4(args, workdir: str) -> dict:
    """W4A4 expert (RTN of the bf16 expert's weights, default-recipe structure, real mode) built on the device;
    forward at each resolution with the bf16 phase's call; rel-L2 vs the bf16 output; then the artifact round
    trip (save, load, one forward compared bit-exactly)."""
    import jax
    from flax import nnx

    from wanjax.kernels.dispatch import select_backend

    rec = PhaseRecord(workdir, "w4a4")
    rec.update(device_facts())
    cfg = get_config(args.config)
    bins = default_bins()
    nbins = len(bins.expert_bins("high"))
    t0 = time.perf_counter()
    model = build_w4a4_expert(cfg, seed=args.seed, nbins=nbins, rank=args.rank)
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    rec.update(
        build_s=time.perf_counter() - t0,
        weight_bytes=state_bytes(state),
        after_build=memory(),
        kernel_backend=select_backend(),
        rank=args.rank,
        nbins_per_expert=nbins,
        res={},
        weights="random: the bf16 phase's weights (same seed and keys) x random smoothing U(0.5,2), minus "
        "random bf16 rank-r factors, RTN int4 per output channel; act_clip 1; not calibrated, so "
        "the rel-L2 vs bf16 measures RTN W4A4 on random layers, not the recipe's quality",
    )
    log(f"w4a4: built in {rec['build_s']:.1f}s, {rec['weight_bytes'] / 1e9:.2f} GB, kernels {rec['kernel_backend']}")
    rec.save()
    fwd = make_forward(graphdef)
    outputs, compiled = {}, {}
    for res in args.res:
        latent = RES[res][0]
        inputs = dit_inputs(cfg, latent)
        rec["res"][res] = r = {"latent_fhw": list(latent), "tokens": latent[0] * latent[1] * latent[2] // 4}
        try:
            out_rec, out, compiled[res] = time_forward(fwd, state, inputs, res_iters(args, res))
            r.update(out_rec)
            outputs[res] = out
            ref = os.path.join(workdir, f"bf16_{res}.npy")
            if os.path.exists(ref):
                r["rel_l2_vs_bf16"] = relative_l2(out, np.load(ref), floor=1e-30)
        except Exception as e:
            r["error"] = error_text(e)
        log(f"w4a4 {res}:", brief(r))
        rec.save()
    if not args.skip_artifact:
        res = args.res[0]
        qdir = os.path.join(workdir, "artifact")
        art = rec["artifact"] = {}
        try:
            art.update(artifact_save(model, qdir, bins))
            del model, state  # the loaded expert replaces the in-memory one on the device
            art.update(artifact_load_and_check(qdir, compiled.get(res) or fwd, graphdef, cfg, res, outputs.get(res)))
        except Exception as e:
            art["error"] = error_text(e)
        finally:
            shutil.rmtree(qdir, ignore_errors=True)
        log("w4a4 artifact:", art)
        rec.save()
    return rec


def artifact_save(model, qdir: str, bins) -> dict:
    """``save_artifact(qdir, {"high": model})`` with the default recipe's description; time and size on disk."""
    from wanjax.quant.artifact import save_artifact
    from wanjax.quant.recipes import get_recipe, recipe_to_dict

    recipe = recipe_to_dict(get_recipe("default")) | {
        "notes": "bench.pipeline: default-recipe structure with random weights (RTN, random smoothing/low-rank)"
    }
    t0 = time.perf_counter()
    save_artifact(qdir, {"high": model}, recipe=recipe, bins=bins.to_dict(), report={"bench": "random weights"})
    return {
        "save_s": time.perf_counter() - t0,
        "bytes_on_disk": sum(os.path.getsize(p) for p in glob.glob(os.path.join(qdir, "*"))),
    }


def artifact_load_and_check(qdir: str, fwd, graphdef, cfg, res: str, ref_out) -> dict:
    """``load_artifact(qdir)`` (timed, device memory after it), then one forward of the loaded expert compared
    with ``ref_out``, the in-memory expert's output (bit-exact expected). ``fwd``: the in-memory expert's compiled
    forward (reused when the loaded expert has the same graph) or its jitted function."""
    import jax
    from flax import nnx

    from wanjax.quant.artifact import load_artifact

    rec = {}
    t0 = time.perf_counter()
    loaded, _ = load_artifact(qdir)
    g_loaded, state = nnx.split(loaded.pop("high"))
    jax.block_until_ready(state)
    rec["load_s"] = time.perf_counter() - t0
    rec["after_load"] = memory()
    rec["same_graph"] = bool(g_loaded == graphdef)
    inputs = dit_inputs(cfg, RES[res][0])
    t0 = time.perf_counter()
    try:
        if not rec["same_graph"]:
            raise TypeError("the loaded expert's graph differs")
        out = fwd(state, *inputs)
        rec["recompiled"] = False
    except (TypeError, ValueError):  # another graph or state structure: a new compilation (its time included)
        out = make_forward(g_loaded)(state, *inputs)
        rec["recompiled"] = True
    out = np.asarray(jax.device_get(out))
    rec["forward_s"] = time.perf_counter() - t0
    rec["finite"] = bool(np.isfinite(out).all())
    if ref_out is not None:
        rec["forward_bit_exact_vs_in_memory"] = bool(np.array_equal(out, ref_out))
        rec["max_abs_diff_vs_in_memory"] = float(np.max(np.abs(out.astype(np.float64) - ref_out)))
        rec["rel_l2_vs_in_memory"] = relative_l2(out, ref_out, floor=1e-30)
    rec["after_forward"] = memory()
    return rec
