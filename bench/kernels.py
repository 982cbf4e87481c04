"""W4A4 kernel benchmark on an H100 (run on the GPU machine; CPU prints a notice and exits).

    PYTHONPATH=. python -m bench.kernels [--ms 32760] [--shapes 5120x5120,5120x13824,13824x5120] [--out DIR] [--sweep 5120x5120]
    PYTHONPATH=. python -m bench.kernels --g128 [--ms 32760] [--shapes ...] [--sweep 5120x5120]   (group-scaled GEMM)

Per (M, K, N), side by side in one process:
  xla_bf16           x_bf16 [M,K] @ w_bf16 [K,N]                         (the baseline)
  xla_int8           dot_general(q_x int8, q_w int8 [N,K]) -> int32      (cuBLASLt IMMA)
  xla_int8_epi       same + f32 scale/bias/low-rank epilogue -> bf16     (the "xla" dispatch backend)
  pallas_*           the Mosaic GPU W4A4 GEMM variants (kernels/w4a4_gpu.py)
  act_quant          the fused activation quantization (+ rank-32 down projection), bf16 x -> int8 q
  e2e_*              W4A4 linear end to end: act quant + weight unpack + GEMM (+ low-rank + bias), bf16 -> bf16

Times: median over >= 20 iterations of the device time of all kernels of one call (CUPTI, via
jax.experimental.mosaic.gpu.profiler.measure) after a warm-up call; the baseline and the end-to-end linear are also
timed by wall clock with rotated inputs (3 input sets) as a cross-check. Correctness is checked on the device in the
same run before timing: the integer accumulation bit-exactly (f32 output, unit scales) against XLA's int8 dot, which is
itself checked against the int32-upcast reference on a slice of rows; the full epilogue against the f32 reference to
<= 1e-2 relative (Frobenius); the output buffer is poisoned with NaN through the allocator first.

``--g128`` benchmarks the group-scaled GEMM instead (kernels/w4a4_g128_gpu.py: int4 weights with one scale per channel
and group of 128 along K), per (M, K, N): xla_bf16 (baseline), xla_g128 (the dispatcher's XLA fallback: a loop over the
groups), pallas_g128_r0 / _r32 (the kernel alone; ``_overlap``: G128Config(overlap_rescale=True); ``_magic``: magic_cvt=True), pallas_int8w_r32
(the per-channel kernel, for comparison) and e2e_linear_g128_r32[_overlap] (act quant + weight unpack + g128 GEMM +
low-rank + bias, bf16 -> bf16; also by wall clock).
Checks before timing: the group accumulation bit-exactly (unit token scales, power-of-two group scales, f32 output:
every partial sum is exact) against the XLA group loop, which is itself checked against the int32-upcast reference on
a slice of rows; the full epilogue to <= 1e-2 relative; outputs poisoned first. Results: kernels_w4a4_g128.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.common import rel_err
from bench.layout import ensure_package_layout
from bench.timing import ITERS, cupti_kernels, cupti_ms, wall_ms

ensure_package_layout()  # wanjax.kernels from a plain checkout (PYTHONPATH=., no install)
from wanjax.kernels import reference as ref  # noqa: E402
from wanjax.kernels.act_quant_gpu import act_quant_fused, act_quant_pallas, quantize_rows_pallas  # noqa: E402
from wanjax.kernels.mxfp4_gpu import exp2_exact  # noqa: E402
from wanjax.kernels.w4a4_g128_gpu import G128_CONFIG, w4a4_g128_matmul_gpu  # noqa: E402
from wanjax.kernels.w4a4_gpu import W4A4Config, w4a4_matmul_gpu  # noqa: E402

R = 32


def poison(shape, dtype):
    """Fill a buffer of the output's size with NaN and free it, so that the next allocation likely reuses it."""
    p = jnp.full(shape, jnp.nan, dtype)
    p.block_until_ready()
    del p


