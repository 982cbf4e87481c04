"""The W4A4 linear benchmark of the kernels issue, in one call: every shipped path beside XLA BF16 and INT8.

    PYTHONPATH=. python -m bench.gemm [--ms 4096,32760,75600] [--shapes 5120x5120,5120x13824,13824x5120]
                                      [--iters 25] [--name gemm]
    PYTHONPATH=. python -m bench.gemm --table bench/results/gemm.json     (the markdown table of a result file)

Every quantized path goes through ``kernels.dispatch``, the functions ``QLinear`` real mode calls, so the numbers are
those of the library, not of a hand-tuned variant (``bench.kernels`` / ``bench.act_quant`` hold the variant sweeps).
Per (M, K, N), one process, same inputs (``bench.kernels.make_inputs``: x ~ N(0, 1) bf16, weights N(0, 0.02^2),
smoothing U(0.5, 2), rank-32 branch, bias):

  xla_bf16        x_bf16 @ w_bf16 -> bf16                                        (the baseline)
  xla_int8        int8 x int8 -> int32 ``dot_general`` (cuBLASLt IMMA), no epilogue
  gemm_w4a4       ``dispatch.w4a4_matmul``: pre-quantized activations, packed int4 weights as stored, scales +
                  rank-32 up projection + bias in the epilogue -> bf16 (GEMM alone)
  gemm_w4a4_int8w same, weights stored unpacked (int8, 1 byte a parameter)
  e2e_w4a4        ``dispatch.w4a4_linear``: act quant (smoothing, rank-32 down) + GEMM, packed weights
  e2e_w4a4_rot    same with the default recipe's Hadamard rotation (random signs, blocks of 256)
  e2e_w4a4_int8w  ``e2e_w4a4`` on int8-stored weights
  e2e_mxfp4       ``dispatch.mxfp4_linear_fp8``: MXFP4 activations straight to FP8 + FP8 GEMM on weights prepared
                  once (``mxfp4_gpu.prepare_weights``, 1 byte a parameter)
  e2e_mxfp4_codes ``dispatch.mxfp4_linear`` on the stored MXFP4 codes (re-encoded every call: ``QLinear`` real mode)
  e2e_g128        ``dispatch.w4a4_linear(group_size=128)``: INT4 weights with one scale per 128 along K
  e2e_w4a8(_rot)  ``dispatch.w4a4_linear(a_qmax=127)``: INT8 per-token activations (W4A8), same GEMM (+ rotation)

Times: on a GPU the median device time over ``--iters`` calls (CUPTI, all kernels of one call, after a warm-up
call), and for every path the median wall clock over ``--iters`` calls cycling through 3 input sets (fresh
activations each call, as the issue asks; ``bench.timing.cupti_ms`` / ``wall_ms``). Elsewhere (CPU) only wall clock: a smoke run of the code paths, whose
times mean nothing. Ratios are against ``xla_bf16`` of the same (M, K, N) in the same process.
Checks before timing: the INT8 dot bit-exact against the int32 reference on the first rows; each quantized path's
output against the same path's ``backend="reference"`` on the first rows, computed on the host CPU when timing on a
GPU (rel-L2, f32 reference; the act quant is
per row, so the rows agree exactly in the math); outputs finite. Reported besides: TOPS (2 M K N / time) and the
bytes of each path's weights (codes + scales; low-rank branch, smoothing and bias separately).
Results: ``<name>.json`` in bench/results (and $OUT), rewritten after every shape (a timeout keeps what ran).

``--qkv`` (the recipe option ``fuse_qkv``, `wanjax.quant.fuse`): the self-attention q / k / v of a block, each
``KxN`` of ``--shapes`` (default 5120x5120 at M = 32,760), as three W4A4 linears against ONE fused linear
``K -> 3N`` that quantizes the shared input once (one act quant, rank-32 downs side by side, block-diagonal up):

  qkv_bf16           XLA bf16 ``x @ [w_q | w_k | w_v]`` (the baseline: the BF16 model's three dots, one operand)
  qkv_sep_w4a4_rot   three ``dispatch.w4a4_linear`` calls (rotating, default recipe): three act quants
  qkv_fused_w4a4_rot one ``dispatch.w4a4_linear`` on the fused ``[3N, K/2]`` codes: one act quant
  qkv_split_w4a4_rot the fused layer with ``parts=3`` (``QLinearConfig.parts``, what the model runs): one act quant
                     with the three downs, then three rank-32 GEMMs; its output split into q, k, v as the model does
  qkv_sep_w4a8_rot / qkv_fused_w4a8_rot / qkv_split_w4a8_rot   the same with INT8 activations (recipe ``w4a8``)

Checks: the fused output against the three separate outputs side by side (rel-L2, all rows; the numbers are the
same up to the epilogue's float order) and each path against its ``backend="reference"`` on the first rows.
    PYTHONPATH=. python -m bench.gemm --qkv [--ms 32760] [--shapes 5120x5120] [--name gemm_qkv]
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import bench_log, device_facts, rel_err, shape_sweep, write_result
from bench.layout import ensure_package_layout
from bench.timing import cupti_ms, wall_ms  # CUPTI median, rotated-input wall clock

R = 32
ROT_BLOCK = 256
CHECK_ROWS = 512
INPUT_SETS = 3
# (name, label of the table row); the order of the table
PATHS = (
    ("xla_bf16", "XLA bf16 `x @ w` (baseline)"),
    ("xla_int8", "XLA int8 `dot_general` -> int32 (cuBLASLt), no epilogue"),
    ("gemm_w4a4", "**GEMM alone**, packed int4 weights as stored, rank-32 epilogue"),
    ("gemm_w4a4_int8w", "GEMM alone, int8-stored weights, rank-32 epilogue"),
    ("e2e_w4a4", "**W4A4 linear end to end**, packed weights (`dispatch.w4a4_linear`)"),
    ("e2e_w4a4_rot", "same, rotating (default recipe, Hadamard blocks of 256)"),
    ("e2e_w4a4_int8w", "same as end to end, int8-stored weights"),
    ("e2e_mxfp4", "**MXFP4** end to end, FP8-prepared weights (`mxfp4_linear_fp8`)"),
    ("e2e_mxfp4_codes", "MXFP4 end to end on stored codes (`mxfp4_linear`, QLinear real mode)"),
    ("e2e_g128", "INT4 g128 end to end (`w4a4_linear(group_size=128)`)"),
    ("e2e_w4a8", "**W4A8** end to end (INT8 activations, `w4a4_linear(a_qmax=127)`), packed weights"),
    ("e2e_w4a8_rot", "W4A8 end to end, rotating (recipe `w4a8`)"),
)


def _layout():
    ensure_package_layout()


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def make_layer(key, m: int, k: int, n: int) -> dict:
    """Inputs of one linear in every stored format: the bf16 weight, packed INT4 / int8 / g128 / MXFP4 codes and
    FP8-prepared MXFP4, scales, smoothing, rotation signs, rank-32 branch, bias; ``xs``: ``INPUT_SETS`` activations."""
    from bench.kernels import make_inputs
    from wanjax.kernels import reference as ref
    from wanjax.kernels.mxfp4_gpu import prepare_weights
    from wanjax.numerics.fp4 import quantize_mxfp4
    from wanjax.numerics.pack import pack_nibbles
    from wanjax.numerics.hadamard import random_signs

    inp = make_inputs(key, m, k, n, R)
    w_nk = inp["w_bf16_kn"].T.astype(jnp.float32)
    xs = [inp["x"]] + [
        jax.random.normal(jax.random.fold_in(key, 100 + i), (m, k), jnp.float32).astype(jnp.bfloat16)
        for i in range(INPUT_SETS - 1)
    ]
    mx = quantize_mxfp4(w_nk, scale_rule="ocp_floor")
    codes = pack_nibbles(mx.codes)
    w8, s8, bad_w = prepare_weights(codes, mx.scales)
    g_packed, g_scales = ref.quantize_weight_int4_grouped(w_nk, 128)
    return dict(
        xs=xs,
        w_bf16=inp["w_bf16_kn"],
        w_packed=inp["w_packed"],
        s_w=inp["s_w"],
        w_int8=ref.unpack_int4(inp["w_packed"]),
        smooth=inp["smooth"],
        down=inp["down"],
        up=inp["up"],
        bias=inp["bias"],
        signs=random_signs(jax.random.fold_in(key, 7), k),
        mx_codes=codes,
        mx_scales=mx.scales,
        w8=w8,
        s8=s8,
        mx_inexact_weight_rows=int(bad_w),
        g_packed=g_packed,
        g_scales=g_scales,
    )


def weight_bytes(L: dict) -> dict:
    """Bytes of each path's stored weights (codes + scales) and of the parts every quantized path adds."""
    nb = lambda *a: int(sum(v.nbytes for v in a))
    return {
        "bf16": nb(L["w_bf16"]),
        "int4_packed+scales": nb(L["w_packed"], L["s_w"]),
        "int8_stored+scales": nb(L["w_int8"], L["s_w"]),
        "g128_packed+scales": nb(L["g_packed"], L["g_scales"]),
        "mxfp4_codes+scales": nb(L["mx_codes"], L["mx_scales"]),
        "fp8_prepared+scales": nb(L["w8"], L["s8"]),
        "lowrank_r32": nb(L["down"], L["up"]),
        "smooth+bias": nb(L["smooth"], L["bias"]),
        "rotation_signs": nb(L["signs"]),
    }


