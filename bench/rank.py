"""Cost of the low-rank branch's rank in the W4A4 linear on the GPU: act quant, GEMM and end to end per rank, and
the linear time of one DiT block for per-path rank mixes.

    PYTHONPATH=. python -m bench.rank [--ranks 5120x5120=0,16,32,64 --ranks 5120x13824=32,64 ...] [--name rank]

M = 32,760 (480p, 81 frames), the three Wan2.2 linear shapes; CUPTI device-time medians (``bench.timing.cupti_ms``)
of the act quant (``dispatch.act_quant``: the fused kernel, other ranks zero-padded to a power of two), the Mosaic
GPU GEMM with the rank-r epilogue (int8 weights), and ``dispatch.w4a4_linear`` end to end (packed weights), each against XLA bf16 in
the same run; the end-to-end output is checked against the f32 reference on 512 rows. Rank 0 means no branch.

The block table adds up the linears one DiT block runs at M tokens: six K = N = 5120 projections (self-attention
q, k, v, o; cross-attention q, o: the attention paths), ffn.fc1 (5120 x 13824) and ffn.fc2 (13824 x 5120); the
cross-attention k / v over the 512 text tokens are left out (< 1 % of the block). Result: ``<name>.json`` in
bench/results and ``$OUT`` (``bench.common.write_result``).
"""

import argparse
import sys

import jax
import jax.numpy as jnp

M = 32760
DEFAULT_RANKS = {(5120, 5120): (0, 16, 32, 64), (5120, 13824): (32, 64), (13824, 5120): (32, 64)}
#: (name, attention rank, FFN rank): the rank mixes of the block table (those whose ranks were timed are printed).
MIXES = (
    ("rank 32 everywhere (default)", 32, 32),
    ("ffn 64 / attention 16", 16, 64),
    ("ffn 64 / attention 0", 0, 64),
    ("ffn 64 / attention 32", 32, 64),
    ("rank 64 everywhere", 64, 64),
    ("rank 16 everywhere", 16, 16),
)


def parse_ranks(items) -> dict:
    """``["KxN=r1,r2", ...]`` -> ``{(K, N): (r1, r2)}``; no items: :data:`DEFAULT_RANKS`."""
    if not items:
        return dict(DEFAULT_RANKS)
    out = {}
    for it in items:
        shape, _, ranks = it.partition("=")
        k, n = (int(v) for v in shape.split("x"))
        out[(k, n)] = tuple(int(r) for r in ranks.split(","))
    return out


