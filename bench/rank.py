"""Cost of the low-rank branch's rank in the W4A4 linear on the GPU: rank 32 vs 64, act quant, GEMM and end to end.

    PYTHONPATH=. python -m bench.rank

M = 32,760, the three Wan2.2 linear shapes; CUPTI device-time medians (``bench.kernels.cupti_ms``) of the fused act
quant (``act_quant_lowrank_pallas``), the Mosaic GPU GEMM with the rank-r epilogue (int8 weights), and
``dispatch.w4a4_linear`` end to end (packed weights), each against XLA bf16 in the same run; the end-to-end output is
checked against the f32 reference on 512 rows. Result: ``rank64.json`` in ``$OUT`` (or the current folder).
"""
import json
import os
import sys

import jax
import jax.numpy as jnp


def main() -> int:
  if jax.default_backend() != "gpu":
    print("bench.rank: no GPU; nothing to time")
    return 0
  from bench.pipeline import ensure_package_layout
  ensure_package_layout()
  from bench.kernels import cupti_ms, make_inputs, rel_err
  from kernels import reference as ref
  from kernels.w4a4_gpu import w4a4_matmul_gpu
  from kernels.act_quant_gpu import act_quant_lowrank_pallas
  from kernels import dispatch
  out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "M": 32760, "rows": []}
  m = 32760
  for k, n in ((5120, 5120), (5120, 13824), (13824, 5120)):
    row = {"K": k, "N": n}
    for r in (32, 64):
      inp = make_inputs(jax.random.key(k + n + r), m, k, n, r=r)
      x, sm, dn = inp["x"], inp["smooth"], inp["down"]
      w8 = ref.unpack_int4(inp["w_packed"])
      if r == 32:
        row["bf16"] = cupti_ms(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)), x, inp["w_bf16_kn"])
      q, s, lr = act_quant_lowrank_pallas(x, sm, dn, 1.0, None)
      row[f"aq_r{r}"] = cupti_ms(jax.jit(lambda a, b, c: act_quant_lowrank_pallas(a, b, c, 1.0, None)), x, sm, dn)
      g = jax.jit(lambda qx, sx, w, sw, xl, u, b: w4a4_matmul_gpu(qx, sx, w, sw, xl, u, b, weights="int8"))
      row[f"gemm_r{r}"] = cupti_ms(g, q, s, w8, inp["s_w"], lr, inp["up"], inp["bias"])
      e = jax.jit(lambda a, wp, sw, smo, d, u, b: dispatch.w4a4_linear(a, wp, sw, smooth=smo, down=d, up=u, bias=b, backend="pallas"))
      args = (x, inp["w_packed"], inp["s_w"], sm, dn, inp["up"], inp["bias"])
      y = e(*args)
      yr = ref.w4a4_linear(x[:512], inp["w_packed"], inp["s_w"], sm, dn, inp["up"], inp["bias"], out_dtype=jnp.float32)
      row[f"e2e_r{r}_relerr_rows0-511"] = rel_err(y[:512], yr)
      row[f"e2e_r{r}"] = cupti_ms(e, *args)
      del inp, x, w8
    print(row, flush=True)
    out["rows"].append(row)
  json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "rank64.json"), "w"), indent=1)
  print("| K x N | bf16 | act quant r32 / r64 | GEMM r32 / r64 | e2e r32 / r64 (x bf16) |")
  for r in out["rows"]:
    print(f"| {r['K']}x{r['N']} | {r['bf16']:.3f} | {r['aq_r32']:.3f} / {r['aq_r64']:.3f} | {r['gemm_r32']:.3f} / {r['gemm_r64']:.3f} | {r['e2e_r32']:.3f} ({r['bf16']/r['e2e_r32']:.2f}x) / {r['e2e_r64']:.3f} ({r['bf16']/r['e2e_r64']:.2f}x) |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