def path_fns(L: dict, backend: str | None) -> dict:
    """name -> (jitted fn, args without x, needs quantized activations): the benchmarked calls on ``backend``."""
    from wanjax.kernels import dispatch

    def lin(**kw):
        return jax.jit(
            lambda x, w, s, sm, dn, u, b, *extra: dispatch.w4a4_linear(
                x,
                w,
                s,
                smooth=sm,
                down=dn,
                up=u,
                bias=b,
                backend=backend,
                **kw,
                **({"rot_signs": extra[0], "rot_block": ROT_BLOCK} if extra else {}),
            )
        )

    def mx(name):  # an MXFP4 linear of dispatch: on FP8-prepared weights or on the packed codes
        return jax.jit(
            lambda x, w, s, sm, dn, u, b: getattr(dispatch, name)(
                x, w, s, smooth=sm, down=dn, up=u, bias=b, backend=backend
            )
        )

    common = (L["smooth"], L["down"], L["up"], L["bias"])
    gemm = jax.jit(lambda qx, sx, xl, w, s, u, b: dispatch.w4a4_matmul(qx, sx, w, s, xl, u, b, backend=backend))
    nt = (((1,), (1,)), ((), ()))
    return {
        "xla_bf16": (
            jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
            (L["w_bf16"],),
            False,
        ),
        "xla_int8": (
            jax.jit(lambda qx, sx, xl, w: jax.lax.dot_general(qx, w, nt, preferred_element_type=jnp.int32)),
            (L["w_int8"],),
            True,
        ),
        "gemm_w4a4": (gemm, (L["w_packed"], L["s_w"], L["up"], L["bias"]), True),
        "gemm_w4a4_int8w": (gemm, (L["w_int8"], L["s_w"], L["up"], L["bias"]), True),
        "e2e_w4a4": (lin(), (L["w_packed"], L["s_w"], *common), False),
        "e2e_w4a4_rot": (lin(), (L["w_packed"], L["s_w"], *common, L["signs"]), False),
        "e2e_w4a4_int8w": (lin(), (L["w_int8"], L["s_w"], *common), False),
        "e2e_mxfp4": (mx("mxfp4_linear_fp8"), (L["w8"], L["s8"], *common), False),
        "e2e_mxfp4_codes": (mx("mxfp4_linear"), (L["mx_codes"], L["mx_scales"], *common), False),
        "e2e_g128": (lin(group_size=128), (L["g_packed"], L["g_scales"], *common), False),
        "e2e_w4a8": (lin(a_qmax=127), (L["w_packed"], L["s_w"], *common), False),
        "e2e_w4a8_rot": (lin(a_qmax=127), (L["w_packed"], L["s_w"], *common, L["signs"]), False),
    }


