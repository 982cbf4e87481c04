"""Time to quantize one full-size DiT block (its 10 Linears) with a recipe, extrapolated to both experts.

    PYTHONPATH=. python -m bench.quantize_block [--recipe default,seed,default-svd] [--bins 3] [--rows 2048]
        [--config I2V_A14B] [--layers PATHS]

Per Linear of ``wanjax.model.names.BLOCK_LINEARS`` at the config's shapes (I2V_A14B: q/k/v/o and the cross-attention
projections 5120 -> 5120, ffn.fc1 5120 -> 13824, ffn.fc2 13824 -> 5120), with random weights N(0, 0.02²) and
synthetic calibration statistics — ``--rows`` sampled input rows per bin (N(0, 1) with 8 outlier channels ×50, the
activation shape the recipes are built for), their per-bin channel abs-max and the Hessian sum ``X^T X`` over all
bins — :func:`wanjax.quant.quantize.quantize_layer` runs the whole recipe (smoothing, low-rank SVD, GPTQ, packing,
the per-bin clip search, the layer SQNR), each layer timed to completion after one untimed warm-up of the same
shape (compilation excluded; reported separately). The sum over the 10 layers times ``num_layers`` blocks times 2
experts is the extrapolated quantization time of the model (the goal: ≤ 1 hour for both experts on one H100).
A third, synchronised run per layer gives the seconds of each step (``stages_s``: every transform, ``pack``,
``sqnr``). ``NAME-svd`` is recipe NAME with exact SVDs in place of randomized ones (`resolve_recipe`).
Calibration itself (capturing the statistics) is the sampler's forward passes, timed by ``bench.pipeline``.

Results: ``quantize_block.json`` (bench/results and $OUT) and a table.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import device_facts, write_result
from wanjax.model.names import BLOCK_LINEARS, block_linear_shapes


def layer_shapes(cfg) -> dict[str, tuple[int, int]]:
    """``path -> (K, N)`` of the 10 block Linears (`wanjax.model.names.block_linear_shapes`)."""
    return block_linear_shapes(cfg)


def synthetic_inputs(key, k: int, bins: int, rows: int):
    """LayerInputs with ``rows`` rows per bin; 8 outlier channels ×50; per-bin scale grows with the bin index."""
    from wanjax.quant.quantize import LayerInputs

    x = jax.random.normal(key, (bins, rows, k), jnp.float32)
    x = x * (1.0 + 0.5 * jnp.arange(bins, dtype=jnp.float32))[:, None, None]
    x = x.at[..., :8].multiply(50.0)
    flat = x.reshape(-1, k)
    h = jax.jit(lambda a: jnp.dot(a.T, a, precision=jax.lax.Precision.HIGHEST))(flat)
    return LayerInputs(absmax=np.asarray(jnp.max(jnp.abs(x), axis=1)), rows=np.asarray(x), hessian=np.asarray(h))


def resolve_recipe(name: str):
    """A named recipe, or ``NAME-svd``: that recipe with every low-rank step (the branch and the smoothing search's
    in-loop branch) computed by the exact SVD instead of the randomized one (the speed / fidelity comparison)."""
    from wanjax.quant.recipes import exact_lowrank, get_recipe

    if not name.endswith("-svd"):
        return get_recipe(name)
    return exact_lowrank(get_recipe(name[: -len("-svd")]), name)


def time_layer(recipe: str, path: str, k: int, n: int, inputs, seed: int) -> dict:
    from wanjax.quant.quantize import quantize_layer

    recipe = resolve_recipe(recipe)

    kw, kb = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
    b = jax.random.normal(kb, (n,), jnp.float32) * 0.1

    def run():
        cfg, arrays, info = quantize_layer(recipe, w, b, inputs, path=path, index=0, expert="high")
        jax.block_until_ready(arrays)
        return info

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = run()
    warm = time.perf_counter() - t0
    stages: dict = {}
    quantize_layer(recipe, w, b, inputs, path=path, index=0, expert="high", timings=stages)
    return {
        "path": path,
        "K": k,
        "N": n,
        "first_s": first,
        "warm_s": warm,
        "stages_s": stages,
        "sqnr_db_per_bin": [float(v) for v in np.asarray(info["sqnr_db"])],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="default,seed")
    ap.add_argument("--bins", type=int, default=3, help="timestep bins per expert (the seed: 3)")
    ap.add_argument("--rows", type=int, default=2048, help="sampled rows per bin (calibration default reservoir)")
    ap.add_argument("--config", default="I2V_A14B", choices=("I2V_A14B", "TINY"))
    ap.add_argument("--layers", default="", help="comma list of paths to time (default: all 10)")
    ap.add_argument("--name", default="quantize_block", help="result file name (bench/results/NAME.json)")
    a = ap.parse_args(argv)
    from bench.pipeline import ensure_package_layout

    ensure_package_layout()
    import wanjax.config as C

    cfg = getattr(C, a.config)
    shapes = layer_shapes(cfg)
    if a.layers:
        shapes = {p: shapes[p] for p in a.layers.split(",")}
    inputs = {
        k: synthetic_inputs(jax.random.key(k), k, a.bins, a.rows) for k in sorted({s[0] for s in shapes.values()})
    }
    out = {
        "device": device_facts(),
        "config": a.config,
        "bins": a.bins,
        "rows": a.rows,
        "blocks": cfg.num_layers,
        "recipes": {},
    }
    for recipe in a.recipe.split(","):
        rows = []
        for i, (path, (k, n)) in enumerate(shapes.items()):
            r = time_layer(recipe, path, k, n, inputs[k], seed=i)
            prof = " ".join(f"{name} {t:.2f}" for name, t in r["stages_s"].items())
            print(
                f"[bench.quantize_block] {recipe} {path} {k}x{n}: first {r['first_s']:.2f}s warm {r['warm_s']:.2f}s "
                f"SQNR {min(r['sqnr_db_per_bin']):.2f}..{max(r['sqnr_db_per_bin']):.2f} dB ({prof})",
                flush=True,
            )
            rows.append(r)
        block = sum(r["warm_s"] for r in rows)
        total = block * cfg.num_layers * 2 * (len(BLOCK_LINEARS) / len(rows))
        out["recipes"][recipe] = {
            "layers": rows,
            "block_warm_s": block,
            "both_experts_extrapolated_s": total,
            "layers_timed": len(rows),
        }
    write_result(a.name, out)
    print(
        "\n| recipe | one block (10 Linears), warm | first call (compile incl.) | both experts, extrapolated | goal ≤ 1 h |"
    )
    print("|---|---|---|---|---|")
    for recipe, r in out["recipes"].items():
        first = sum(x["first_s"] for x in r["layers"])
        tot = r["both_experts_extrapolated_s"]
        print(f"| {recipe} | {r['block_warm_s']:.1f} s | {first:.1f} s | {tot / 60:.1f} min | {tot <= 3600} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
