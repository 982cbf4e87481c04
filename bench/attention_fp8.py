"""FP8 (e4m3) cuDNN flash attention vs BF16 cuDNN attention: the op alone, its error, and the full-size expert step.

    python -m bench.attention_fp8 [--res 480p] [--iters 10] [--fwd-iters 4] [--rows 512] [--budget-s 280]
                                  [--skip-attn] [--skip-forward] [--config TINY --res tiny --inprocess]

Phases (each in its own subprocess, so that each gets the whole GPU; a failing phase is reported and the rest run):

* ``attn``  self-attention alone at the expert's shape (480p: q/k/v [1, 32760, 40, 128] bf16): median time and
            TFLOP/s (4 T^2 N D flops) of ``cudnn`` (bf16) and ``cudnn_fp8``; rel-L2 error of both against exact fp32
            attention on ``--rows`` query rows spread over the sequence (all keys), for N(0,1) q/k/v and for q/k/v
            whose first N/8 heads are x10 (outlier heads: the per-tensor FP8 scales are set by them; their scores
            are x100, i.e. near-argmax attention), and for only v x10 on those heads, next to the
            error predicted by `wanjax.model.attention.fp8_attention_reference` (both P modes, the same scales).
            If cudnn_fp8 fails at T=32760, it is retried at T=32768 (timing only) to tell a shape limit apart.
* ``bf16`` / ``w4a4_fp8`` / ``w4a4`` / ``bf16_fp8``  one full-size expert forward (random weights) through
            ``bench.pipeline``'s phases ``bf16`` and ``w4a4`` (W4A4 real kernels, default-recipe structure), with
            ``WANJAX_ATTENTION`` unset (bf16 cuDNN) or ``cudnn_fp8``; rel-L2 of every output vs the BF16 output.

On CPU (``--config TINY --res tiny --inprocess``) ``cudnn`` is replaced by ``xla`` and ``cudnn_fp8`` by
``fp8_reference``, so that everything but the cuDNN calls runs. Result: ``<results-dir>/attention_fp8_<res>.json``
(and ``$OUT``) and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np

from bench import pipeline as bp
from bench.dit_step import RES, get_config
from bench.layout import ROOT, ensure_package_layout
from bench.phase_runner import PhaseRecord, brief, stream_child
from bench.random_weights import random_array
from wanjax.io.jsonio import to_jsonable
from wanjax.metrics import relative_l2

FWD_VARIANTS = (  # name, bench.pipeline phase, FP8 attention?
    ("bf16", "bf16", False),
    ("w4a4_fp8", "w4a4", True),
    ("w4a4", "w4a4", False),
    ("bf16_fp8", "bf16", True),
)
PHASE_CAP_S = {"attn": 100, "bf16": 75, "w4a4_fp8": 90, "w4a4": 90, "bf16_fp8": 75}


def log(*a):
    print("[bench.attention_fp8]", *a, flush=True)


def _err(e: BaseException) -> str:
    traceback.print_exc()
    return f"{type(e).__name__}: {str(e)[:1500]}"


def backends() -> tuple[str, str]:
    """(bf16 backend, fp8 backend) for this platform."""
    import jax

    return ("cudnn", "cudnn_fp8") if jax.default_backend() == "gpu" else ("xla", "fp8_reference")


# ------------------------------------------------------------------------------------------------ phase attn
def _inputs(cfg, tokens: int, case: str, seed: int = 0):
    import jax.numpy as jnp

    shape = (1, tokens, cfg.num_heads, cfg.head_dim)
    q, k, v = (random_array(seed + i, shape, jnp.bfloat16) for i in range(3))
    if case in ("outlier_heads", "outlier_heads_v"):
        n_out = max(1, cfg.num_heads // 8)
        mult = jnp.ones((cfg.num_heads, 1), jnp.bfloat16).at[:n_out].set(10)
        v = v * mult
        if case == "outlier_heads":
            q, k = q * mult, k * mult
    return q, k, v


def phase_attn(args, workdir: str) -> dict:
    import jax
    import jax.numpy as jnp

    from bench.common import device_facts
    from bench.timing import time_fn
    from wanjax.model import attention as A

    rec = PhaseRecord(workdir, "attn")
    rec.update(device_facts())
    cfg = get_config(args.config)
    f, h, w = RES[args.res][0]
    tokens = f * h * w // 4
    b16, b8 = backends()
    flops = 4.0 * tokens * tokens * cfg.num_heads * cfg.head_dim
    rec.update(
        tokens=tokens,
        shape=[1, tokens, cfg.num_heads, cfg.head_dim],
        backends=[b16, b8],
        timing={},
        error={},
        rows=args.rows,
    )
    rec.save()
    fns = {b: jax.jit(lambda q, k, v, b=b: A.attention(q, k, v, backend=b)) for b in (b16, b8)}

    q, k, v = _inputs(cfg, tokens, "randn")
    for b in (b16, b8):
        try:
            r = time_fn(fns[b], q, k, v, warmup=2, iters=args.iters)
            r["tflops"] = flops / r["median_s"] / 1e12
        except Exception as e:
            r = {"error": _err(e)}
            if b == b8 and tokens % 128:
                t2 = -(-tokens // 128) * 128
                try:
                    q2, k2, v2 = _inputs(cfg, t2, "randn")
                    r2 = time_fn(fns[b], q2, k2, v2, warmup=2, iters=args.iters)
                    r2["tflops"] = 4.0 * t2 * t2 * cfg.num_heads * cfg.head_dim / r2["median_s"] / 1e12
                    r[f"retry_tokens_{t2}"] = r2
                    del q2, k2, v2
                except Exception as e2:
                    r[f"retry_tokens_{t2}"] = {"error": _err(e2)}
        rec["timing"][b] = r
        log(b, {kk: vv for kk, vv in r.items() if kk != "all_s"})
        rec.save()
    t16 = rec["timing"][b16].get("median_s")
    t8 = rec["timing"][b8].get("median_s")
    rec["fp8_speedup"] = t16 / t8 if t16 and t8 else None

    rows = np.unique(np.linspace(0, tokens - 1, min(args.rows, tokens)).astype(np.int32))
    for case in ("randn", "outlier_heads", "outlier_heads_v"):
        e = rec["error"][case] = {}
        try:
            if case != "randn":
                q, k, v = _inputs(cfg, tokens, case)
            qr = q[:, rows]
            ref = jax.jit(A.reference_attention_f32)(qr, k, v)
            jax.block_until_ready(ref)

            def errs(out):
                o, r = np.asarray(out.astype(jnp.float32)), np.asarray(ref)
                per_head = relative_l2(o, r, axis=(0, 1, 3))
                return {
                    "rel_l2": relative_l2(o, r),
                    "rel_l2_max_head": float(per_head.max()),
                    "rel_l2_median_head": float(np.median(per_head)),
                }

            for b in (b16, b8):
                try:
                    e[b] = errs(fns[b](q, k, v)[:, rows])
                except Exception as ex:
                    e[b] = {"error": _err(ex)}
            sc = jax.jit(A.fp8_attention_scales)(q, k, v)
            for m in ("unnormalized", "normalized"):
                try:
                    pred = jax.jit(lambda qr, k, v, sc, m=m: A.fp8_attention_reference(qr, k, v, p_mode=m, scales=sc))
                    e[f"predicted_{m}"] = errs(pred(qr, k, v, sc))
                except Exception as ex:
                    e[f"predicted_{m}"] = {"error": _err(ex)}
            ref = None  # free the reference (the closures above read it; a `del` would unbind it)
        except Exception as ex:
            e["error"] = _err(ex)
        log("error", case, e)
        rec.save()
    return rec


# ------------------------------------------------------------------------------------------------ forward phases
def _pipeline_argv(args) -> list[str]:
    return [
        "--config",
        args.config,
        "--res",
        args.res,
        "--iters",
        str(args.fwd_iters),
        "--skip-artifact",
        "--rank",
        str(args.rank),
        "--seed",
        "0",
    ]


def run_forward(name: str, phase: str, fp8: bool, args, root: str, ref_npy: str | None, timeout: float) -> dict:
    """One bench.pipeline phase with WANJAX_ATTENTION set (fp8) or unset, in its own workdir."""
    workdir = os.path.join(root, name)
    os.makedirs(workdir, exist_ok=True)
    if ref_npy and os.path.exists(ref_npy) and phase == "w4a4":  # bench.pipeline's w4a4 phase reports rel-L2 vs it
        shutil.copy(ref_npy, os.path.join(workdir, os.path.basename(ref_npy)))
    old = os.environ.pop("WANJAX_ATTENTION", None)
    if fp8:
        os.environ["WANJAX_ATTENTION"] = backends()[1] if args.inprocess else "cudnn_fp8"
    try:
        if args.inprocess:
            rec = bp.run_inprocess(phase, bp.parse_args(_pipeline_argv(args)), workdir)
        else:
            rec = bp.run_child(phase, _pipeline_argv(args), workdir, timeout)
    finally:
        os.environ.pop("WANJAX_ATTENTION", None)
        if old is not None:
            os.environ["WANJAX_ATTENTION"] = old
    r = dict((rec.get("res") or {}).get(args.res) or {})
    r.pop("all_s", None)
    out = {
        "phase": phase,
        "attention_env": "cudnn_fp8" if fp8 else None,
        **r,
        "wall_s": rec.get("wall_s"),
        "returncode": rec.get("returncode"),
    }
    if rec.get("error") and not r.get("error"):
        out["error"] = rec["error"]
        out["log_tail"] = rec.get("log_tail")
    npy = os.path.join(workdir, f"{phase}_{args.res}.npy")
    if phase == "bf16" and os.path.exists(npy) and ref_npy and os.path.exists(ref_npy) and npy != ref_npy:
        out["rel_l2_vs_bf16"] = relative_l2(np.load(npy), np.load(ref_npy), floor=1e-30)
    return out


# ------------------------------------------------------------------------------------------------ report
def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(res: dict) -> str:
    lines = []
    a = res.get("attn") or {}
    if a:
        b16, b8 = a.get("backends", ["cudnn", "cudnn_fp8"])
        lines += [
            f"self-attention alone, q/k/v {a.get('shape')} bf16",
            "",
            "| attention | median ms | TFLOP/s | × vs bf16 | rel-L2 N(0,1) | rel-L2 outlier heads q,k,v x10 | "
            "max-head rel-L2 (same) | rel-L2 outlier heads v x10 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        t16 = (a.get("timing", {}).get(b16) or {}).get("median_s")
        for b in (b16, b8):
            t = a.get("timing", {}).get(b) or {}
            er = a.get("error", {})
            e1 = (er.get("randn") or {}).get(b) or {}
            e2 = (er.get("outlier_heads") or {}).get(b) or {}
            e3 = (er.get("outlier_heads_v") or {}).get(b) or {}
            if t.get("error"):
                tcell = f"failed: {t['error'].splitlines()[0][:60]}"
                retry = next((v for kk, v in t.items() if kk.startswith("retry_tokens")), None)
                if retry and retry.get("median_s"):
                    tcell += f" (T=32768: {retry['median_s'] * 1e3:.1f} ms)"
                lines.append(
                    f"| {b} | {tcell} | - | - | {_fmt(e1.get('rel_l2'), '.4f')} | "
                    f"{_fmt(e2.get('rel_l2'), '.4f')} | {_fmt(e2.get('rel_l2_max_head'), '.4f')} | "
                    f"{_fmt(e3.get('rel_l2'), '.4f')} |"
                )
                continue
            m = t.get("median_s")
            lines.append(
                f"| {b} | {_fmt(m * 1e3 if m else None, '.2f')} | {_fmt(t.get('tflops'), '.0f')} | "
                f"{_fmt(t16 / m if t16 and m else None, '.2f')} | {_fmt(e1.get('rel_l2'), '.4f')} | "
                f"{_fmt(e2.get('rel_l2'), '.4f')} | {_fmt(e2.get('rel_l2_max_head'), '.4f')} | "
                f"{_fmt(e3.get('rel_l2'), '.4f')} |"
            )
        for mode in ("unnormalized", "normalized"):
            k = f"predicted_{mode}"
            e1 = (a.get("error", {}).get("randn") or {}).get(k) or {}
            e2 = (a.get("error", {}).get("outlier_heads") or {}).get(k) or {}
            e3 = (a.get("error", {}).get("outlier_heads_v") or {}).get(k) or {}
            lines.append(
                f"| jnp FP8 model, P {mode} | - | - | - | {_fmt(e1.get('rel_l2'), '.4f')} | "
                f"{_fmt(e2.get('rel_l2'), '.4f')} | {_fmt(e2.get('rel_l2_max_head'), '.4f')} | "
                f"{_fmt(e3.get('rel_l2'), '.4f')} |"
            )
        if a.get("error_phase"):
            lines.append(f"\nattn phase error: {a['error_phase'][:200]}")
    f = res.get("forward") or {}
    if f:
        b = (f.get("bf16") or {}).get("median_s")
        lines += [
            "",
            f"full-size expert forward ({res.get('config')}, {res.get('res')}, {res.get('tokens')} tokens)",
            "",
            "| variant | attention | compile s | median s | × vs BF16 | rel-L2 vs BF16 | peak GB |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in f.items():
            attn = r.get("attention_env") or "default (cudnn)"
            if r.get("error") or r.get("median_s") is None:
                why = (r.get("error") or r.get("skipped") or "not run").splitlines()[0][:70]
                lines.append(f"| {name} | {attn} | - | failed/skipped: {why} | - | - | - |")
                continue
            m = r["median_s"]
            pk = r.get("peak_bytes_in_use")
            lines.append(
                f"| {name} | {attn} | {_fmt(r.get('compile_s'), '.1f')} | {m:.3f} | "
                f"{_fmt(b / m if b else None, '.2f')} | {_fmt(r.get('rel_l2_vs_bf16'), '.4f')} | "
                f"{_fmt(pk / 1e9 if pk else None, '.1f')} |"
            )
        s = res.get("summary") or {}
        lines.append(
            f"\nW4A4 + cudnn_fp8 vs BF16: {_fmt(s.get('w4a4_fp8_speedup_vs_bf16'), '.2f')}× "
            f"(target ≥ 1.4: {s.get('meets_1.4x')}); W4A4 + bf16 attention: "
            f"{_fmt(s.get('w4a4_speedup_vs_bf16'), '.2f')}×"
        )
    return "\n".join(lines)


def summarize(res: dict) -> dict:
    f = res.get("forward") or {}
    med = lambda n: (f.get(n) or {}).get("median_s")
    b = med("bf16")
    out = {k + "_speedup_vs_bf16": (b / med(k) if b and med(k) else None) for k in ("w4a4_fp8", "w4a4", "bf16_fp8")}
    out["meets_1.4x"] = None if out["w4a4_fp8_speedup_vs_bf16"] is None else out["w4a4_fp8_speedup_vs_bf16"] >= 1.4
    out["attention_fp8_speedup"] = (res.get("attn") or {}).get("fp8_speedup")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="I2V_A14B", choices=["I2V_A14B", "TINY"])
    ap.add_argument("--res", default="480p", choices=list(RES))
    ap.add_argument("--iters", type=int, default=10, help="timed calls of the attention op")
    ap.add_argument("--fwd-iters", type=int, default=4, help="timed forwards per variant (after one warm-up)")
    ap.add_argument("--rows", type=int, default=512, help="query rows for the error vs fp32 attention")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--variants", default=",".join(v[0] for v in FWD_VARIANTS))
    ap.add_argument("--skip-attn", action="store_true")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--budget-s", type=float, default=280.0, help="wall-time budget of the whole run")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--inprocess", action="store_true", help="all phases in this process (CPU tests)")
    ap.add_argument("--phase", choices=["attn"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _run_attn_child(argv, workdir, timeout) -> dict:
    """This module's ``--phase attn`` in a child process (bench.pipeline.stream_child); its JSON + rc / log tail."""
    cmd = [sys.executable, "-m", "bench.attention_fp8", *argv, "--phase", "attn", "--workdir", workdir]
    rc, timed_out, wall_s, tail = stream_child(cmd, timeout)
    path = os.path.join(workdir, "attn.json")
    rec = json.load(open(path)) if os.path.exists(path) else {}
    rec.update(returncode=rc, timed_out=timed_out, wall_s=wall_s)
    if rc != 0:
        rec["error_phase"] = f"timed out after {timeout:.0f}s" if timed_out else f"exit code {rc}"
        rec["log_tail"] = tail
    return rec