def make_inputs(key, m, k, n, r=R):
    ks = jax.random.split(key, 8)
    x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(ks[1], (n, k), jnp.float32) * 0.02
    w_packed, s_w = ref.quantize_weight_int4(w)
    smooth = jax.random.uniform(ks[2], (k,), jnp.float32, 0.5, 2.0)
    down = (jax.random.normal(ks[3], (k, r), jnp.float32) * 0.02).astype(jnp.bfloat16)
    up = (jax.random.normal(ks[4], (r, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    bias = jax.random.normal(ks[5], (n,), jnp.float32) * 0.1
    w_bf16_kn = w.T.astype(jnp.bfloat16)
    return dict(x=x, w_packed=w_packed, s_w=s_w, smooth=smooth, down=down, up=up, bias=bias, w_bf16_kn=w_bf16_kn)


def _recorder(res: dict, ops: float, log):
    """``rec(name, fn, *args, check=None)``: run ``check`` (stored in ``res["checks"]``), time ``fn(*args)`` with
    CUPTI into ``res["times_ms"]``; an exception is stored in ``res["errors"]`` and the benchmark goes on."""

    def rec(name, fn, *args, check=None):
        try:
            if check is not None:
                res["checks"][name] = check()
                log(f"  check {name}: {res['checks'][name]}")
            t = cupti_ms(fn, *args)
            res["times_ms"][name] = t
            log(f"  {name:34s} {t:8.3f} ms  {ops / t / 1e9:8.1f} T(FL)OPS")
        except Exception as e:  # keep going; report
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:2000]}"
            log(f"  {name}: ERROR {type(e).__name__}: {str(e)[:600]}")
            traceback.print_exc()

    return rec


def run_shape(m, k, n, sweep, log, epi_sweep=False):
    res = {"M": m, "K": k, "N": n, "times_ms": {}, "wall_ms": {}, "checks": {}, "errors": {}}
    ops = 2.0 * m * k * n
    inp = make_inputs(jax.random.key(m + 7 * k + 13 * n), m, k, n)
    x, w_packed, s_w, smooth, down, up, bias = (
        inp[a] for a in ("x", "w_packed", "s_w", "smooth", "down", "up", "bias")
    )
    q_x, s_x, x_lr = act_quant_fused(x, smooth, down, 1.0, None)
    q_w = jax.jit(ref.unpack_int4)(w_packed)
    jax.block_until_ready((q_x, s_x, x_lr, q_w))

    rec = _recorder(res, ops, log)

    nt = (((1,), (1,)), ((), ()))
    xla_int8 = jax.jit(lambda a, b: lax.dot_general(a, b, nt, preferred_element_type=jnp.int32))
    acc = xla_int8(q_x, q_w)
    # XLA int8 dot vs the int32-upcast reference on a slice of rows (exactness of the check's reference itself).
    rows = slice(0, 512)
    acc_ref_rows = jax.jit(ref.int_matmul_nt)(q_x[rows], q_w)
    res["checks"]["xla_int8_vs_int32_ref_rows0-511_exact"] = bool(jnp.array_equal(acc[rows], acc_ref_rows))
    y_ref = jax.jit(lambda *a: ref.w4a4_epilogue(*a, out_dtype=jnp.float32))(acc, s_x, s_w, x_lr, up, bias)
    # act quant bit-exactness vs the CPU reference on a slice of rows.
    try:
        cpu = jax.devices("cpu")[0]
        xs = jax.device_put(x[:256], cpu)
        sm = jax.device_put(smooth, cpu)
        dn = jax.device_put(down, cpu)
        q_c, s_c, lr_c = jax.jit(ref.act_quant)(xs, sm, dn)
        res["checks"]["act_quant_q_exact_vs_cpu_rows0-255"] = bool(
            np.array_equal(np.asarray(q_c), np.asarray(q_x[:256]))
        )
        res["checks"]["act_quant_s_exact_vs_cpu_rows0-255"] = bool(
            np.array_equal(np.asarray(s_c), np.asarray(s_x[:256]))
        )
        res["checks"]["act_quant_xlr_relerr_vs_cpu"] = rel_err(x_lr[:256], lr_c)
    except Exception as e:
        res["errors"]["act_quant_cpu_check"] = str(e)[:500]

    # --- baselines
    w_bf16 = inp["w_bf16_kn"]
    bf16_dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    rec("xla_bf16", bf16_dot, x, w_bf16)
    rec("xla_int8", xla_int8, q_x, q_w)
    xla_epi = jax.jit(
        lambda qx, sx, qw, sw, xl, u, b: ref.w4a4_epilogue(
            lax.dot_general(qx, qw, nt, preferred_element_type=jnp.int32), sx, sw, xl, u, b
        )
    )
    rec(
        "xla_int8_epi_r32",
        xla_epi,
        q_x,
        s_x,
        q_w,
        s_w,
        x_lr,
        up,
        bias,
        check=lambda: rel_err(xla_epi(q_x, s_x, q_w, s_w, x_lr, up, bias), y_ref),
    )
    aq_variants = {
        "act_quant_r32": (lambda a, b, c: act_quant_fused(a, b, c, 1.0, None), (x, smooth, down)),
        "act_quant_r32_fold": (
            lambda a, b, c: act_quant_fused(a, b, c, 1.0, None, fold_smooth=True),
            (x, smooth, down),
        ),
        "act_quant_r0": (lambda a, b: act_quant_fused(a, b, None, 1.0, None), (x, smooth)),
        "act_quant_r32_pallas": (lambda a, b, c: act_quant_pallas(a, b, c, 1.0, None), (x, smooth, down)),
        "act_quant_r0_pallas": (jax.jit(lambda a, b: quantize_rows_pallas(a, b, 1.0, None)), (x, smooth)),
        "act_quant_r0_pallas_bm1": (
            jax.jit(lambda a, b: quantize_rows_pallas(a, b, 1.0, None, block_rows=1)),
            (x, smooth),
        ),
    }
    try:
        q_p, s_p, lr_p = act_quant_pallas(x, smooth, down, 1.0, None)
        res["checks"]["act_quant_pallas_q_mismatch_frac_vs_xla"] = float(jnp.mean((q_p != q_x).astype(jnp.float32)))
        res["checks"]["act_quant_pallas_s_max_relerr_vs_xla"] = float(jnp.max(jnp.abs(s_p / s_x - 1)))
        res["checks"]["act_quant_pallas_xlr_relerr"] = rel_err(lr_p, x_lr)
        log(f"  check act_quant_pallas: { {kk: v for kk, v in res['checks'].items() if 'pallas' in kk} }")
    except Exception as e:
        res["errors"]["act_quant_pallas_check"] = f"{type(e).__name__}: {str(e)[:1500]}"
        log(f"  act_quant_pallas check ERROR {e}")
    for name, (fn, args) in aq_variants.items():
        rec(name, fn, *args)
        try:
            per_kernel = cupti_kernels(fn, *args)
            res.setdefault("kernels_breakdown", {})[name] = per_kernel
            log(f"    kernels: {per_kernel}")
        except Exception as e:
            log(f"    breakdown failed: {e}")
    _, _, x_lr_fold = act_quant_fused(x, smooth, down, 1.0, None, fold_smooth=True)
    res["checks"]["act_quant_fold_xlr_relerr"] = rel_err(x_lr_fold, x_lr)

    ones_m = jnp.ones((m,), jnp.float32)
    ones_n = jnp.ones((n,), jnp.float32)

    def gemm(weights, r, cfg, out_dtype=jnp.bfloat16):
        @jax.jit
        def f(qx, sx, w, sw, xl, u, b):
            return w4a4_matmul_gpu(
                qx, sx, w, sw, xl if r else None, u if r else None, b, out_dtype=out_dtype, weights=weights, config=cfg
            )

        return f

    def exact_check(weights, cfg):
        def chk():
            f = gemm(weights, 0, cfg, jnp.float32)
            wv = q_w if weights == "int8" else w_packed
            poison((m, n), jnp.float32)
            out = f(q_x, ones_m, wv, ones_n, x_lr, up, None)
            return bool(jnp.array_equal(out, acc.astype(jnp.float32)))

        return chk

    def epi_check(weights, r, cfg):
        def chk():
            f = gemm(weights, r, cfg)
            wv = q_w if weights == "int8" else w_packed
            poison((m, n), jnp.bfloat16)
            out = f(q_x, s_x, wv, s_w, x_lr, up, bias)
            exp = (
                y_ref
                if r
                else jax.jit(lambda *a: ref.w4a4_epilogue(*a, out_dtype=jnp.float32))(acc, s_x, s_w, None, None, bias)
            )
            return rel_err(out, exp)

        return chk

    base = W4A4Config()
    variants = [
        ("pallas_int8w_r0", "int8", 0, base, True),
        ("pallas_int8w_r32", "int8", R, base, True),
        ("pallas_int8w_r32_chunk", "int8", R, W4A4Config(lowrank_mode="chunk"), True),
        ("pallas_int4w_r0", "int4", 0, base, True),
        ("pallas_int4w_r32", "int4", R, base, True),
    ]
    if sweep:
        for w_, r_, st, gw, minor_n in [
            ("int8", 0, 3, 1, True),
            ("int8", 0, 3, 2, True),
            ("int8", 0, 3, 8, True),
            ("int8", 0, 3, 4, False),
            ("int8", 0, 4, 4, True),
            ("int8", R, 3, 2, True),
            ("int8", R, 3, 8, True),
            ("int4", 0, 4, 4, True),
            ("int4", R, 4, 4, True),
            ("int4", R, 3, 8, True),
        ]:
            variants.append(
                (
                    f"pallas_{w_}w_r{r_}_s{st}_g{gw}{'N' if minor_n else 'M'}",
                    w_,
                    r_,
                    W4A4Config(stages=st, grid_tile_width=gw, grid_minor_n=minor_n),
                    False,
                )
            )
    if epi_sweep:  # the rank-32 epilogue's shared-memory squeeze: epilogue chunk / buffers vs pipeline stages / tile_k
        for st, tk, epi, slots in [
            (3, 128, 64, 1),
            (2, 128, 64, 2),
            (3, 128, 16, 2),
            (4, 64, None, None),
            (5, 64, None, None),
            (6, 64, None, None),
        ]:
            variants.append(
                (
                    f"pallas_int8w_r{R}_s{st}_k{tk}_e{epi}x{slots}",
                    "int8",
                    R,
                    W4A4Config(stages=st, tile_k=tk, epi_tile_n=epi, out_slots=slots),
                    True,
                )
            )
    for name, weights, r, cfg, checked in variants:
        wv = q_w if weights == "int8" else w_packed
        chk = None
        if checked:
            ex, ep = exact_check(weights, cfg), epi_check(weights, r, cfg)
            chk = lambda ex=ex, ep=ep, r=r: {"int_acc_bit_exact": ex() if r == 0 else None, "epilogue_relerr": ep()}
        rec(name, gemm(weights, r, cfg), q_x, s_x, wv, s_w, x_lr, up, bias, check=chk)

    # --- MXFP4 path: FP8 wgmma on operands re-encoded from MXFP4 (GEMM alone; re-encoding done beforehand)
    import importlib

    mx = importlib.import_module(ref.__name__.rsplit(".", 1)[0] + ".mxfp4_gpu")
    try:
        e2m1 = jnp.asarray([0, 0.5, 1, 1.5, 2, 3, 4, 6], jnp.float32)
        kx = jax.random.split(jax.random.key(5), 6)

        def mxr(k1, k2, k3, rows):
            v = e2m1[jax.random.randint(k1, (rows, k), 0, 8)] * jnp.where(
                jax.random.bernoulli(k2, 0.5, (rows, k)), 1, -1
            )
            return v, jax.random.randint(k3, (rows, k // 32), -11, -3)

        xv, xe = mxr(*kx[:3], m)
        wv, we = mxr(*kx[3:], n)
        x8, ex, bad_x = mx.reencode_rows(xv, xe)
        w8, ew, bad_w = mx.reencode_rows(wv, we)
        sxm, swm = exp2_exact(ex), exp2_exact(ew)
        res["checks"]["mxfp4_inexact_rows"] = [int(bad_x), int(bad_w)]
        fp8_gemm = jax.jit(lambda a, sa, b, sb, xl, u, bb: w4a4_matmul_gpu(a, sa, b, sb, xl, u, bb, weights="fp8"))
        y_mx_ref = jax.jit(lambda *a: mx.mxfp4_matmul_reference(*a, out_dtype=jnp.float32))(
            xv, xe, wv, we, x_lr, up, bias
        )
        rec(
            "pallas_mxfp4_fp8_r32",
            fp8_gemm,
            x8,
            sxm,
            w8,
            swm,
            x_lr,
            up,
            bias,
            check=lambda: rel_err(fp8_gemm(x8, sxm, w8, swm, x_lr, up, bias), y_mx_ref),
        )
        xv = wv = x8 = w8 = None  # free them (the check closure reads x8 / w8)
    except Exception as e:
        res["errors"]["mxfp4"] = f"{type(e).__name__}: {str(e)[:1500]}"
        log(f"  mxfp4 ERROR {e}")

    # --- end to end (bf16 x + packed weights -> bf16 y), act quant + unpack + GEMM + low-rank + bias
    def e2e(weights, fold=False):
        @jax.jit
        def f(x_, wp, sw, sm, dn, u, b):
            if fold == "pallas":
                qx, sx, xl = act_quant_pallas(x_, sm, dn, 1.0, None)
            else:
                qx, sx, xl = act_quant_fused(x_, sm, dn, 1.0, None, fold_smooth=fold)
            wv = ref.unpack_int4(wp) if weights == "int8" else wp
            return w4a4_matmul_gpu(qx, sx, wv, sw, xl, u, b, weights=weights)

        return f

    e2e_args = (x, w_packed, s_w, smooth, down, up, bias)
    y_lin_ref = y_ref  # same inputs, same quantization
    for weights in ("int8", "int4"):
        for fold in (False, True, "pallas"):
            f = e2e(weights, fold)
            tag = {False: "", True: "_fold", "pallas": "_pallasquant"}[fold]
            rec(f"e2e_linear_{weights}w_r32{tag}", f, *e2e_args, check=lambda f=f: rel_err(f(*e2e_args), y_lin_ref))
    # wall-clock cross-check with rotated inputs
    try:
        xs = [x] + [
            jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float32).astype(jnp.bfloat16) for i in range(2)
        ]
        res["wall_ms"]["xla_bf16"] = wall_ms(bf16_dot, [(xi, w_bf16) for xi in xs])
        for fold, tag in ((True, "_fold"), ("pallas", "_pallasquant")):
            try:
                f = e2e("int8", fold)
                res["wall_ms"][f"e2e_linear_int8w_r32{tag}"] = wall_ms(f, [(xi, *e2e_args[1:]) for xi in xs])
            except Exception as e:
                res["errors"][f"wall{tag}"] = str(e)[:500]
        log(f"  wall (rotated inputs): {res['wall_ms']}")
        del xs
    except Exception as e:
        res["errors"]["wall"] = str(e)[:500]

    t = res["times_ms"]
    res["tops"] = {kk: ops / v / 1e9 for kk, v in t.items() if not kk.startswith("act_quant")}
    if "xla_bf16" in t:
        res["speedup_vs_xla_bf16"] = {kk: t["xla_bf16"] / v for kk, v in t.items()}
    # memory of the packed weights: 0.5 byte/parameter + 4-byte scale per channel
    res["weight_bytes"] = {"bf16": 2 * n * k, "packed_int4_plus_scales": n * k // 2 + 4 * n}
    return res


def _g128_operands(m, k, n):
    """Inputs of one g128 shape: bf16 x / weight, smoothing, low-rank factors, bias, the grouped INT4 weight (packed
    and unpacked to int8) with its [N, K/128] scales, and the fused act quant's codes, scales and x_lr."""
    inp = make_inputs(jax.random.key(m + 7 * k + 13 * n), m, k, n)
    x, smooth, down, up, bias, w_bf16 = (inp[a] for a in ("x", "smooth", "down", "up", "bias", "w_bf16_kn"))
    w_packed, s_w = jax.jit(ref.quantize_weight_int4_grouped)(w_bf16.T)  # [N, K/2], [N, K/128]
    q_x, s_x, x_lr = act_quant_fused(x, smooth, down, 1.0, None, fold_smooth=True)
    q_w = jax.jit(ref.unpack_int4)(w_packed)
    jax.block_until_ready((q_x, s_x, x_lr, q_w, s_w))
    return dict(
        x=x,
        smooth=smooth,
        down=down,
        up=up,
        bias=bias,
        w_bf16=w_bf16,
        w_packed=w_packed,
        s_w=s_w,
        q_x=q_x,
        s_x=s_x,
        x_lr=x_lr,
        q_w=q_w,
    )


def _g128_e2e(cfg):
    """The g128 linear end to end (act quant + weight unpack + g128 GEMM), jitted:
    ``f(x, w_packed, s_w, smooth, down, up, bias)``."""

    @jax.jit
    def e2e(x_, wp, sw, sm, dn, u, b):
        qx, sx, xl = act_quant_fused(x_, sm, dn, 1.0, None, fold_smooth=True)
        return w4a4_g128_matmul_gpu(qx, sx, ref.unpack_int4(wp), sw, xl, u, b, config=cfg)

    return e2e


#: the per-channel kernel with int8 weights, for comparison with g128 on the same operands
_per_channel_int8w = jax.jit(lambda qx, sx, w, sw, xl, u, b: w4a4_matmul_gpu(qx, sx, w, sw, xl, u, b, weights="int8"))


def run_shape_g128(m, k, n, sweep, log):
    """Group-scaled (g128) W4A4 GEMM vs XLA bf16 at one (M, K, N); see the module docstring."""
    import dataclasses

    res = {"M": m, "K": k, "N": n, "group": 128, "times_ms": {}, "wall_ms": {}, "checks": {}, "errors": {}}
    ops = 2.0 * m * k * n
    o = _g128_operands(m, k, n)
    x, smooth, down, up, bias, w_bf16 = (o[a] for a in ("x", "smooth", "down", "up", "bias", "w_bf16"))
    w_packed, s_w, q_x, s_x, x_lr, q_w = (o[a] for a in ("w_packed", "s_w", "q_x", "s_x", "x_lr", "q_w"))
    res["weight_bytes"] = {"bf16": 2 * n * k, "packed_int4_plus_group_scales": n * k // 2 + 4 * n * (k // 128)}

    rec = _recorder(res, ops, log)

    nt = (((1,), (1,)), ((), ()))
    int8_dot = lambda a, b: lax.dot_general(a, b, nt, preferred_element_type=jnp.int32)
    xla_acc = jax.jit(lambda qx, qw, sw: ref.group_scaled_acc(qx, qw, sw, 128, int_dot=int8_dot))
    ones_m = jnp.ones((m,), jnp.float32)
    ones_n = jnp.ones((n,), jnp.float32)
    # power-of-two group scales: every partial sum of the f32 group accumulation is exact
    # exact powers of two from the exponent bits: XLA:GPU may lower jnp.exp2 through exp(x * ln 2), off by ulps, which
    # makes the sums order-dependent (the 2026-12-01 H200 run reported group_acc_bit_exact False with jnp.exp2 here)
    sw_pow2 = exp2_exact(-jax.random.randint(jax.random.key(3), (n, k // 128), 0, 4))
    acc_pow2 = xla_acc(q_x, q_w, sw_pow2)
    rows = slice(0, 256)
    acc_ref_rows = jax.jit(lambda qx, qw, sw: ref.group_scaled_acc(qx, qw, sw, 128))(q_x[rows], q_w, sw_pow2)
    res["checks"]["xla_g128_vs_int32_ref_rows0-255_exact"] = bool(jnp.array_equal(acc_pow2[rows], acc_ref_rows))
    del acc_ref_rows
    y_ref = jax.jit(
        lambda qx, qw, *a: ref.w4a4_epilogue(xla_acc(qx, qw, a[1]), a[0], ones_n, *a[2:], out_dtype=jnp.float32)
    )(q_x, q_w, s_x, s_w, x_lr, up, bias)

    bf16_dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    rec("xla_bf16", bf16_dot, x, w_bf16)
    xla_g128 = jax.jit(
        lambda qx, sx, qw, sw, xl, u, b: ref.w4a4_epilogue(
            xla_acc(qx, qw, sw), sx, jnp.ones((qw.shape[0],), jnp.float32), xl, u, b
        )
    )
    rec("xla_g128_r32", xla_g128, q_x, s_x, q_w, s_w, x_lr, up, bias)

    def gemm(r, cfg, out_dtype=jnp.bfloat16):
        @jax.jit
        def f(qx, sx, w, sw, xl, u, b):
            return w4a4_g128_matmul_gpu(
                qx, sx, w, sw, xl if r else None, u if r else None, b, out_dtype=out_dtype, config=cfg
            )

        return f

    def exact_check(cfg):
        f = gemm(0, cfg, jnp.float32)
        poison((m, n), jnp.float32)
        return bool(jnp.array_equal(f(q_x, ones_m, q_w, sw_pow2, None, None, None), acc_pow2))

    def epi_check(r, cfg):
        f = gemm(r, cfg)
        poison((m, n), jnp.bfloat16)
        out = f(q_x, s_x, q_w, s_w, x_lr, up, bias)
        exp = (
            y_ref
            if r
            else jax.jit(lambda *a: ref.w4a4_epilogue(*a, out_dtype=jnp.float32))(
                xla_acc(q_x, q_w, s_w), s_x, ones_n, None, None, bias
            )
        )
        return rel_err(out, exp)

    ov = dataclasses.replace(G128_CONFIG, overlap_rescale=True)
    ovm = dataclasses.replace(ov, magic_cvt=True)
    variants = [
        ("pallas_g128_r0", 0, G128_CONFIG, True),
        ("pallas_g128_r32", R, G128_CONFIG, True),
        ("pallas_g128_r0_overlap", 0, ov, True),
        ("pallas_g128_r32_overlap", R, ov, True),
        ("pallas_g128_r32_magic", R, dataclasses.replace(G128_CONFIG, magic_cvt=True), True),
        ("pallas_g128_r0_overlap_magic", 0, ovm, True),
        ("pallas_g128_r32_overlap_magic", R, ovm, True),
        ("pallas_g128_r32_chunk", R, dataclasses.replace(G128_CONFIG, lowrank_mode="chunk"), False),
    ]
    if sweep:
        for st, gw, tm, o in [
            (2, 4, 128, False),
            (4, 4, 128, False),
            (3, 1, 128, False),
            (3, 8, 128, False),
            (3, 4, 64, False),
            (3, 4, 192, False),
            (4, 4, 128, True),
            (3, 8, 128, True),
        ]:
            variants.append(
                (
                    f"pallas_g128_r32_s{st}_g{gw}_m{tm}{'_overlap' if o else ''}",
                    R,
                    dataclasses.replace(G128_CONFIG, stages=st, grid_tile_width=gw, tile_m=tm, overlap_rescale=o),
                    True,
                )
            )
    for name, r, cfg, checked in variants:
        chk = None
        if checked:
            chk = lambda cfg=cfg, r=r: {
                "group_acc_bit_exact": exact_check(cfg) if r == 0 else None,
                "epilogue_relerr": epi_check(r, cfg),
            }
        rec(name, gemm(r, cfg), q_x, s_x, q_w, s_w, x_lr, up, bias, check=chk)
    # the per-channel kernel on the same operands (per-channel scale = mean group scale), for comparison
    rec("pallas_int8w_r32_per_channel", _per_channel_int8w, q_x, s_x, q_w, jnp.mean(s_w, axis=1), x_lr, up, bias)
    e2e_args = (x, w_packed, s_w, smooth, down, up, bias)
    e2e = _g128_e2e(G128_CONFIG)
    rec("e2e_linear_g128_r32", e2e, *e2e_args, check=lambda: rel_err(e2e(*e2e_args), y_ref))
    e2e_ov = _g128_e2e(ov)
    rec("e2e_linear_g128_r32_overlap", e2e_ov, *e2e_args, check=lambda: rel_err(e2e_ov(*e2e_args), y_ref))
    e2e_ovm = _g128_e2e(ovm)
    rec("e2e_linear_g128_r32_overlap_magic", e2e_ovm, *e2e_args, check=lambda: rel_err(e2e_ovm(*e2e_args), y_ref))
    try:
        xs = [x] + [
            jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float32).astype(jnp.bfloat16) for i in range(2)
        ]
        res["wall_ms"]["xla_bf16"] = wall_ms(bf16_dot, [(xi, w_bf16) for xi in xs])
        res["wall_ms"]["e2e_linear_g128_r32"] = wall_ms(e2e, [(xi, *e2e_args[1:]) for xi in xs])
        res["wall_ms"]["e2e_linear_g128_r32_overlap"] = wall_ms(e2e_ov, [(xi, *e2e_args[1:]) for xi in xs])
        log(f"  wall (rotated inputs): {res['wall_ms']}")
        del xs
    except Exception as e:
        res["errors"]["wall"] = str(e)[:500]
    t = res["times_ms"]
    res["tops"] = {kk: ops / v / 1e9 for kk, v in t.items()}
    if "xla_bf16" in t:
        res["speedup_vs_xla_bf16"] = {kk: t["xla_bf16"] / v for kk, v in t.items()}
    return res


def run_shape_g128_quick(m, k, n, log):
    """``--g128-quick``: the g128 kernel schedules alone (plain, overlap, magic, overlap + magic; r = 32), the
    per-channel kernel and XLA bf16, no XLA g128 reference (its int32 scan compiles for minutes). Checks on the GPU:
    every variant's f32 output (unit token scales, power-of-two group scales: exact sums) bit-identical to the plain
    schedule's, and the end-to-end linears (plain vs overlap + magic) equal."""
    import dataclasses

    res = {"M": m, "K": k, "N": n, "group": 128, "mode": "quick", "times_ms": {}, "checks": {}, "errors": {}}
    ops = 2.0 * m * k * n
    o = _g128_operands(m, k, n)
    x, smooth, down, up, bias, w_bf16 = (o[a] for a in ("x", "smooth", "down", "up", "bias", "w_bf16"))
    w_packed, s_w, q_x, s_x, x_lr, q_w = (o[a] for a in ("w_packed", "s_w", "q_x", "s_x", "x_lr", "q_w"))
    rec = _recorder(res, ops, log)
    sw_pow2 = exp2_exact(-jax.random.randint(jax.random.key(3), (n, k // 128), 0, 4))
    ones_m = jnp.ones((m,), jnp.float32)
    cfgs = {
        "plain": G128_CONFIG,
        "overlap": dataclasses.replace(G128_CONFIG, overlap_rescale=True),
        "magic": dataclasses.replace(G128_CONFIG, magic_cvt=True),
        "overlap_magic": dataclasses.replace(G128_CONFIG, overlap_rescale=True, magic_cvt=True),
        "overlap_magic_s4": dataclasses.replace(G128_CONFIG, overlap_rescale=True, magic_cvt=True, stages=4),
        # DeepGEMM's shape: 64-row waves, one m64n128 wgmma per k-step (CTA tile 64 x 256)
        "overlap_magic_m64n128": dataclasses.replace(
            G128_CONFIG, tile_m=64, tile_n=128, overlap_rescale=True, magic_cvt=True
        ),
    }

    def exact(cfg):
        return jax.jit(lambda qx, w, sw: w4a4_g128_matmul_gpu(qx, ones_m, w, sw, out_dtype=jnp.float32, config=cfg))(
            q_x, q_w, sw_pow2
        )

    want = exact(cfgs["plain"])
    rec(
        "xla_bf16",
        jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
        x,
        w_bf16,
    )
    for name, cfg in cfgs.items():

        def chk(cfg=cfg):
            poison((m, n), jnp.float32)
            return {"f32_bit_identical_to_plain": bool(jnp.array_equal(exact(cfg), want))}

        f = jax.jit(lambda qx, sx, w, sw, xl, u, b, cfg=cfg: w4a4_g128_matmul_gpu(qx, sx, w, sw, xl, u, b, config=cfg))
        rec(f"pallas_g128_r32_{name}", f, q_x, s_x, q_w, s_w, x_lr, up, bias, check=chk)
    rec("pallas_int8w_r32_per_channel", _per_channel_int8w, q_x, s_x, q_w, jnp.mean(s_w, axis=1), x_lr, up, bias)
    args = (x, w_packed, s_w, smooth, down, up, bias)
    e_plain, e_best = _g128_e2e(cfgs["plain"]), _g128_e2e(cfgs["overlap_magic"])
    rec("e2e_linear_g128_r32_plain", e_plain, *args)
    rec(
        "e2e_linear_g128_r32_overlap_magic",
        e_best,
        *args,
        check=lambda: {"equal_to_plain": bool(jnp.array_equal(e_best(*args), e_plain(*args)))},
    )
    t = res["times_ms"]
    res["tops"] = {kk: ops / v / 1e9 for kk, v in t.items()}
    if "xla_bf16" in t:
        res["speedup_vs_xla_bf16"] = {kk: t["xla_bf16"] / v for kk, v in t.items()}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="32760")
    ap.add_argument("--shapes", default="5120x5120,5120x13824,13824x5120")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--sweep", default="", help="comma list of KxN shapes on which to sweep extra tile configs")
    ap.add_argument("--g128", action="store_true", help="benchmark the group-scaled (g128) GEMM instead")
    ap.add_argument(
        "--g128-quick", action="store_true", help="g128 kernel schedules only, no XLA g128 reference (minutes faster)"
    )
    ap.add_argument("--epi-sweep", action="store_true", help="also time rank-32 epilogue / pipeline configs")
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        print("bench.kernels needs a CUDA GPU (H100); found", dev.platform)
        return 0
    os.makedirs(a.out, exist_ok=True)
    logf = open(os.path.join(a.out, "kernels_bench.log"), "a")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    meta = {
        "card": dev.device_kind,
        "num_sms": getattr(dev, "core_count", None),
        "jax": jax.__version__,
        "git_commit": os.environ.get("GIT_COMMIT", "unknown"),
        "iters": ITERS,
        "timer": "CUPTI median",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    log(json.dumps(meta))
    results = []
    for m in [int(v) for v in a.ms.split(",")]:
        for sh in a.shapes.split(","):
            k, n = (int(v) for v in sh.split("x"))
            log(f"== M={m} K={k} N={n}")
            if a.g128_quick:
                results.append(run_shape_g128_quick(m, k, n, log))
            elif a.g128:
                results.append(run_shape_g128(m, k, n, sh in a.sweep.split(","), log))
            else:
                results.append(run_shape(m, k, n, sh in a.sweep.split(","), log, a.epi_sweep))
            fname = (
                "kernels_w4a4_g128_quick.json"
                if a.g128_quick
                else "kernels_w4a4_g128.json"
                if a.g128
                else "kernels_w4a4.json"
            )
            with open(os.path.join(a.out, fname), "w") as fh:
                json.dump({"meta": meta, "results": results}, fh, indent=1)
    # short table
    log("\nM      K      N      | bf16 ms | int8 ms | pallas best (name) ms x | e2e best (name) ms x")
    for r in results:
        t = r["times_ms"]
        g = a.g128 or a.g128_quick
        pal = {kk: v for kk, v in t.items() if kk.startswith("pallas_g128" if g else "pallas")}
        best = min(pal, key=pal.get) if pal else None
        b = t.get("xla_bf16", float("nan"))
        e2e = {kk: v for kk, v in t.items() if kk.startswith("e2e")}
        eb = min(e2e, key=e2e.get) if e2e else None
        e = e2e.get(eb, float("nan"))
        log(
            f"{r['M']:6d} {r['K']:6d} {r['N']:6d} | {b:7.3f} | {t.get('xla_int8', float('nan')):7.3f} | "
            f"{best} {pal.get(best, float('nan')):.3f} {b / pal.get(best, float('nan')):.2f}x | {eb} {e:.3f} {b / e:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
