"""Activation quantization of the W4A4 linear on the GPU, and the linear end to end with each implementation.

    PYTHONPATH=. python -m bench.act_quant [--ms 32760] [--shapes 5120x5120,5120x13824,13824x5120] [--sweep]

Per (M, K, N), one process, CUPTI device time (median of 25 calls after a warm-up, ``bench.timing.cupti_ms``):

* ``aq_xla_fold``   the XLA act quant with the smoothing folded into ``down`` (the dispatcher's "xla" impl);
* ``aq_pallas``     the single-pass Pallas quantizer + the XLA rank-32 GEMM ("pallas" impl);
* ``aq_fused_*``    ``act_quant_lowrank_pallas``: one Pallas kernel for codes, scales and the rank-32 projection
                    ("fused" impl), at the default tuning and (``--sweep``) a few block / chunk / warp settings;
* ``e2e_<impl>``    ``dispatch.w4a4_linear`` end to end (act quant + weight unpack + Mosaic GPU GEMM + low-rank +
                    bias, bf16 -> bf16), packed int4 weights as stored; ``_w8``: weights stored unpacked (int8);
* ``xla_bf16``      ``x @ w`` in bf16, the baseline of every ratio.

Checks before timing, on the device: each act quant's codes against the XLA impl (fraction of differing codes: Triton's
f32 division is not correctly rounded, so exact ties may differ), scales (max relative difference) and x_lr (relative
Frobenius); each end-to-end output against the f32 reference of the same quantized layer. Results:
``act_quant.json`` in ``$OUT`` (or bench/results); a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys

import jax
import jax.numpy as jnp

from bench.common import bench_log, device_facts, no_gpu, shape_sweep, write_result

# (block rows, chunk, warps, stages, pass 2 reversed); the earlier sweeps (block / chunk / warps / stages / L2 hints)
# are in bench/results/act_quant_sweep{1,2}.json
# (block rows, chunk, warps, stages, pass 2 reversed, persistent programs or 0, fast); the earlier sweeps (block /
# chunk / warps / stages / L2 hints / reversed pass 2 / persistent grids) are in
# bench/results/act_quant_sweep{1,2}.json and act_quant_v3_sweep.json
# ("nosm": no smoothing vector, as when it is folded into the producer of x)
# (the register-resident single sweep, 0.8-3.7 ms, is in act_quant_v7_resident.log; removed after commit ee48566)
# (the last two: the rotated kernel's tuning of 2026-12-05, 4 warps / 2 stages, not yet timed without rotation)
SWEEP = [
    (64, 256, 8, 3, False, 0, "int"),
    (64, 256, 8, 3, False, 0, "int_nosm"),
    (64, 128, 8, 3, False, 0, "int_nosm"),
    (64, 256, 4, 3, False, 0, "int_nosm"),
    (64, 256, 4, 2, False, 0, "int"),
    (64, 256, 8, 2, False, 0, "int"),
]
# option sets of the fused kernel timed end to end (act_quant_gpu.FUSED_OPTIONS)
E2E_OPTIONS = ({"fast": True, "int_round": True},)
MX_SWEEP = [
    (64, 128, 8, 3, False, 0, True),
    (64, 64, 8, 3, False, 0, True),
    (64, 128, 4, 3, False, 0, True),
    (32, 128, 4, 3, False, 0, True),
    (64, 128, 8, 4, False, 0, True),
]
# option sets of the MXFP4 Triton kernel timed end to end (mxfp4_act_gpu.OPTIONS)
MX_E2E_OPTIONS = ({"fast": True},)


def _otag(opts):
    """Name suffix of an option set: the true flags, then block_rows / num_warps values."""
    flags = [k for k, v in opts.items() if v is True]
    nums = [f"{k[0]}{v}" for k, v in opts.items() if not isinstance(v, bool)]
    return ("_" + "_".join(flags + nums)) if flags or nums else ""


@contextlib.contextmanager
def _options(module, attr, opts):
    """A kernel module's dispatcher options set to ``opts`` for the duration (they are read when a jitted function
    is traced, i.e. at its first call inside the block), then restored."""
    old = getattr(module, attr)
    setattr(module, attr, opts)
    try:
        yield
    finally:
        setattr(module, attr, old)


def _tag(bm, ck, warps, stages, rev, progs, fast):
    return (
        f"b{bm}_c{ck}_w{warps}_s{stages}{'_rev' if rev else ''}{f'_p{progs}' if progs else ''}"
        f"{('_' + fast) if isinstance(fast, str) else '_fast' if fast else ''}"
    )


def _record_error(res, log, key, e, label=None):
    """``e`` (its type and first 1500 characters) as ``res["errors"][key]``, logged (300 characters) under ``label``
    (default: ``key``)."""
    res["errors"][key] = f"{type(e).__name__}: {str(e)[:1500]}"
    log(f"  {label or key}: ERROR {res['errors'][key][:300]}")


def run_mxfp4(inp, res, rec, log, sweep, e2e):
    """MXFP4: the XLA ``act_to_fp8`` against the Triton ``act_to_fp8_pallas`` (checks, then times), and the MXFP4
    linear end to end on weights prepared once, with each activation side."""
    from bench.common import rel_err
    from wanjax.kernels import dispatch
    from wanjax.kernels import reference as ref
    from wanjax.kernels.mxfp4_act_gpu import act_to_fp8_pallas
    from wanjax.kernels.mxfp4_gpu import act_to_fp8, prepare_weights
    from wanjax.numerics.fp4 import quantize_mxfp4
    from wanjax.numerics.pack import pack_nibbles

    x, smooth, down = inp["x"], inp["smooth"], inp["down"]
    rec("aq_mxfp4_to_fp8", jax.jit(lambda a, b: act_to_fp8(a, b)), x, smooth)
    x8_0, s0, bad0 = act_to_fp8(x, smooth)
    lr0 = jax.jit(lambda a, b, c: ref.lowrank_down(a, c, b))(x, smooth, down)
    variants = {"aq_mxfp4_pallas": dict(), "aq_mxfp4_pallas_r0": dict(rank0=True)}
    for bm, ck, warps, stages, rev, progs, fast in MX_SWEEP if sweep else []:
        variants[f"aq_mxfp4_pallas_{_tag(bm, ck, warps, stages, rev, progs, fast)}"] = dict(
            block_rows=bm, chunk=ck, num_warps=warps, num_stages=stages, reverse=rev, programs=progs, fast=fast
        )
    variants["aq_mxfp4_pallas_r0_fast"] = dict(rank0=True, fast=True)  # at the default tuning
    for name, kw in variants.items():
        kw = dict(kw)
        dn = None if kw.pop("rank0", False) else down
        fn = jax.jit(functools.partial(lambda a, b, c, **k2: act_to_fp8_pallas(a, b, c, **k2), **kw))
        try:
            x8, s, bad, lr = fn(x, smooth, dn)
            res["checks"][name] = {
                "fp8_mismatch_frac": float(jnp.mean((x8.astype(jnp.float32) != x8_0.astype(jnp.float32)))),
                "scale_equal": bool(jnp.all(s == s0)),
                "inexact_rows": [int(bad), int(bad0)],
                "x_lr_relerr": None if lr is None else rel_err(lr, lr0),
            }
            log(f"  check {name}: {res['checks'][name]}")
        except Exception as e:
            _record_error(res, log, f"check_{name}", e, f"check {name}")
            continue
        rec(name, fn, x, smooth, dn)
    if not e2e:
        return
    qt = quantize_mxfp4(inp["w_bf16_kn"].T.astype(jnp.float32), scale_rule="ocp_floor")
    w8, s_w, _ = prepare_weights(pack_nibbles(qt.codes), qt.scales)
    from wanjax.kernels import mxfp4_act_gpu

    y = {}
    runs = [("xla", mxfp4_act_gpu.OPTIONS)] + [("fused", o) for o in MX_E2E_OPTIONS]
    for impl, opts in runs:
        name = f"e2e_mxfp4_{impl}" + (
            _otag({kk: v for kk, v in opts.items() if kk != "fast"}) if impl == "fused" else ""
        )
        f = jax.jit(
            lambda a, w, sw, sm, dn, u, b, impl=impl: dispatch.mxfp4_linear_fp8(
                a, w, sw, smooth=sm, down=dn, up=u, bias=b, backend="pallas", act_quant_impl=impl
            )
        )
        args = (x, w8, s_w, smooth, down, inp["up"], inp["bias"])
        try:
            with _options(mxfp4_act_gpu, "OPTIONS", opts):
                y[name] = f(*args)
        except Exception as e:
            _record_error(res, log, name, e)
            continue
        rec(name, f, *args)
    for name in y:
        if name != "e2e_mxfp4_xla":
            res["checks"][f"{name}_vs_xla_relerr"] = rel_err(y[name], y["e2e_mxfp4_xla"])


def aq_check(got, want) -> dict:
    """How an act quant's ``(codes, scales, x_lr)`` differ from a reference's."""
    from bench.common import rel_err

    (q, s, lr), (qr, sr, lrr) = got, want
    return {
        "code_mismatch_frac": float(jnp.mean((q != qr).astype(jnp.float32))),
        "code_maxdiff": int(jnp.max(jnp.abs(q.astype(jnp.int32) - qr.astype(jnp.int32)))),
        "scale_max_reldiff": float(jnp.max(jnp.abs(s / sr - 1))),
        "x_lr_relerr": rel_err(lr, lrr),
    }


# (block_rows, num_warps, num_stages) tried for each rotation block; the first is the unrotated kernel's tuning
# (its codes are checked); act_quant_gpu.rotation_options holds the dispatcher's per block
ROT_SWEEP = ((64, 8, 3), (64, 8, 2), (64, 8, 1), (64, 4, 3), (64, 4, 2), (64, 4, 1), (32, 4, 2), (16, 4, 2))
ROT_BLOCKS = (1024, 512, 256, 128, 64)


def run_rotation(inp, res, rec, log):
    """Act quant with the input rotated (QuaRot blocks, after the smoothing): the fused kernel rotating in-kernel
    (``rot_signs``, Hadamard blocks = chunk, :data:`ROT_BLOCKS` dividing K, tunings :data:`ROT_SWEEP`) against the
    XLA passes + the fused kernel on their output (the f32 Walsh-Hadamard transform, and ``rotate_activations_mxu``,
    the run-time form of the XLA paths); codes checked against the f32 rotation's."""
    from wanjax.kernels import act_quant_gpu
    from wanjax.kernels.act_quant_gpu import act_quant_lowrank_pallas
    from wanjax.numerics.hadamard import random_signs, rotate_activations, rotate_activations_mxu

    x, smooth, down = inp["x"], inp["smooth"], inp["down"]
    signs = random_signs(jax.random.key(7), x.shape[1])
    for b in (b for b in ROT_BLOCKS if x.shape[1] % b == 0):
        ref_fn = jax.jit(lambda a, sm, sg, b=b: rotate_activations(a.astype(jnp.float32) / sm, sg, b))
        xr = ref_fn(x, smooth, signs)
        q0, s0, lr0 = act_quant_lowrank_pallas(xr, None, down, 1.0, None, **act_quant_gpu.FUSED_OPTIONS)
        del xr
        if b == 256:
            for tag, rotate in (("", rotate_activations), ("_mxu", rotate_activations_mxu)):
                rec(
                    f"aq_xla{tag}_rot{b}_then_fused",
                    jax.jit(
                        lambda a, sm, sg, dn, b=b, rotate=rotate: act_quant_lowrank_pallas(
                            rotate(a.astype(jnp.float32) / sm, sg, b),
                            None,
                            dn,
                            1.0,
                            None,
                            **act_quant_gpu.FUSED_OPTIONS,
                        )
                    ),
                    x,
                    smooth,
                    signs,
                    down,
                )
        for i, (bm, warps, stages) in enumerate(ROT_SWEEP):
            name = f"aq_fused_rot{b}" + ("" if i == 0 else f"_bm{bm}w{warps}s{stages}")
            fused = jax.jit(
                lambda a, sm, sg, dn, b=b, bm=bm, w=warps, st=stages: act_quant_lowrank_pallas(
                    a,
                    sm,
                    dn,
                    1.0,
                    None,
                    chunk=b,
                    rot_signs=sg,
                    block_rows=bm,
                    num_warps=w,
                    num_stages=st,
                    **act_quant_gpu.FUSED_OPTIONS,
                )
            )
            try:
                q, s_, lr = fused(x, smooth, signs, down)
                if i == 0:
                    res["checks"][name] = aq_check((q, s_, lr), (q0, s0, lr0))
                    log(f"  check {name}: {res['checks'][name]}")
                del q, s_, lr
            except Exception as e:
                res["errors"][name] = f"{type(e).__name__}: {str(e)[:600]}"
                log(f"  {name}: ERROR {str(e)[:300]}")
                continue
            rec(name, fused, x, smooth, signs, down)