def block_table(rows: list, rotations=()) -> list:
    """Per-block linear time (ms) of each rank mix whose shapes and ranks were all timed, with bf16's; with
    ``rotations`` (tags of ``--rotate``), also each mix with the input rotated in Hadamard blocks of that size."""
    t = {(r["K"], r["N"], r["rank"]): r for r in rows}
    bf = {(r["K"], r["N"]): r["bf16"] for r in rows}
    layers = (((5120, 5120), 6, "attn"), ((5120, 13824), 1, "ffn"), ((13824, 5120), 1, "ffn"))
    if not all(s in bf for s, _, _ in layers):
        return []
    bf16 = sum(c * bf[s] for s, c, _ in layers)
    out = []
    for name, ra, rf in MIXES:
        keys = [(*s, ra if kind == "attn" else rf) for s, _, kind in layers]
        for rot in ("",) + tuple(rotations):
            col = f"e2e_rot{rot}" if rot else "e2e"
            if all(isinstance(t.get(k, {}).get(col), float) for k in keys):  # a failed variant holds its error text
                ms = sum(c * t[k][col] for (_, c, _), k in zip(layers, keys))
                out.append(
                    {
                        "mix": name + (f", rotation {rot}" if rot else ""),
                        "attn_rank": ra,
                        "ffn_rank": rf,
                        "rotation": rot or None,
                        "block_ms": ms,
                        "bf16_block_ms": bf16,
                        "x_bf16": bf16 / ms,
                    }
                )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", action="append", help="KxN=r1,r2,... (repeatable; default: %s)" % DEFAULT_RANKS)
    ap.add_argument("--name", default="rank")
    ap.add_argument(
        "--rotate",
        default="",
        help="also each linear with its input rotated in Hadamard blocks of these "
        "sizes (comma list; 'max': the largest power of two dividing K)",
    )
    ap.add_argument(
        "--gemm-variants",
        action="store_true",
        help="also time the GEMM (rank > 0) with the low-rank term added per epilogue chunk "
        "(lowrank_mode='chunk') and with 16-wide epilogue chunks in 2 buffers (what rank 64 gets)",
    )
    args = ap.parse_args(argv)
    from bench.common import no_gpu

    if no_gpu("rank"):
        return 0
    from bench.layout import ensure_package_layout

    ensure_package_layout()
    from bench.common import rel_err, write_result
    from bench.kernels import make_inputs
    from bench.timing import cupti_ms
    from wanjax.kernels import dispatch
    from wanjax.kernels import reference as ref
    from wanjax.kernels.w4a4_gpu import W4A4Config, w4a4_matmul_gpu
    from wanjax.numerics.hadamard import random_signs, rotate_activations

    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "M": M, "rows": []}
    for (k, n), ranks in parse_ranks(args.ranks).items():
        bf16 = None
        for r in ranks:
            inp = make_inputs(jax.random.key(k + n + r), M, k, n, r=max(r, 16))
            x, sm = inp["x"], inp["smooth"]
            dn, up = (inp["down"], inp["up"]) if r else (None, None)
            if bf16 is None:
                bf16 = cupti_ms(
                    jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
                    x,
                    inp["w_bf16_kn"],
                )
            row = {"K": k, "N": n, "rank": r, "bf16": bf16}
            # the dispatcher's act quant: the fused kernel (a rank that is not a power of two is zero-padded: 96 ->
            # 128, rank 32 + a rank-64 LoRA; its pipeline stages are capped to fit shared memory,
            # act_quant_gpu.max_fused_stages, after 3 stages asked for 263,168 bytes on an H100)
            aq = jax.jit(lambda a, b, c: dispatch.act_quant(a, b, c, 1.0, backend="pallas"))
            q, s, lr = aq(x, sm, dn)
            row["act_quant"] = cupti_ms(aq, x, sm, dn)
            w8 = ref.unpack_int4(inp["w_packed"])
            g = jax.jit(lambda qx, sx, w, sw, xl, u, b: w4a4_matmul_gpu(qx, sx, w, sw, xl, u, b, weights="int8"))
            row["gemm"] = cupti_ms(g, q, s, w8, inp["s_w"], lr, up, inp["bias"])
            if args.gemm_variants and r:
                for tag, cfg in (
                    ("chunk", W4A4Config(lowrank_mode="chunk")),
                    ("epi16x2", W4A4Config(epi_tile_n=16, out_slots=2)),
                ):
                    gv = jax.jit(
                        lambda qx, sx, w, sw, xl, u, b, cfg=cfg: w4a4_matmul_gpu(
                            qx, sx, w, sw, xl, u, b, weights="int8", config=cfg
                        )
                    )
                    try:
                        row[f"gemm_{tag}"] = cupti_ms(gv, q, s, w8, inp["s_w"], lr, up, inp["bias"])
                    except Exception as ex:  # a config that does not fit: recorded, the run goes on
                        row[f"gemm_{tag}"] = f"{type(ex).__name__}: {str(ex)[:300]}"
            e = jax.jit(
                lambda a, wp, sw, smo, d, u, b: dispatch.w4a4_linear(
                    a, wp, sw, smooth=smo, down=d, up=u, bias=b, backend="pallas"
                )
            )
            a = (x, inp["w_packed"], inp["s_w"], sm, dn, up, inp["bias"])
            y = e(*a)
            yr = ref.w4a4_linear(x[:512], inp["w_packed"], inp["s_w"], sm, dn, up, inp["bias"], out_dtype=jnp.float32)
            row["e2e_relerr_rows0-511"] = rel_err(y[:512], yr)
            row["e2e"] = cupti_ms(e, *a)
            row["x_bf16"] = bf16 / row["e2e"]
            for tag in filter(None, args.rotate.split(",")):
                blk = None if tag == "max" else int(tag)
                if blk and k % blk:
                    continue
                sg = random_signs(jax.random.key(r), k)
                er = jax.jit(
                    lambda a, wp, sw, smo, d, u, b, g, blk=blk: dispatch.w4a4_linear(
                        a, wp, sw, smooth=smo, down=d, up=u, bias=b, rot_signs=g, rot_block=blk, backend="pallas"
                    )
                )
                ar = jax.jit(
                    lambda a, smo, d, g, blk=blk: dispatch.act_quant(
                        a, smo, d, 1.0, rot_signs=g, rot_block=blk, backend="pallas"
                    )
                )
                try:
                    yrot = er(*a, sg)
                    xr = rotate_activations(x[:512].astype(jnp.float32) / sm, sg, blk)
                    yrr = ref.w4a4_linear(
                        xr, inp["w_packed"], inp["s_w"], None, dn, up, inp["bias"], out_dtype=jnp.float32
                    )
                    row[f"e2e_rot{tag}_relerr_rows0-511"] = rel_err(yrot[:512], yrr)
                    row[f"act_quant_rot{tag}"] = cupti_ms(ar, x, sm, dn, sg)
                    row[f"e2e_rot{tag}"] = cupti_ms(er, *a, sg)
                    del yrot
                except Exception as ex:  # a block the kernel cannot run: recorded, the run goes on
                    row[f"e2e_rot{tag}"] = f"{type(ex).__name__}: {str(ex)[:300]}"
            print(row, flush=True)
            out["rows"].append(row)
            del inp, x, w8, q, lr, y
    out["block"] = block_table(out["rows"], tuple(filter(None, args.rotate.split(","))))
    write_result(args.name, out)
    print("| K x N | rank | bf16 | act quant | GEMM | e2e (x bf16) | rel err | rotated: act quant, e2e (x bf16) |")
    for r in out["rows"]:
        rot = "; ".join(
            f"{kk[7:]}: {r.get('act_quant' + kk[3:], float('nan')):.3f}, {v:.3f} ({r['bf16'] / v:.2f}x)"
            for kk, v in r.items()
            if kk.startswith("e2e_rot") and isinstance(v, float) and "relerr" not in kk
        )
        print(
            f"| {r['K']}x{r['N']} | {r['rank']} | {r['bf16']:.3f} | {r['act_quant']:.3f} | {r['gemm']:.3f} | "
            f"{r['e2e']:.3f} ({r['x_bf16']:.2f}x) | {r['e2e_relerr_rows0-511']:.1e} | {rot} |"
        )
    print("| rank mix | block linears (ms) | bf16 (ms) | x bf16 |")
    for b in out["block"]:
        print(f"| {b['mix']} | {b['block_ms']:.3f} | {b['bf16_block_ms']:.3f} | {b['x_bf16']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
