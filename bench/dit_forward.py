"""Full-size Wan2.2-I2V-A14B expert forward on one GPU, random bf16 weights of the exact shapes.

    python -m bench.dit_forward [--res 480p] [--iters 10] [--variants cudnn,chunked,xla]

Reports compile time, median forward time and peak GPU memory per attention backend, plus the attention op alone.
Writes bench/results/dit_forward_<res>.json (and $OUT/ when set).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench.common import device_facts, peak_memory_bytes, write_result
from bench.timing import time_fn
from wanjax.config import I2V_A14B, TINY
from wanjax.model import attention as attn_mod
from wanjax.model.dit import WanDiT

RES = {"480p": (21, 60, 104), "720p": (21, 90, 160), "tiny": (3, 8, 12)}


def random_state(abstract_state, seed=0):
    """Random params with the abstract state's shapes/dtypes, created on device (scaled so activations stay sane)."""
    leaves, treedef = jax.tree.flatten(abstract_state)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, a in zip(keys, leaves):
            fan_in = a.shape[-2] if len(a.shape) >= 2 else 1
            std = 1.0 / math.sqrt(max(fan_in, 1)) if len(a.shape) >= 2 else 0.02
            out.append(
                (jax.random.normal(k, a.shape, jnp.float32 if a.dtype == jnp.float32 else jnp.bfloat16) * std).astype(
                    a.dtype
                )
            )
        return out

    return jax.tree.unflatten(treedef, make(jax.random.key(seed)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", default="480p", choices=list(RES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", default="cudnn,chunked,xla")
    ap.add_argument("--config", default="I2V_A14B", choices=["I2V_A14B", "TINY"])
    args = ap.parse_args()
    cfg = {"I2V_A14B": I2V_A14B, "TINY": TINY}[args.config]
    f, h, w = RES[args.res]
    tokens = f * (h // 2) * (w // 2)
    abstract = nnx.eval_shape(lambda: WanDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    t0 = time.perf_counter()
    state = random_state(abs_state)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    nparams = sum(int(math.prod(a.shape)) for a in jax.tree.leaves(state))
    wbytes = sum(a.nbytes for a in jax.tree.leaves(state))
    key = jax.random.key(1)
    x = jax.random.normal(key, (1, f, h, w, cfg.in_dim), jnp.float32)
    ctx = jax.random.normal(jax.random.fold_in(key, 1), (1, cfg.text_len, cfg.text_dim), jnp.bfloat16)
    t = jnp.array([900.0])
    results = {
        "config": args.config,
        "res": args.res,
        "latent_fhw": [f, h, w],
        "tokens": tokens,
        "params": nparams,
        "weight_bytes": wbytes,
        "init_s": init_s,
        "variants": {},
    }
    print(f"params {nparams:,}  weights {wbytes / 1e9:.2f} GB  tokens {tokens}  init {init_s:.1f}s", flush=True)

    for name in args.variants.split(","):
        attn_mod.set_attention_backend(name)

        def fwd(state, x, t, ctx):
            return nnx.merge(graphdef, state)(x, t, ctx)

        jf = jax.jit(fwd)
        rec = {}
        try:
            t0 = time.perf_counter()
            compiled = jf.lower(state, x, t, ctx).compile()
            rec["compile_s"] = time.perf_counter() - t0
            iters = args.iters if name == "cudnn" else max(2, args.iters // 4)
            rec.update(time_fn(compiled, state, x, t, ctx, warmup=1, iters=iters))
            out = compiled(state, x, t, ctx)
            rec["finite"] = bool(jnp.isfinite(out).all())
            rec["peak_bytes"] = peak_memory_bytes()
        except Exception as e:  # report the failure (e.g. S x S does not fit) instead of dying
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results["variants"][name] = rec
        print(name, {k: v for k, v in rec.items() if k != "all_s"}, flush=True)

    # attention op alone at this shape
    q = jax.random.normal(key, (1, tokens, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    results["attention_only"] = {}
    for name in ("cudnn", "chunked"):
        fn = jax.jit(lambda q, k, v, n=name: attn_mod.attention(q, k, v, backend=n))
        try:
            r = time_fn(fn, q, q, q, warmup=2, iters=10)
            r["tflops"] = 4 * tokens * tokens * cfg.dim / r["median_s"] / 1e12
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        results["attention_only"][name] = r
        print("attention", name, {k: v for k, v in r.items() if k != "all_s"}, flush=True)
    attn_mod.set_attention_backend(None)
    results.update(device_facts())
    write_result(f"dit_forward_{args.res}", results)
    print("\n| variant | compile s | forward median s | peak GB |")
    for n, r in results["variants"].items():
        if "error" in r:
            print(f"| {n} | - | failed: {r['error'][:80]} | - |")
        else:
            print(f"| {n} | {r['compile_s']:.1f} | {r['median_s']:.3f} | {(r['peak_bytes'] or 0) / 1e9:.1f} |")


if __name__ == "__main__":
    main()
