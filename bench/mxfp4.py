"""MXFP4 W4A4 linear on the GPU: correctness of the FP8 re-encoding kernel path, then its time against BF16.

    PYTHONPATH=. python -m bench.mxfp4 [--ms 32760] [--shapes 5120x5120,5120x13824] [--iters 20]

Per (M, K, N), one process: random activations ``x [M, K]`` (bf16, a few outlier channels) and weights ``w [N, K]``
quantized to MXFP4 with ``wanjax.numerics.fp4.quantize_mxfp4`` (the seed's weight rule), a rank-32 low-rank
branch and a bias, then :func:`kernels.dispatch.mxfp4_linear` (activation quantization + GEMM + epilogue, jitted):

* ``reference`` exact f32 dequantization, f32 dot at HIGHEST precision (the ground truth of the quantized linear);
* ``xla``       exact bf16 dequantization + bf16 tensor-core dot with f32 accumulation;
* ``pallas``    the Mosaic GPU FP8 ``wgmma`` kernel (each row re-encoded to e4m3 + a power-of-two row scale);
* ``pallas_prepared`` the same kernel on weights re-encoded once beforehand (``mxfp4_gpu.prepare_weights``, as at
                load time) with the activations quantized straight into FP8 (``mxfp4_linear_fp8``); f32 and bf16 out;
* ``bf16``      the unquantized ``x @ w^T`` in bf16 (the baseline the speed ratio is against).

Reported: rel-L2 (Frobenius) of ``xla`` and ``pallas`` against ``reference``, the rows the FP8 re-encoding rounded,
and median wall times (``bench.timing.time_fn``; decode of the weight codes is inside the timed call, as in
``QLinear`` real mode). Results: ``kernels_mxfp4.json`` in ``$OUT`` (or bench/results).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import bench_log, device_facts, no_gpu, shape_sweep, write_result
from bench.layout import ensure_package_layout
from bench.timing import time_fn
from wanjax.metrics import relative_l2


def _layout():
    ensure_package_layout()


def make_layer(key, m: int, k: int, n: int, r: int = 32):
    from wanjax.numerics.fp4 import quantize_mxfp4
    from wanjax.numerics.pack import pack_nibbles

    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (m, k), jnp.float32)
    x = x.at[:, :8].multiply(20.0).astype(jnp.bfloat16)  # a few outlier channels, as real activations
    w = jax.random.normal(ks[1], (n, k), jnp.float32) * 0.02
    qt = quantize_mxfp4(w, scale_rule="ocp_floor")
    codes = pack_nibbles(qt.codes)
    down = (jax.random.normal(ks[2], (k, r), jnp.float32) * 0.02).astype(jnp.bfloat16)
    up = (jax.random.normal(ks[3], (r, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    bias = jax.random.normal(ks[4], (n,), jnp.float32) * 0.1
    return dict(x=x, codes=codes, scales=qt.scales, down=down, up=up, bias=bias, w_kn=w.T.astype(jnp.bfloat16))


def run_shape(m, k, n, iters, log):
    from wanjax.kernels.dispatch import mxfp4_linear

    L = make_layer(jax.random.key(m + 3 * k + 7 * n), m, k, n)
    res = {"M": m, "K": k, "N": n, "checks": {}, "median_ms": {}, "errors": {}}

    def fn(backend):
        return jax.jit(
            lambda x, c, s, d, u, b: mxfp4_linear(
                x, c, s, down=d, up=u, bias=b, out_dtype=jnp.float32, backend=backend, return_inexact=True
            )
        )

    args = (L["x"], L["codes"], L["scales"], L["down"], L["up"], L["bias"])
    outs = {}
    for be in ("reference", "xla", "pallas"):
        try:
            f = fn(be)
            y, inexact = f(*args)
            outs[be] = np.asarray(y, np.float64)
            res["checks"][f"{be}_inexact_rows"] = int(inexact)
            res["median_ms"][be] = time_fn(f, *args, iters=iters)["median_s"] * 1e3
            log(f"  {be:10s} {res['median_ms'][be]:9.3f} ms  inexact rows {int(inexact)}")
        except Exception as e:  # report and go on
            res["errors"][be] = f"{type(e).__name__}: {str(e)[:1500]}"
            log(f"  {be}: ERROR {res['errors'][be][:400]}")
    # weights re-encoded to FP8 once ("at load time"), activations quantized straight into FP8 per call
    try:
        from wanjax.kernels.dispatch import mxfp4_linear_fp8
        from wanjax.kernels.mxfp4_gpu import prepare_weights

        w8, s_w, bad_w = prepare_weights(L["codes"], L["scales"])
        res["checks"]["prepared_weight_inexact_rows"] = int(bad_w)
        pargs = (L["x"], w8, s_w, L["down"], L["up"], L["bias"])
        for tag, od in (("pallas_prepared", jnp.float32), ("pallas_prepared_bf16out", jnp.bfloat16)):
            f = jax.jit(
                lambda x, w, sw, d, u, b, od=od: mxfp4_linear_fp8(
                    x, w, sw, down=d, up=u, bias=b, out_dtype=od, backend="pallas", return_inexact=True
                )
            )
            y, inexact = f(*pargs)
            if od == jnp.float32:
                outs[tag] = np.asarray(y, np.float64)
            res["checks"][f"{tag}_inexact_rows"] = int(inexact)
            res["median_ms"][tag] = time_fn(f, *pargs, iters=iters)["median_s"] * 1e3
            log(f"  {tag:10s} {res['median_ms'][tag]:9.3f} ms  inexact activation rows {int(inexact)}")
        del w8
    except Exception as e:  # report and go on
        res["errors"]["pallas_prepared"] = f"{type(e).__name__}: {str(e)[:1500]}"
        log(f"  pallas_prepared: ERROR {res['errors']['pallas_prepared'][:400]}")
    bf = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16))
    res["median_ms"]["bf16"] = time_fn(bf, L["x"], L["w_kn"], iters=iters)["median_s"] * 1e3
    log(f"  {'bf16':10s} {res['median_ms']['bf16']:9.3f} ms")
    if "reference" in outs:
        ref = outs["reference"]
        for be in ("xla", "pallas", "pallas_prepared"):
            if be in outs:
                out = outs[be]
                err = relative_l2(out, ref, nonfinite="inf")
                res["checks"][f"{be}_rel_l2_vs_reference"] = err
                log(f"  {be} vs reference rel-L2 {err:.3e}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="32760")
    ap.add_argument("--shapes", default="5120x5120,5120x13824")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args(argv)
    if no_gpu("mxfp4", "nothing to time (the kernel path is tested in the interpreter by the test suite)"):
        return 0
    _layout()
    log = bench_log("mxfp4")
    rows = [run_shape(m, k, n, a.iters, log) for m, k, n in shape_sweep(a.ms, a.shapes, log)]
    write_result("kernels_mxfp4", {"device": device_facts(), "rows": rows})
    print(
        "\n| M | K | N | bf16 ms | xla ms | pallas ms | pallas/bf16 speed | pallas rel-L2 | xla rel-L2 | inexact rows |"
        " prepared ms (f32 / bf16 out) | prepared bf16-out speed | prepared rel-L2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, c = r["median_ms"], r["checks"]
        sp = t["bf16"] / t["pallas"] if "pallas" in t else float("nan")
        print(
            f"| {r['M']} | {r['K']} | {r['N']} | {t.get('bf16', float('nan')):.3f} | {t.get('xla', float('nan')):.3f}"
            f" | {t.get('pallas', float('nan')):.3f} | {sp:.2f}x | {c.get('pallas_rel_l2_vs_reference', float('nan')):.2e}"
            f" | {c.get('xla_rel_l2_vs_reference', float('nan')):.2e} | {c.get('pallas_inexact_rows', '-')} |"
            f" {t.get('pallas_prepared', float('nan')):.3f} / {t.get('pallas_prepared_bf16out', float('nan')):.3f} |"
            f" {t['bf16'] / t.get('pallas_prepared_bf16out', float('nan')):.2f}x |"
            f" {c.get('pallas_prepared_rel_l2_vs_reference', float('nan')):.2e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
