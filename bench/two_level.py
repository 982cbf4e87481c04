"""Two-level integer group scales on the GPU (issue 35): the linear end to end with two-level g128 weights (carried
int8 codes on the per-channel int8 GEMM) against per-channel weights and the float32 group-scaled kernel, W4A8 and
W4A4, each against XLA bf16 in the same run.

    PYTHONPATH=. python -m bench.two_level [--m 32760] [--shapes 5120x5120 5120x13824 13824x5120] [--name two_level]

Random operands: activations with per-channel spread, weights whose groups of 128 differ in scale by up to 30x (where
group scales matter); rank-32 branch, bias, smoothing. CUPTI device-time medians (``bench.timing.cupti_ms``). Each
two-level path is first checked against the ``reference`` backend on its first 512 rows (relative L2 reported).
The W4A4 two-level path quantizes its activations in XLA (``dispatch.act_quant_two_level``: the Pallas act-quant
kernels emit no group multipliers), so it includes that pass's cost. Result: ``<name>.json`` in bench/results and
``$OUT``.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

G, R, LEVELS, CLIP = 128, 32, 18, 0.9


def operands(m: int, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32) * rng.uniform(0.1, 3, k).astype(np.float32), jnp.bfloat16)
    spread = np.repeat(10 ** rng.uniform(-1.5, 0, (n, k // G)), G, axis=1).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((n, k), np.float32) * spread * 0.02)
    down = jnp.asarray(rng.standard_normal((k, R), np.float32) * 0.02, jnp.bfloat16)
    up = jnp.asarray(rng.standard_normal((R, n), np.float32) * 0.02, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(n, np.float32) * 0.1)
    smooth = jnp.asarray(rng.uniform(0.5, 2, k).astype(np.float32))
    return x, w, down, up, bias, smooth


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=32760)
    ap.add_argument("--shapes", nargs="+", default=["5120x5120", "5120x13824", "13824x5120"])
    ap.add_argument("--name", default="two_level")
    args = ap.parse_args(argv)

    from bench.common import no_gpu

    if no_gpu("two_level"):
        return 0
    from bench.layout import ensure_package_layout

    ensure_package_layout()
    from bench.common import rel_err, write_result
    from bench.timing import cupti_ms
    from wanjax.kernels import dispatch as d
    from wanjax.kernels.reference import unpack_int4
    from wanjax.numerics import formats
    from wanjax.numerics.two_level import quantize_int4_two_level

    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "M": args.m, "rows": []}
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        x, w, down, up, bias, sm = operands(args.m, k, n)
        tl = quantize_int4_two_level(w, G, levels=LEVELS)
        cw, uw = tl.carried(), tl.unit[:, 0]
        pc = formats.quantize_int4(w).pack()
        w8 = unpack_int4(pc.codes)
        g = formats.quantize_int4(w, group_size=G).pack()
        kw = dict(smooth=sm, down=down, up=up, bias=bias, clip=CLIP)

        def lin(backend="pallas", **extra):
            return jax.jit(lambda x, w, s: d.w4a4_linear(x, w, s, backend=backend, **kw, **extra))

        def two_level_wa(backend="pallas"):
            def f(x, w, s):
                q, sx, xl = d.act_quant_two_level(x, sm, down, CLIP, group_size=G, levels=LEVELS)
                return d.w4a4_matmul(q, sx, w, s, xl, up, bias, a_qmax=127, backend=backend)

            return jax.jit(f)

        cases = {
            "w4a8 per-channel (int8 weights)": (lin(a_qmax=127), (w8, pc.scales[:, 0])),
            "w4a8 two-level g128 weights": (lin(a_qmax=127), (cw, uw)),
            "w4a8 f32 g128 weights (group-scaled kernel)": (lin(a_qmax=127, group_size=G), (g.codes, g.scales)),
            "w4a4 per-channel (int8 weights)": (lin(), (w8, pc.scales[:, 0])),
            "w4a4 two-level g128 weights and activations": (two_level_wa(), (cw, uw)),
        }
        checks = {
            "w4a8 two-level g128 weights": lin("reference", a_qmax=127),
            "w4a4 two-level g128 weights and activations": two_level_wa("reference"),
        }
        bf16 = cupti_ms(jax.jit(lambda a, b: a @ b), x, w.T.astype(jnp.bfloat16))
        row = {"K": k, "N": n, "bf16_ms": bf16, "paths": {}}
        for name, (f, (wq, ws)) in cases.items():
            entry = {"ms": cupti_ms(f, x, wq, ws)}
            entry["x_bf16"] = bf16 / entry["ms"]
            if name in checks:
                entry["rel_err_vs_reference_rows0-511"] = rel_err(f(x[:512], wq, ws), checks[name](x[:512], wq, ws))
            row["paths"][name] = entry
            print(f"M={args.m} {k}x{n} {name}: {entry}", flush=True)
        out["rows"].append(row)
        write_result(args.name, out)
    print("| K x N | " + " | ".join(cases) + " |")
    for row in out["rows"]:
        cells = [f"{p['ms']:.3f} ms ({p['x_bf16']:.2f}x)" for p in row["paths"].values()]
        print(f"| {row['K']} x {row['N']} (bf16 {row['bf16_ms']:.3f} ms) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
