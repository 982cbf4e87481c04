"""Which probabilities cuDNN's FP8 attention rounds to e4m3: a sweep of the P scale (``scale_s``) at the 480p shape.

    PYTHONPATH=. python -m bench.attention_fp8_pscale        (GPU only; result fp8_pscale.json in $OUT or .)

q/k/v [1, 32760, 40, 128] bf16 (N(0,1); first 1/8 of heads x10; q and k x3), ``cudnn_fp8_attention`` with
``p_scale`` in 448 x {1, 2^4, 2^8, 2^12, 2^16}, rel-L2 (total, max head, median head) against exact fp32 attention
on 256 query rows, next to the jnp models ``fp8_attention_reference(p_mode="unnormalized" | "normalized")`` with
the same scales. If the kernel rounds the unnormalized exp(s - rowmax) (max 1), any scale above 448 saturates.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.metrics import relative_l2


def main() -> int:
    if jax.default_backend() != "gpu":
        print("bench.attention_fp8_pscale: no GPU; nothing to run")
        return 0
    from wanjax.model import attention as A

    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    T, N, D = 32760, 40, 128
    ks = jax.random.split(jax.random.key(0), 3)
    base = [jax.random.normal(kk, (1, T, N, D), jnp.float32) for kk in ks]
    rows = jnp.asarray(np.unique(np.linspace(0, T - 1, 256).astype(np.int32)))

    def per_head(a):  # [rows, N, D] -> [N, rows * D]
        return a.reshape(-1, N, D).transpose(1, 0, 2).reshape(N, -1)

    def err(o, ref):
        """[total, max head, median head] relative L2 of o against ref; NaN when o is not finite."""
        o, ref = np.asarray(o, np.float64), np.asarray(ref, np.float64)
        if not np.all(np.isfinite(o)):
            return float("nan")
        ph = relative_l2(per_head(o), per_head(ref), axis=1)
        return [relative_l2(o, ref), float(ph.max()), float(np.median(ph))]

    out = {}
    for case in ("normal", "heads_x10", "qk_x3"):
        q, k, v = base
        if case == "heads_x10":
            m = jnp.where(jnp.arange(N) < N // 8, 10.0, 1.0)[None, None, :, None]
            q, k, v = q * m, k * m, v * m
        if case == "qk_x3":
            q, k = q * 3, k * 3
        q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
        ref = jax.jit(A.reference_attention_f32)(q[:, rows], k, v)
        r = {"bf16_cudnn": err(jax.jit(lambda a, b, c: A.attention(a, b, c, backend="cudnn"))(q, k, v)[:, rows], ref)}
        for ps in (448.0, 448.0 * 2**4, 448.0 * 2**8, 448.0 * 2**12, 448.0 * 2**16):
            try:
                o = jax.jit(lambda a, b, c, ps=ps: A.cudnn_fp8_attention(a, b, c, p_scale=ps))(q, k, v)
                r[f"fp8_p{ps:g}"] = err(o[:, rows], ref)
                sc = A.fp8_attention_scales(q, k, v, ps)
                for mode in ("unnormalized", "normalized"):
                    pr = jax.jit(
                        lambda a, b, c, mode=mode, sc=sc: A.fp8_attention_reference(a, b, c, p_mode=mode, scales=sc)
                    )(q[:, rows], k, v)
                    r[f"model_{mode}_p{ps:g}"] = err(pr, ref)
            except Exception as e:
                r[f"fp8_p{ps:g}"] = f"{type(e).__name__}: {str(e)[:300]}"
        out[case] = r
        print(case, json.dumps(r), flush=True)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "fp8_pscale.json"), "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
