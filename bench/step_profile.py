"""Where a full-size expert step spends its time, and the W4A4/BF16 step ratio measured interleaved in one process.

    python -m bench.step_profile [--res 480p] [--rounds 8] [--variants bf16/cudnn,...] [--num-layers N]
                                 [--skip-ab] [--skip-profile] [--name NAME]

Both experts of :mod:`bench.pipeline` (random bf16 weights of the exact shapes; the W4A4 expert built from them by
RTN with the ``default`` recipe's real-mode structure) are held on the device together, and four jitted forwards
are compiled: {BF16, W4A4} x {cuDNN BF16 attention, cuDNN FP8 attention}.

* **Per-kernel breakdown** (CUPTI, ``jax.experimental.mosaic.gpu.profiler.measure(aggregate=False)``): one
  forward of each variant; kernels grouped by name and by class (attention, W4A4 GEMM, activation quantization,
  cuBLAS GEMM, fusions/other), total ms per class.
* **Interleaved A/B**: ``--rounds`` rounds, each running every variant once (order rotated per round), wall clock
  per forward; the medians and the per-round ratios come out of the same rounds, so clock or thermal drift during
  the call hits all variants alike (the separate-process ratios of ``bench.pipeline`` moved 1.38-1.42x between
  calls).

The first variant of ``--variants`` is the baseline of the ratios and of the output rel-L2 (the JSON keys say
``_vs_bf16``: the default baseline is BF16 / cuDNN).

Result: ``bench/results/<name>.json`` (and ``$OUT``), a table at the end.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import time

from bench.layout import ROOT

VARIANTS = (("bf16", "cudnn"), ("w4a4", "cudnn"), ("bf16", "cudnn_fp8"), ("w4a4", "cudnn_fp8"))
# the quantized experts --variants can name: (input rotation, INT4 codes stored unpacked to int8, recipe whose formats
# the expert takes: "default" W4A4, "w4a8" INT8 activations, "w4a8_mixed" also INT8 self-attention weights)
W4A4_EXPERTS = {
    "w4a4": (True, False, "default"),
    "w4a4norot": (False, False, "default"),
    "w4a4i8": (True, True, "default"),
    "w4a8": (True, False, "w4a8"),
    "w4a8mixed": (True, False, "w4a8_mixed"),
}


def log(*a):
    print(*a, flush=True)


def kernel_class(name: str) -> str:
    """Coarse class of a GPU kernel from its name (cuDNN / cuBLAS / Triton / Mosaic / XLA fusion names)."""
    n = name.lower()
    if any(s in n for s in ("cudnn", "fmha", "flash", "sdpa", "attn")):
        return "attention"
    if "act_quant" in n:  # kernels/act_quant_gpu.py: _act_quant_lowrank_kernel
        return "act_quant"
    if any(s in n for s in ("w4a4", "mosaic", "wg_kernel")):
        return "w4a4_gemm"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")):
        return "cublas_gemm"
    if "triton" in n:
        return "triton_other"
    return "fusion_other"


def breakdown(per_kernel) -> dict:
    """[(name, ms), ...] -> totals by class and the 25 most expensive kernel names (count, total ms)."""
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, ms in per_kernel:
        by_name[name].append(float(ms))
    classes: dict[str, float] = collections.defaultdict(float)
    for name, ts in by_name.items():
        classes[kernel_class(name)] += sum(ts)
    top = sorted(((sum(ts), len(ts), name) for name, ts in by_name.items()), reverse=True)[:25]
    total = sum(classes.values())
    return {
        "total_ms": total,
        # issue 34's "linear work including its producers": every kernel but the attention core (norms, modulation,
        # RoPE, act quant, GEMMs, GELU, residuals; attn8's XLA pre-pass counts here, its kernel as attention)
        "non_attention_ms": total - classes.get("attention", 0.0),
        "classes_ms": dict(classes),
        "top": [{"name": n[:160], "count": c, "total_ms": t} for t, c, n in top],
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", default="480p", choices=("480p", "720p", "tiny"))
    p.add_argument("--rounds", type=int, default=8, help="interleaved A/B rounds (each runs every variant once)")
    p.add_argument("--skip-ab", action="store_true", help="only the per-kernel breakdown")
    p.add_argument("--skip-profile", action="store_true", help="only the interleaved A/B")
    p.add_argument(
        "--variants",
        default=",".join(f"{e}/{a}" for e, a in VARIANTS),
        help="comma list of EXPERT/ATTENTION (expert: bf16|w4a4|w4a4norot|w4a4i8|w4a8|w4a8mixed, w4a4norot "
        "without the default recipe's input rotation, w4a8mixed with the recipe w4a8_mixed's INT8 self-attention "
        "weights; attention: cudnn|cudnn_fp8|attn8)",
    )
    p.add_argument(
        "--attn8-config", default="", help="kernel config of the attn8 variants, 'field=value,...' of GPUConfig"
    )
    p.add_argument("--config", default="I2V_A14B")
    p.add_argument("--num-layers", type=int, default=None, help="fewer blocks (quick runs; default: the config's)")
    p.add_argument("--name", default=None)
    p.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    from bench.common import device_facts, write_result
    from bench.dit_step import RES, dit_inputs, get_config, make_forward
    from bench.layout import ensure_package_layout
    from bench.random_weights import random_bf16_expert
    from bench.timing import cupti_kernels, interleaved
    from bench.w4a4_expert import build_w4a4_expert, default_bins
    from wanjax.metrics import relative_l2

    ensure_package_layout()
    from wanjax.kernels.attention8 import attention8
    from wanjax.model.attention import register_attention_backend, set_attention_backend
    from wanjax.quant.apply import prepare_kernel_weights

    register_attention_backend("attn8", attention8)  # as the pipeline does (WANJAX_ATTN8_IMPL picks the kernel)

    args = parse_args(argv)
    if args.attn8_config:
        from bench.attention8 import parse_config
        from wanjax.kernels import attention8_gpu

        attention8_gpu.set_default_config(parse_config(args.attn8_config))
    cfg = get_config(args.config)
    if args.num_layers:
        cfg = dataclasses.replace(cfg, num_layers=args.num_layers)
    variants = [tuple(v.split("/")) for v in args.variants.split(",") if v]
    res = {
        "settings": vars(args),
        **device_facts(),
        "num_layers": cfg.num_layers,
        "latent_fhw": list(RES[args.res][0]),
        "variants": {},
        "errors": {},
    }
    name = args.name or f"step_profile_{args.res}"

    experts = {}
    t0 = time.perf_counter()
    if any(e == "bf16" for e, _ in variants):
        experts["bf16"] = nnx.split(random_bf16_expert(cfg, seed=0))
    nbins = len(default_bins().expert_bins("high"))
    for ename, (rotate, int8, recipe) in W4A4_EXPERTS.items():
        if any(e == ename for e, _ in variants):
            model = build_w4a4_expert(cfg, seed=0, nbins=nbins, rotate=rotate, recipe=recipe)
            experts[ename] = nnx.split(prepare_kernel_weights(model, int4=True) if int8 else model)
    jax.block_until_ready([s for _, s in experts.values()])
    res["build_s"] = time.perf_counter() - t0
    log(f"built {list(experts)} in {res['build_s']:.1f}s")

    def state_of(key):  # "w4a4/cudnn_fp8" -> the W4A4 expert's state
        return experts[key.split("/")[0]][1]

    inputs = dit_inputs(cfg, RES[args.res][0])
    compiled = {}
    for expert, attn in variants:
        key = f"{expert}/{attn}"
        graphdef, state = experts[expert]
        set_attention_backend(attn)
        try:
            t0 = time.perf_counter()
            compiled[key] = make_forward(graphdef).lower(state, *inputs).compile()
            res["variants"][key] = {"compile_s": time.perf_counter() - t0}
        except Exception as e:
            res["errors"][key] = f"{type(e).__name__}: {str(e)[:800]}"
            log(f"{key}: compile failed {e}")
        finally:
            set_attention_backend(None)
    outs = {}
    for key, fn in compiled.items():
        outs[key] = np.asarray(jax.device_get(fn(state_of(key), *inputs)))
    base_key = next(iter(compiled), None)  # the first variant is the baseline (BF16 / cuDNN by default)
    res["baseline"] = base_key
    ref = outs.get(base_key)
    for key, out in outs.items():
        res["variants"][key]["finite"] = bool(np.isfinite(out).all())
        if ref is not None:
            res["variants"][key]["rel_l2_vs_bf16"] = relative_l2(out, ref, floor=1e-30)

    if not args.skip_profile:
        for key in compiled:
            expert, attn = key.split("/")
            graphdef, state = experts[expert]
            set_attention_backend(attn)  # measure() traces the forward again
            try:
                per_kernel = cupti_kernels(make_forward(graphdef), state, *inputs)
                res["variants"][key]["kernels"] = b = breakdown(per_kernel)
                log(
                    f"{key}: {b['total_ms']:.1f} ms of kernels; "
                    + ", ".join(f"{c} {t:.1f}" for c, t in sorted(b["classes_ms"].items(), key=lambda x: -x[1]))
                )
                for row in b["top"][:12]:
                    log(f"    {row['total_ms']:8.2f} ms  x{row['count']:<4d} {row['name'][:110]}")
            except Exception as e:
                res["errors"][f"profile {key}"] = f"{type(e).__name__}: {str(e)[:800]}"
                log(f"{key}: profile failed {e}")
            finally:
                set_attention_backend(None)
        write_result(name, res, (args.results_dir,))

    if not args.skip_ab and compiled:
        keys = list(compiled)
        for key in keys:  # one warm call each before the rounds
            jax.block_until_ready(compiled[key](state_of(key), *inputs))
        times = interleaved(
            {key: functools.partial(compiled[key], state_of(key), *inputs) for key in keys}, args.rounds
        )
        for key in keys:
            res["variants"][key].update(all_s=times[key], median_s=statistics.median(times[key]), min_s=min(times[key]))
        if base_key in times:
            base = times[base_key]
            for key in keys:
                ratios = [b / t for b, t in zip(base, times[key])]
                res["variants"][key]["speedup_vs_bf16"] = {
                    "of_medians": statistics.median(base) / statistics.median(times[key]),
                    "per_round_median": statistics.median(ratios),
                    "per_round_min": min(ratios),
                    "per_round_max": max(ratios),
                }
        write_result(name, res, (args.results_dir,))

    log("\n| variant | compile s | median s | x vs baseline (medians) | per-round min-max | rel-L2 vs baseline |")
    log("|---|---|---|---|---|---|")
    for key, v in res["variants"].items():
        sp = v.get("speedup_vs_bf16", {})
        log(
            f"| {key} | {v.get('compile_s', 0):.1f} | {v.get('median_s', float('nan')):.3f} | "
            f"{sp.get('of_medians', float('nan')):.3f} | {sp.get('per_round_min', float('nan')):.3f}-"
            f"{sp.get('per_round_max', float('nan')):.3f} | {v.get('rel_l2_vs_bf16', float('nan')):.3f} |"
        )
    prof = {k: v["kernels"] for k, v in res["variants"].items() if "kernels" in v}
    if prof:
        base_na = prof.get(base_key, {}).get("non_attention_ms")
        log("\n| variant | kernels ms | attention ms | all but attention ms | x baseline (all but attention) |")
        log("|---|---|---|---|---|")
        for key, b in prof.items():
            att = b["classes_ms"].get("attention", 0.0)
            x = base_na / b["non_attention_ms"] if base_na and b["non_attention_ms"] else float("nan")
            log(f"| {key} | {b['total_ms']:.1f} | {att:.1f} | {b['non_attention_ms']:.1f} | {x:.3f} |")
    if res["errors"]:
        log("errors:", res["errors"])
    return res


if __name__ == "__main__":
    main()