def run_shape(m: int, k: int, n: int, iters: int, log, paths=None) -> dict:
    """All paths at one (M, K, N): checks, then times; an error in one path is recorded and the others go on."""
    from wanjax.kernels import dispatch

    res = {
        "M": m,
        "K": k,
        "N": n,
        "rank": R,
        "rot_block": ROT_BLOCK,
        "device_ms": {},
        "wall_ms": {},
        "checks": {},
        "errors": {},
    }
    ops = 2.0 * m * k * n
    L = make_layer(jax.random.key(m + 7 * k + 13 * n), m, k, n)
    res["weight_bytes"] = weight_bytes(L)
    res["checks"]["mxfp4_prepared_inexact_weight_rows"] = L["mx_inexact_weight_rows"]
    # the activations of the GEMM-alone paths, quantized once per input set by the dispatcher's act quant
    aq = jax.jit(lambda x, sm, dn: dispatch.act_quant(x, sm, dn))
    qsets = [aq(x, L["smooth"], L["down"]) for x in L["xs"]]
    rows = min(m, CHECK_ROWS)
    fns = path_fns(L, None)
    refs = path_fns(L, "reference")
    gpu = _on_gpu()
    for name, (f, args, quantized) in fns.items():
        if paths and name not in paths:
            continue
        try:
            sets = [(*q, *args) for q in qsets] if quantized else [(x, *args) for x in L["xs"]]
            out = f(*sets[0])
            out = out[0] if isinstance(out, tuple) else out
            head = out[:rows]
            if name == "xla_int8":
                from wanjax.kernels import reference as ref

                exact = ref.int_matmul_nt(qsets[0][0][:rows], L["w_int8"])
                res["checks"][f"{name}_exact_vs_int32_reference"] = bool(jnp.array_equal(head, exact))
            elif name != "xla_bf16":
                rf, rargs, _ = refs[name]
                ref_args = (tuple(a[:rows] for a in qsets[0]) + rargs) if quantized else (L["xs"][0][:rows], *rargs)
                if gpu:  # on the host: an independent backend, and XLA GPU took 2.5-3 min to compile g128's int32 scan
                    ref_args = jax.device_put(ref_args, jax.devices("cpu")[0])
                y_ref = rf(*ref_args)
                y_ref = y_ref[0] if isinstance(y_ref, tuple) else y_ref
                res["checks"][f"{name}_rel_l2_vs_reference"] = rel_err(
                    np.asarray(head, np.float32), np.asarray(y_ref, np.float32)
                )
            res["checks"][f"{name}_finite"] = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
            del out, head
            if gpu:
                res["device_ms"][name] = cupti_ms(f, *sets[0], iters=iters)
            res["wall_ms"][name] = wall_ms(f, sets, iters)
            t = res["device_ms"].get(name, res["wall_ms"][name])
            log(f"  {name:16s} {t:9.3f} ms  {ops / t / 1e9:8.1f} TOPS  wall {res['wall_ms'][name]:9.3f} ms")
        except Exception as e:  # report and go on
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:1500]}"
            log(f"  {name}: ERROR {res['errors'][name][:400]}")
            traceback.print_exc()
    for key in ("device_ms", "wall_ms"):
        t = res[key]
        if "xla_bf16" in t:
            res[f"speedup_{key}"] = {p: t["xla_bf16"] / v for p, v in t.items()}
    t = res["device_ms"] or res["wall_ms"]
    res["tops"] = {p: ops / v / 1e9 for p, v in t.items()}
    return res


