"""Per-part layer SQNR of the self-attention q / k / v quantized separately (recipe ``default``) and as one fused
group (``fuse_qkv``): each of q, k, v on the held-out evaluation rows of a ``wanjax eval`` run's work dir, against
its float layer. Separates the layer-level cost of sharing one smoothing vector, rotation and clip from the
end-to-end PSNR (docs/QUALITY.md, "One activation quantization for q, k, v").

    JAX_PLATFORMS=cpu python -m bench.fuse_qkv_sqnr OUT/work        (OUT: a `wanjax eval --out` of the mini model)
"""

import dataclasses
import sys

import numpy as np
import jax.numpy as jnp
from flax import nnx
from wanjax.pipeline import WanI2VPipeline
from wanjax.quant.calibrate import CalibStats
from wanjax.quant.bins import seed_bins
from wanjax.sampling import flow_schedule
from wanjax.evaluation.sqnr import RebinnedSource
from wanjax.quant.quantize import SharedExpertSource, quantize_layer, quantize_fused_layer
from wanjax.quant.recipes import get_recipe, INT_CLIPS
from wanjax.quant.qlinear import qlinear_apply
from wanjax.quant.apply import get_submodule


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    W = argv[0]
    pipe = WanI2VPipeline.from_pretrained("models/mini", dtype=jnp.bfloat16)
    sched = flow_schedule(20, shift=5.0)
    bins = seed_bins(sched, 0.9)
    src = SharedExpertSource(RebinnedSource(CalibStats(W + "/calib"), bins))
    ev = RebinnedSource(CalibStats(W + "/eval_capture"), bins)
    d = get_recipe("default")
    QKV = ("blocks.self_attn.q", "blocks.self_attn.k", "blocks.self_attn.v")
    models = {"high": nnx.merge(pipe.graphdef, pipe._params_high), "low": nnx.merge(pipe.graphdef, pipe._params_low)}

    def part_err(c, a, rows, ws, bs, clip):
        x = jnp.asarray(rows, jnp.float32).reshape(-1, rows.shape[-1])
        y = qlinear_apply(c, a, x, clip, 0, None, dtype=jnp.float32, mode="fake")
        out = []
        n0 = 0
        for w, b in zip(ws, bs):
            n = w.shape[1]
            ref = x @ w + b
            out.append((float(jnp.sum((y[:, n0 : n0 + n] - ref) ** 2)), float(jnp.sum(ref**2))))
            n0 += n
        return out

    res = {"sep": [], "fused": [], "fused_pp": []}
    for e, m in models.items():
        for l in range(m.cfg.num_layers):
            lins = [get_submodule(m, p) for p in QKV]
            ws = [jnp.asarray(li.kernel[...][l], jnp.float32) for li in lins]
            bs = [jnp.asarray(li.bias[...][l], jnp.float32) for li in lins]
            st = src.layer(e, QKV[0], l)
            er = ev.layer(e, QKV[0], l).rows
            sep = []
            for w, b, p in zip(ws, bs, QKV):
                c, a, _ = quantize_layer(d, w, b, st, path=p, index=l, expert=e)
                sep.append(part_err(c, a, er, [w], [b], a["act_clip"][0])[0])
            res["sep"].append(sep)
            r = dataclasses.replace(d, fuse_qkv=True)
            c, a, _ = quantize_fused_layer(r, ws, bs, st, path="blocks.self_attn.qkv", parts=QKV, index=l, expert=e)
            res["fused"].append(part_err(c, a, er, ws, bs, a["act_clip"][0]))
            # per-part-normalized clip objective on the calibration rows
            best = min(INT_CLIPS, key=lambda cl: sum(n / dd for n, dd in part_err(c, a, st.rows, ws, bs, cl)))
            res["fused_pp"].append(part_err(c, a, er, ws, bs, best))
            print(e, l, float(a["act_clip"][0]), best, flush=True)
    for k, v in res.items():
        v = np.asarray(v)  # [layers, 3, 2]
        sq = 10 * np.log10(v[..., 1] / v[..., 0])
        print(k, "per-part SQNR mean (q,k,v):", sq.mean(0).round(2), "all", sq.mean().round(3))


if __name__ == "__main__":
    main()