SMALL_M_BLOCK_ROWS = (64, 32, 16)


def run_small_m(inp, res, rec, log):
    """Where the fused kernel should take over from XLA at small M (``dispatch.FUSED_ACT_QUANT_MIN_M`` and
    ``FUSED_ROT_ACT_QUANT_MIN_M``): the dispatcher's XLA paths (forced) against the fused kernel at block rows
    :data:`SMALL_M_BLOCK_ROWS`, unrotated and rotating in Hadamard blocks of 256 (the default recipe); codes of each
    kernel checked against its XLA path."""
    from wanjax.kernels import act_quant_gpu, dispatch
    from wanjax.kernels.act_quant_gpu import act_quant_lowrank_pallas
    from wanjax.numerics.hadamard import random_signs

    x, smooth, down = inp["x"], inp["smooth"], inp["down"]
    signs = random_signs(jax.random.key(7), x.shape[1])
    for rot in (None, signs):
        tag = "" if rot is None else "_rot256"
        xla = jax.jit(lambda a, sm, dn, sg: dispatch.act_quant(a, sm, dn, rot_signs=sg, rot_block=256, backend="xla"))
        ref_out = xla(x, smooth, down, rot)
        rec(f"aq_dispatch_xla{tag}", xla, x, smooth, down, rot)
        opts = act_quant_gpu.FUSED_OPTIONS if rot is None else act_quant_gpu.rotation_options(256)
        for bm in SMALL_M_BLOCK_ROWS:
            kw = {**opts, "block_rows": bm}
            if rot is not None:
                kw["chunk"] = 256
            f = jax.jit(lambda a, sm, dn, sg, kw=kw: act_quant_lowrank_pallas(a, sm, dn, 1.0, None, rot_signs=sg, **kw))
            name = f"aq_fused{tag}_bm{bm}"
            try:
                res["checks"][name] = aq_check(f(x, smooth, down, rot), ref_out)
            except Exception as e:
                res["errors"][name] = f"{type(e).__name__}: {str(e)[:600]}"
                log(f"  {name}: ERROR {str(e)[:300]}")
                continue
            rec(name, f, x, smooth, down, rot)