def table(payload: dict) -> str:
    """Markdown: one row per path, one column per (M, K, N): ``ms · x vs bf16`` (device time where measured)."""
    rows = payload["rows"]
    timed = "device" if any(r["device_ms"] for r in rows) else "wall"
    head = (
        "| path (ms, x vs XLA bf16; "
        + timed
        + " time) | "
        + " | ".join(f"M={r['M']}, {r['K']}x{r['N']}" for r in rows)
        + " |"
    )
    out = [head, "|---" * (len(rows) + 1) + "|"]
    for name, label in PATHS:
        cells = []
        for r in rows:
            t = r[f"{timed}_ms"]
            if name in t:
                sp = t["xla_bf16"] / t[name] if "xla_bf16" in t else float("nan")
                cells.append(f"{t[name]:.3f} · {sp:.2f}x")
            else:
                cells.append("error" if name in r["errors"] else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    mem = [
        f"{r['K']}x{r['N']}: bf16 {r['weight_bytes']['bf16'] / 2**20:.1f} MiB, int4 packed + scales "
        f"{r['weight_bytes']['int4_packed+scales'] / 2**20:.1f} MiB (+ rank 32 {r['weight_bytes']['lowrank_r32'] / 2**20:.2f})"
        for r in rows
        if r["M"] == rows[0]["M"]
    ]
    return "\n".join(out) + "\n\nWeights: " + "; ".join(mem)


# ------------------------------------------------------------------------------------------------- --qkv mode
QKV_PATHS = (
    ("qkv_bf16", "XLA bf16 `x @ [w_q | w_k | w_v]` (baseline)"),
    ("qkv_sep_w4a4_rot", "three W4A4 linears (three act quants), rotating"),
    ("qkv_fused_w4a4_rot", "**one fused W4A4 linear** `K -> 3N` (one act quant), rotating"),
    ("qkv_split_w4a4_rot", "fused, `parts=3`: one act quant, three rank-32 GEMMs, output split as the model does"),
    ("qkv_sep_w4a8_rot", "three W4A8 linears, rotating"),
    ("qkv_fused_w4a8_rot", "**one fused W4A8 linear**, rotating"),
    ("qkv_split_w4a8_rot", "fused W4A8, `parts=3`"),
)


def qkv_layers(key, m: int, k: int, n: int) -> dict:
    """Three ``K -> N`` layers sharing one smoothing vector and rotation (as ``fuse_qkv`` calibrates them) and their
    fused ``K -> 3N`` form (codes / scales / bias concatenated, downs side by side, up block-diagonal)."""
    from bench.kernels import make_inputs
    from wanjax.numerics.hadamard import random_signs

    parts = [make_inputs(jax.random.fold_in(key, i), m if i == 0 else 8, k, n, R) for i in range(3)]
    xs = [parts[0]["x"]] + [
        jax.random.normal(jax.random.fold_in(key, 100 + i), (m, k), jnp.float32).astype(jnp.bfloat16)
        for i in range(INPUT_SETS - 1)
    ]
    up = jnp.zeros((3 * R, 3 * n), jnp.bfloat16)
    for i, p in enumerate(parts):
        up = up.at[i * R : (i + 1) * R, i * n : (i + 1) * n].set(p["up"])
    cat = lambda name, axis: jnp.concatenate([p[name] for p in parts], axis=axis)
    fused = dict(w_packed=cat("w_packed", 0), s_w=cat("s_w", 0), down=cat("down", 1), up=up, bias=cat("bias", 0))
    return dict(
        xs=xs,
        parts=parts,
        fused=fused,
        w_bf16=cat("w_bf16_kn", 1),
        smooth=parts[0]["smooth"],
        signs=random_signs(jax.random.fold_in(key, 7), k),
    )


def qkv_fns(L: dict, backend: str | None) -> dict:
    """name -> jitted ``fn(x)`` of the ``--qkv`` paths on ``backend``: ``[M, 3N]``, or the three ``[M, N]`` of the
    separate paths (a tuple: concatenating them would add a copy to the timed call; `_side_by_side` joins them)."""
    from wanjax.kernels import dispatch

    def linear(x, p, qmax, parts=1):
        return dispatch.w4a4_linear(
            x,
            p["w_packed"],
            p["s_w"],
            smooth=L["smooth"],
            down=p["down"],
            up=p["up"],
            bias=p["bias"],
            backend=backend,
            rot_signs=L["signs"],
            rot_block=ROT_BLOCK,
            a_qmax=qmax,
            parts=parts,
        )

    def sep(qmax):
        return jax.jit(lambda x: tuple(linear(x, p, qmax) for p in L["parts"]))  # three outputs, no copy

    def fused(qmax):
        return jax.jit(lambda x: linear(x, L["fused"], qmax))

    def split(qmax):  # as the model runs a fused layer with QLinearConfig.parts = 3: its output split into q, k, v
        return jax.jit(lambda x: tuple(jnp.split(linear(x, L["fused"], qmax, parts=3), 3, axis=-1)))

    w = L["w_bf16"]
    return {
        "qkv_bf16": jax.jit(lambda x: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
        "qkv_sep_w4a4_rot": sep(7),
        "qkv_fused_w4a4_rot": fused(7),
        "qkv_split_w4a4_rot": split(7),
        "qkv_sep_w4a8_rot": sep(127),
        "qkv_fused_w4a8_rot": fused(127),
        "qkv_split_w4a8_rot": split(127),
    }


def _side_by_side(out):
    return jnp.concatenate(out, axis=-1) if isinstance(out, tuple) else out


def run_qkv(m: int, k: int, n: int, iters: int, log, paths=None) -> dict:
    """The ``--qkv`` paths at M tokens and q / k / v of ``K x N`` each: checks, then times (errors recorded)."""
    res = {"M": m, "K": k, "N": n, "rank": R, "rot_block": ROT_BLOCK, "device_ms": {}, "wall_ms": {}}
    res.update(checks={}, errors={})
    ops = 2.0 * m * k * 3 * n
    L = qkv_layers(jax.random.key(m + 7 * k + 13 * n), m, k, n)
    rows = min(m, CHECK_ROWS)
    fns, refs = qkv_fns(L, None), qkv_fns(L, "reference")
    gpu = _on_gpu()
    outs = {}
    for name, f in fns.items():
        if paths and name not in paths:
            continue
        try:
            out = _side_by_side(f(L["xs"][0]))
            res["checks"][f"{name}_finite"] = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
            if name != "qkv_bf16":
                x_ref = L["xs"][0][:rows]
                if gpu:
                    x_ref = jax.device_put(x_ref, jax.devices("cpu")[0])
                res["checks"][f"{name}_rel_l2_vs_reference"] = rel_err(
                    np.asarray(out[:rows], np.float32), np.asarray(_side_by_side(refs[name](x_ref)), np.float32)
                )
                outs[name] = out
            sep = name.replace("fused", "sep").replace("split", "sep")
            if ("fused" in name or "split" in name) and sep in outs:
                res["checks"][f"{name}_rel_l2_vs_{sep}"] = rel_err(
                    np.asarray(out, np.float32), np.asarray(outs[sep], np.float32)
                )
                if "split" in name:  # the last of the three paths that compare with sep
                    outs.pop(sep)
                outs.pop(name)
            del out
            if gpu:
                res["device_ms"][name] = cupti_ms(f, L["xs"][0], iters=iters)
            res["wall_ms"][name] = wall_ms(f, [(x,) for x in L["xs"]], iters)
            t = res["device_ms"].get(name, res["wall_ms"][name])
            log(f"  {name:20s} {t:9.3f} ms  {ops / t / 1e9:8.1f} TOPS  wall {res['wall_ms'][name]:9.3f} ms")
        except Exception as e:  # report and go on
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:1500]}"
            log(f"  {name}: ERROR {res['errors'][name][:400]}")
            traceback.print_exc()
    for key in ("device_ms", "wall_ms"):
        t = res[key]
        if "qkv_bf16" in t:
            res[f"speedup_{key}"] = {p: t["qkv_bf16"] / v for p, v in t.items()}
        for a in ("w4a4", "w4a8"):
            sep, fus, spl = f"qkv_sep_{a}_rot", f"qkv_fused_{a}_rot", f"qkv_split_{a}_rot"
            if sep in t and fus in t:
                res.setdefault(f"fused_gain_{key}", {})[a] = t[sep] / t[fus]
            if sep in t and spl in t:
                res.setdefault(f"split_gain_{key}", {})[a] = t[sep] / t[spl]
    return res