def main(argv=None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    ensure_package_layout()
    if args.phase == "attn":
        phase_attn(args, args.workdir)
        return None
    t_start = time.perf_counter()
    f, h, w = RES[args.res][0]
    res = {
        "name": f"attention_fp8_{args.res}",
        "config": args.config,
        "res": args.res,
        "tokens": f * h * w // 4,
        "settings": {k: v for k, v in vars(args).items() if k not in ("phase", "workdir")},
        "notes": [
            "FP8 attention: cuDNN SDPA-FP8 forward (jax._src.cudnn.fused_attention_stablehlo."
            "dot_product_attention(use_fp8=True)), e4m3 q/k/v with per-tensor abs-max scales, P x 448 and "
            "the output in e4m3 (wanjax.model.attention.cudnn_fp8_attention)",
            "errors: rel-L2 vs exact fp32 attention on --rows query rows (all keys)",
            "forward: random full-size weights, bench.pipeline phases bf16 / w4a4 (real kernels, RTN, "
            "default-recipe structure), each in its own process",
        ],
    }
    root = tempfile.mkdtemp(prefix="wanjax_bench_attn_fp8_")
    name = res["name"]

    def left():
        return args.budget_s - (time.perf_counter() - t_start)

    def save():
        from bench.common import write_result

        res["summary"] = summarize(res)
        res["table"] = table(res)
        res["wall_s"] = time.perf_counter() - t_start
        write_result(name, to_jsonable(res), out_dirs=(args.results_dir,))

    try:
        if not args.skip_attn:
            log(f"phase attn (up to {min(PHASE_CAP_S['attn'], left() - 5):.0f}s)")
            try:
                if args.inprocess:
                    os.makedirs(os.path.join(root, "attn"), exist_ok=True)
                    res["attn"] = dict(phase_attn(args, os.path.join(root, "attn")))
                else:
                    res["attn"] = _run_attn_child(
                        [a for a in argv if a != "--inprocess"], root, min(PHASE_CAP_S["attn"], left() - 5)
                    )
            except Exception as e:
                res["attn"] = {"error_phase": _err(e)}
            for key in ("device", "platform", "jax", "jaxlib", "git_commit"):
                if key in res["attn"]:
                    res.setdefault(key, res["attn"][key])
            save()
        if not args.skip_forward:
            res["forward"] = {}
            wanted = [v for v in FWD_VARIANTS if v[0] in args.variants.split(",")]
            ref_npy = os.path.join(root, "bf16", f"bf16_{args.res}.npy")
            for vname, phase, fp8 in wanted:
                if left() < 30:
                    res["forward"][vname] = {
                        "skipped": f"time budget spent ({args.budget_s:.0f}s)",
                        "attention_env": "cudnn_fp8" if fp8 else None,
                    }
                    continue
                timeout = min(PHASE_CAP_S[vname], left() - 5)
                log(f"forward {vname} (bench.pipeline phase {phase}, fp8 attention {fp8}, up to {timeout:.0f}s)")
                try:
                    res["forward"][vname] = run_forward(vname, phase, fp8, args, root, ref_npy, timeout)
                except Exception as e:
                    res["forward"][vname] = {"error": _err(e)}
                log(vname, brief(res["forward"][vname]))
                save()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save()
    print("\n" + res["table"], flush=True)
    log(f"done in {res['wall_s']:.0f}s -> {os.path.join(args.results_dir, name)}.json")
    return res


if __name__ == "__main__":
    main()