def run_shape(
    m, k, n, sweep, log, mx=False, e2e=True, e2e_impls=("xla", "pallas", "fused"), rotation=False, small_m=False
):
    from bench.common import rel_err
    from bench.kernels import make_inputs
    from bench.timing import cupti_ms
    from wanjax.kernels import dispatch
    from wanjax.kernels import reference as ref
    from wanjax.kernels import act_quant_gpu
    from wanjax.kernels.act_quant_gpu import act_quant_fused, act_quant_lowrank_pallas, act_quant_pallas

    inp = make_inputs(jax.random.key(m + k + n), m, k, n)
    x, smooth, down = inp["x"], inp["smooth"], inp["down"]
    res = {"M": m, "K": k, "N": n, "times_ms": {}, "checks": {}, "errors": {}}

    def rec(name, fn, *args):
        try:
            res["times_ms"][name] = cupti_ms(fn, *args)
            log(f"  {name:28s} {res['times_ms'][name]:8.3f} ms")
        except Exception as e:  # report and go on
            _record_error(res, log, name, e)

    bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    rec("xla_bf16", bf16, x, inp["w_bf16_kn"])
    if small_m:
        run_small_m(inp, res, rec, log)
        res["act_quant_min_bytes"] = m * k * 3
        return res

    q0, s0, lr0 = act_quant_fused(x, smooth, down, 1.0, None, fold_smooth=True)
    variants = {
        "aq_xla_fold": jax.jit(lambda a, b, c: act_quant_fused(a, b, c, 1.0, None, fold_smooth=True)),
        "aq_pallas": jax.jit(lambda a, b, c: act_quant_pallas(a, b, c, 1.0, None)),
        "aq_fused": jax.jit(lambda a, b, c: act_quant_lowrank_pallas(a, b, c, 1.0, None, fast=False)),
    }
    for bm, ck, warps, stages, rev, progs, fast in SWEEP if sweep else []:
        variants[f"aq_fused_{_tag(bm, ck, warps, stages, rev, progs, fast)}"] = jax.jit(
            functools.partial(
                lambda a, b, c, nosm=False, **kw: act_quant_lowrank_pallas(a, None if nosm else b, c, 1.0, None, **kw),
                nosm="nosm" in str(fast),
                block_rows=bm,
                chunk=ck,
                num_warps=warps,
                num_stages=stages,
                reverse=rev,
                programs=progs,
                fast=bool(fast),
                int_round="int" in str(fast),
                lazy_max="lazy" in str(fast),
            )
        )
    if mx:
        run_mxfp4(inp, res, rec, log, sweep, e2e)
    if rotation:
        variants["aq_fused_fast"] = jax.jit(
            lambda a, b, c: act_quant_lowrank_pallas(a, b, c, 1.0, None, **act_quant_gpu.FUSED_OPTIONS)
        )
        run_rotation(inp, res, rec, log)
    qn, sn, lrn = act_quant_fused(x, None, down, 1.0, None)  # the reference without smoothing
    for name, fn in variants.items():
        try:
            q, s, lr = fn(x, smooth, down)
            qr, sr, lrr = (qn, sn, lrn) if "nosm" in name else (q0, s0, lr0)
            res["checks"][name] = aq_check((q, s, lr), (qr, sr, lrr))
            log(f"  check {name}: {res['checks'][name]}")
        except Exception as e:
            _record_error(res, log, f"check_{name}", e, f"check {name}")
            continue
        rec(name, fn, x, smooth, down)

    w8 = ref.unpack_int4(inp["w_packed"])

    def ref_linear(q, s, lr):  # the f32 reference linear on act quant outputs (int8 weights)
        acc = jax.lax.dot_general(q, w8, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        return ref.w4a4_epilogue(acc, s, inp["s_w"], lr, inp["up"], inp["bias"], jnp.float32)

    y_ref = ref_linear(q0, s0, lr0)
    opts0 = act_quant_gpu.FUSED_OPTIONS
    for impl, opts in [(i, o) for i in (e2e_impls if e2e else ()) for o in (E2E_OPTIONS if i == "fused" else (opts0,))]:
        otag = _otag(opts) if impl == "fused" else ""
        for tag, w in ((otag, inp["w_packed"]), (otag + "_w8", w8)):
            f = jax.jit(
                lambda a, wq, sw, sm, dn, u, b, impl=impl: dispatch.w4a4_linear(
                    a, wq, sw, smooth=sm, down=dn, up=u, bias=b, backend="pallas", act_quant_impl=impl
                )
            )
            args = (x, w, inp["s_w"], smooth, down, inp["up"], inp["bias"])
            try:
                with _options(act_quant_gpu, "FUSED_OPTIONS", opts):
                    res["checks"][f"e2e_{impl}{tag}_relerr"] = rel_err(f(*args), y_ref)
            except Exception as e:
                res["errors"][f"e2e_{impl}{tag}"] = f"{type(e).__name__}: {str(e)[:1500]}"
                continue
            rec(f"e2e_{impl}{tag}", f, *args)
    if sweep and e2e and "fused" in e2e_impls:  # the linear when the smoothing is folded into the producer of x
        y_n = ref_linear(qn, sn, lrn)
        f = jax.jit(
            lambda a, wq, sw, dn, u, b: dispatch.w4a4_linear(
                a, wq, sw, smooth=None, down=dn, up=u, bias=b, backend="pallas", act_quant_impl="fused"
            )
        )
        args = (x, w8, inp["s_w"], down, inp["up"], inp["bias"])
        try:
            res["checks"]["e2e_fused_nosmooth_w8_relerr"] = rel_err(f(*args), y_n)
            rec("e2e_fused_nosmooth_w8", f, *args)
        except Exception as e:
            res["errors"]["e2e_fused_nosmooth_w8"] = f"{type(e).__name__}: {str(e)[:1500]}"
    t = res["times_ms"]
    if "xla_bf16" in t:
        res["speedup_vs_xla_bf16"] = {kk: t["xla_bf16"] / v for kk, v in t.items() if kk.startswith("e2e")}
        log(f"  speedups: {res['speedup_vs_xla_bf16']}")
    # the floor of an act quant pass: read x (bf16) once, write the int8 codes once
    res["act_quant_min_bytes"] = m * k * 3
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="32760")
    ap.add_argument("--shapes", default="5120x5120,5120x13824,13824x5120")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--name", default="act_quant", help="result file name (without .json)")
    ap.add_argument("--mxfp4", action="store_true", help="also the MXFP4 activation side (XLA and Triton) and linear")
    ap.add_argument("--no-e2e", action="store_true", help="act quant only (no end-to-end linears)")
    ap.add_argument("--e2e-impls", default="xla,pallas,fused", help="INT4 act quant impls timed end to end")
    ap.add_argument(
        "--rotate",
        action="store_true",
        help="also the act quant of a rotated input (in-kernel Hadamard "
        "blocks of 64-1024, tunings swept, vs an XLA rotation pass)",
    )
    ap.add_argument(
        "--small-m",
        action="store_true",
        help="only the small-M crossover: the dispatcher's XLA act "
        "quant vs the fused kernel at 64/32/16-row blocks, unrotated "
        "and rotating (blocks of 256)",
    )
    a = ap.parse_args(argv)
    if no_gpu("act_quant", "nothing to time (the kernels are tested in the interpreter by the test suite)"):
        return 0
    from bench.layout import ensure_package_layout

    ensure_package_layout()
    log = bench_log("act_quant")
    rows = []
    for m, k, n in shape_sweep(a.ms, a.shapes, log):
        rows.append(
            run_shape(m, k, n, a.sweep, log, a.mxfp4, not a.no_e2e, tuple(a.e2e_impls.split(",")), a.rotate, a.small_m)
        )
        write_result(a.name, {"device": device_facts(), "rows": rows})
    print(
        "\n| M | K | N | bf16 | aq xla | aq pallas | aq fused | GB/s fused | e2e xla | e2e pallas | e2e fused | "
        "e2e fused, int8 w |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["times_ms"]
        g = lambda kk: t.get(kk, float("nan"))
        sp = lambda kk: f"{g(kk):.3f} ({g('xla_bf16') / g(kk):.2f}x)"
        print(
            f"| {r['M']} | {r['K']} | {r['N']} | {g('xla_bf16'):.3f} | {g('aq_xla_fold'):.3f} | {g('aq_pallas'):.3f} | "
            f"{g('aq_fused'):.3f} | {r['act_quant_min_bytes'] / g('aq_fused') / 1e6:.0f} | {sp('e2e_xla')} | "
            f"{sp('e2e_pallas')} | {sp('e2e_fused')} | {sp('e2e_fused_w8')} |"
        )
    for r in rows:  # every variant, for the sweeps
        t = r["times_ms"]
        print(
            f"\nM={r['M']} K={r['K']} N={r['N']}: "
            + "; ".join(
                f"{kk} {v:.3f}" + (f" ({t['xla_bf16'] / v:.2f}x)" if kk.startswith("e2e") and "xla_bf16" in t else "")
                for kk, v in t.items()
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