def qkv_table(payload: dict) -> str:
    """Markdown of a ``--qkv`` result: one row per path, one column per (M, K, N): ``ms · x vs bf16``."""
    rows = payload["rows"]
    timed = "device" if any(r["device_ms"] for r in rows) else "wall"
    cols = " | ".join(f"M={r['M']}, q/k/v {r['K']}x{r['N']}" for r in rows)
    out = [f"| path (ms, x vs XLA bf16; {timed} time) | {cols} |", "|---" * (len(rows) + 1) + "|"]
    for name, label in QKV_PATHS:
        cells = []
        for r in rows:
            t = r[f"{timed}_ms"]
            if name in t:
                sp = t["qkv_bf16"] / t[name] if "qkv_bf16" in t else float("nan")
                cells.append(f"{t[name]:.3f} · {sp:.2f}x")
            else:
                cells.append("error" if name in r["errors"] else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="32760", help="comma list of token counts M (the issue: 4096,32760,75600)")
    ap.add_argument("--shapes", default="5120x5120,5120x13824,13824x5120", help="comma list of KxN")
    ap.add_argument("--iters", type=int, default=25, help="timed calls per path (>= 20 in the issue)")
    ap.add_argument("--paths", default="", help="comma list of paths to run (default: all)")
    ap.add_argument("--name", default="gemm", help="result file name (without .json)")
    ap.add_argument("--results-dir", default="bench/results", help="where <name>.json goes (also $OUT when set)")
    ap.add_argument("--table", default="", help="print the markdown table of this result JSON and exit")
    ap.add_argument(
        "--qkv",
        action="store_true",
        help="fused QKV mode: q/k/v (each KxN of --shapes, default 5120x5120) as three W4A4 linears vs one fused one",
    )
    a = ap.parse_args(argv)
    if a.table:
        import json

        with open(a.table) as fh:
            res = json.load(fh)
        print(qkv_table(res) if res.get("settings", {}).get("qkv") else table(res))
        return 0
    _layout()
    if a.qkv:
        return _main_qkv(a)
    paths = set(p for p in a.paths.split(",") if p)
    unknown = paths - {p for p, _ in PATHS}
    if unknown:
        raise SystemExit(f"bench.gemm: unknown paths {sorted(unknown)}; choose from {[p for p, _ in PATHS]}")
    if not _on_gpu():
        print("bench.gemm: no GPU; wall-clock smoke run of the XLA paths (times mean nothing)", flush=True)

    log = bench_log("gemm")
    payload = {"device": device_facts(), "settings": vars(a), "rows": []}
    for m, k, n in shape_sweep(a.ms, a.shapes, log):
        payload["rows"].append(run_shape(m, k, n, a.iters, log, paths))
        write_result(a.name, payload, out_dirs=(a.results_dir,))
    print(table(payload))
    bad = {f"M={r['M']} {r['K']}x{r['N']}": r["errors"] for r in payload["rows"] if r["errors"]}
    if bad:
        print(f"bench.gemm: errors: {bad}")
    return 0


def _main_qkv(a) -> int:
    paths = set(p for p in a.paths.split(",") if p)
    unknown = paths - {p for p, _ in QKV_PATHS}
    if unknown:
        raise SystemExit(f"bench.gemm --qkv: unknown paths {sorted(unknown)}; choose from {[p for p, _ in QKV_PATHS]}")
    shapes = "5120x5120" if a.shapes == "5120x5120,5120x13824,13824x5120" else a.shapes
    name = "gemm_qkv" if a.name == "gemm" else a.name
    if not _on_gpu():
        print("bench.gemm --qkv: no GPU; wall-clock smoke run (times mean nothing)", flush=True)
    log = bench_log("gemm_qkv")
    payload = {"device": device_facts(), "settings": {**vars(a), "shapes": shapes, "name": name}, "rows": []}
    for m, k, n in shape_sweep(a.ms, shapes, log):
        payload["rows"].append(run_qkv(m, k, n, a.iters, log, paths))
        write_result(name, payload, out_dirs=(a.results_dir,))
    print(qkv_table(payload))
    bad = {f"M={r['M']} {r['K']}x{r['N']}": r["errors"] for r in payload["rows"] if r["errors"]}
    if bad:
        print(f"bench.gemm --qkv: errors: {bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
