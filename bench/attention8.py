"""8-bit attention kernel (kernels/attention8_gpu.py) vs cuDNN BF16 flash attention on one Hopper GPU.

        python -m bench.attention8 [--s 32760 75600] [--heads 40] [--iters 20]

First checks the kernel against the jnp reference (the same pre-pass operands, S = 1000 and the first long S on a
slice of heads: rel-L2 of kernel vs reference core, and both vs exact f32 attention) and stops if it disagrees;
then times, per S, B = 1, N = 40, D = 128: ``attn8`` = the XLA pre-pass (quantize_qkv + V transpose) + the
kernel, the pre-pass alone, the kernel alone, and ``jax.nn.dot_product_attention(implementation="cudnn")`` on bf16,
as CUPTI medians in the same process. TOPS = 4 * S^2 * D * N / t. Writes bench/results/attention8_h100.json
(keys s, tops, x_vs_cudnn_bf16, rel_l2, plus the per-part times).

Written on a CPU host: the kernel has NOT run on a GPU yet (see kernels/attention8_gpu.py).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import device_facts, write_result
from bench.layout import ensure_package_layout
from bench.timing import cupti_ms

ensure_package_layout()  # the GPU machine runs an uninstalled checkout (PYTHONPATH=.)

from wanjax.kernels import attention8_gpu as G  # noqa: E402
from wanjax.kernels import attention8_reference as R  # noqa: E402
from wanjax.metrics import relative_l2  # noqa: E402


def _rel(a, b):
    return relative_l2(np.asarray(a, np.float64), np.asarray(b, np.float64))


def _qkv(s, n, d, seed=0):
    key = jax.random.key(seed)
    return tuple(jax.random.normal(jax.random.fold_in(key, i), (1, s, n, d), jnp.bfloat16) for i in range(3))


def _layout(cfg):
    return "bsnd" if cfg.bsnd else "bnsd"


def check(s, n=2, d=128, cfg=G.GPUConfig()):
    pc = G.gpu_config_for(cfg)
    q, k, v = _qkv(s, n, d, seed=s)
    x = jax.jit(lambda a, b, c: R.quantize_qkv(a, b, c, pc))(q, k, v)
    xk = jax.jit(lambda a, b, c: R.quantize_qkv(a, b, c, pc, _layout(cfg)))(q, k, v)
    got = jax.jit(lambda x: G.attention8_gpu_core(x, cfg))(xk)
    want = jax.jit(lambda x: R.attention8_core(x, pc))(x)
    exact = jax.jit(R.attention_f32)(q, k, v)
    out = {
        "s": s,
        "kernel_vs_reference": _rel(got, want),
        "kernel_vs_exact": _rel(got, exact),
        "reference_vs_exact": _rel(want, exact),
    }
    print("check", out, flush=True)
    return out


def parse_config(spec: str) -> G.GPUConfig:
    """'pingpong=0,stages=3' -> GPUConfig(pingpong=False, stages=3) ('' -> the default)."""
    kw = {}
    fields = {f.name: f.type for f in G.dataclasses.fields(G.GPUConfig)}
    for item in filter(None, spec.split(",")):
        key, _, val = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--configs: unknown GPUConfig field {key!r}; expected one of {sorted(fields)}")
        kw[key] = bool(int(val)) if fields[key] in (bool, "bool") else int(val)
    return G.GPUConfig(**kw)


def variant(cfg: G.GPUConfig, args) -> dict:
    """Check one more kernel config against the reference (S = 1000) and time its kernel at each S (CUPTI medians,
    cuDNN BF16 beside it)."""
    out = {"config": G.dataclasses.asdict(cfg), "check": check(1000, cfg=cfg), "rows": []}
    pc = G.gpu_config_for(cfg)
    prepass = jax.jit(lambda a, b, c: R.quantize_qkv(a, b, c, pc, _layout(cfg)))
    core = jax.jit(lambda x: G.attention8_gpu_core(x, cfg))
    cudnn = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, implementation="cudnn"))
    for s in args.s:
        q, k, v = _qkv(s, args.heads, 128, seed=1)
        x = prepass(q, k, v)
        t_core = cupti_ms(core, x, iters=args.iters)
        t_bf16 = cupti_ms(cudnn, q, k, v, iters=args.iters)
        flops = 4.0 * s * s * 128 * args.heads
        row = {
            "s": s,
            "ms_kernel": t_core,
            "ms_cudnn_bf16": t_bf16,
            "x_kernel_vs_cudnn_bf16": t_bf16 / t_core,
            "tops_kernel_only": flops / (t_core * 1e-3) / 1e12,
        }
        print("variant", out["config"], row, flush=True)
        out["rows"].append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--s", type=int, nargs="+", default=[32760, 75600])
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument(
        "--configs",
        nargs="+",
        default=[""],
        help="kernel configs to compare, each 'field=value,...' of GPUConfig (e.g. 'pingpong=0,tile_scale=0'); "
        "'' = the default. Each is checked against the reference, then timed; the result keys describe the first",
    )
    ap.add_argument("--name", default="attention8_h100")
    args = ap.parse_args(argv)
    cfgs = [parse_config(c) for c in args.configs]
    variants = []
    for cfg in cfgs[1:]:
        try:
            variants.append(variant(cfg, args))
        except Exception as e:  # noqa: BLE001 - one config that fails to build must not hide the others
            print("variant failed", cfg, repr(e)[:2000], flush=True)
            variants.append({"config": G.dataclasses.asdict(cfg), "error": repr(e)[:2000]})
    cfg = cfgs[0]
    pc = G.gpu_config_for(cfg)
    checks = [check(1000, cfg=cfg), check(args.s[0], n=1, cfg=cfg)]
    if max(c["kernel_vs_reference"] for c in checks) > 1e-2:
        raise SystemExit(f"attention8_gpu disagrees with the reference: {checks}")
    rows = []
    d, n = 128, args.heads
    prepass = jax.jit(lambda a, b, c: R.quantize_qkv(a, b, c, pc, _layout(cfg)))
    core = jax.jit(lambda x: G.attention8_gpu_core(x, cfg))
    full = jax.jit(lambda a, b, c: G.attention8_gpu(a, b, c, cfg))
    cudnn = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, implementation="cudnn"))
    for s in args.s:
        q, k, v = _qkv(s, n, d, seed=1)
        x = prepass(q, k, v)
        t_full = cupti_ms(full, q, k, v, iters=args.iters)
        t_pre = cupti_ms(prepass, q, k, v, iters=args.iters)
        t_core = cupti_ms(core, x, iters=args.iters)
        t_bf16 = cupti_ms(cudnn, q, k, v, iters=args.iters)
        flops = 4.0 * s * s * d * n
        o8 = full(q[:, :, :2], k[:, :, :2], v[:, :, :2])
        ob = cudnn(q[:, :, :2], k[:, :, :2], v[:, :, :2])
        row = {
            "s": s,
            "tops": flops / (t_full * 1e-3) / 1e12,
            "x_vs_cudnn_bf16": t_bf16 / t_full,
            "rel_l2": _rel(o8.astype(jnp.float32), ob.astype(jnp.float32)),
            "ms_attn8": t_full,
            "ms_prepass": t_pre,
            "ms_kernel": t_core,
            "ms_cudnn_bf16": t_bf16,
            "tops_kernel_only": flops / (t_core * 1e-3) / 1e12,
            "tops_cudnn_bf16": flops / (t_bf16 * 1e-3) / 1e12,
        }
        print(row, flush=True)
        rows.append(row)
    write_result(
        args.name,
        {
            "device": device_facts(),
            "b": 1,
            "n": n,
            "d": d,
            "config": vars(cfg) if hasattr(cfg, "__dict__") else str(cfg),
            "checks": checks,
            "rows": rows,
            "s": [r["s"] for r in rows],
            "tops": [r["tops"] for r in rows],
            "x_vs_cudnn_bf16": [r["x_vs_cudnn_bf16"] for r in rows],
            "rel_l2": [r["rel_l2"] for r in rows],
            "rel_l2_note": "attn8 (pre-pass + kernel) vs cuDNN BF16 on heads 0-1",
            "other_configs": variants,
        },
    )


if __name__ == "__main__":
    main()
