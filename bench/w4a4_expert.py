"""The W4A4 expert of the benchmarks: ``default``-recipe structure, RTN of the random bf16 expert's weights.

No calibration: the weights are the bf16 expert's (same keys, `bench.random_weights`), folded with a random
smoothing vector (and rotation), minus random bf16 low-rank factors, then RTN per output channel, all jitted on the
device layer stack by layer stack (`build_w4a4_expert`). Timing does not depend on the values.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from bench.random_weights import (
    block_linear_of,
    fill_random,
    hash_normalish,
    hash_uniform,
    layer_kernel,
    layer_seed,
    leaf_seed,
)


def quantized_skeleton(
    cfg, *, nbins: int, rank: int = 32, recipe="default", dtype=None, mode: str = "real", rotate: bool = True
):
    """The abstract (shape-only, ``nnx.eval_shape``) quantized expert: every ``BLOCK_LINEARS`` layer a stacked
    ``QLinear`` with the recipe's formats (``quant.quantize.layer_config``), a smoothing vector, rotation signs if
    the recipe rotates, a rank-``rank`` bf16 low-rank branch (none if 0), the Linear's bias and ``nbins``-entry
    tables; costs no device memory. ``rotate=False`` leaves the rotation out of a rotating recipe (what it costs)."""
    import jax.numpy as jnp
    from flax import nnx

    from wanjax.model.dit import WanDiT
    from wanjax.quant.apply import BLOCK_LINEARS, get_submodule, quantize_model
    from wanjax.quant.qlinear import QLinear
    from wanjax.quant.quantize import layer_config
    from wanjax.quant.recipes import Rotate, get_recipe

    dtype = dtype or jnp.bfloat16
    rec = get_recipe(recipe)
    rotates = rotate and any(isinstance(t, Rotate) for t in rec.transforms)

    def make():
        model = WanDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        qlayers = {}
        for path in BLOCK_LINEARS:
            lin = get_submodule(model, path)
            num_layers, k, n = lin.kernel.shape
            c = layer_config(rec.for_path(path), k, n, nbins)  # a mixed recipe's INT8 layers: int8 [n, k] codes
            if c.real_mode_problem():
                raise ValueError(
                    f"quantized_skeleton: recipe {rec.name!r} gives {path} a layer the kernels cannot "
                    f"run: {c.real_mode_problem()}"
                )
            r = min(rank, k, n)
            lowrank = (
                {}
                if r == 0
                else {
                    "down": jnp.zeros((num_layers, k, r), jnp.bfloat16),
                    "up": jnp.zeros((num_layers, r, n), jnp.bfloat16),
                }
            )
            qlayers[path] = QLinear(
                c,
                qweight=(
                    jnp.zeros((num_layers, n, k), jnp.int8)
                    if c.w_fmt == "int8"
                    else jnp.zeros((num_layers, n, k // 2), jnp.uint8)
                ),
                wscale=jnp.zeros((num_layers, n, k // c.w_group), jnp.float32),
                smooth=jnp.ones((num_layers, k), jnp.float32),
                rot_signs=jnp.ones((num_layers, k), jnp.float32) if rotates else None,
                bias=None if lin.bias is None else jnp.zeros((num_layers, n), dtype),
                act_clip=jnp.ones((num_layers, nbins), jnp.float32),
                path=path,
                **lowrank,
            )
        return quantize_model(model, qlayers, mode=mode)

    return nnx.eval_shape(make)


@functools.lru_cache(maxsize=None)
def _qlinear_builder(num_layers: int, k: int, n: int, rank: int, dtype, rot_block: int = 0, w_fmt: str = "int4"):
    """Jitted ``(seed_w, seed_s, seed_r, seed_d, seed_u) -> (qweight, wscale, smooth, rot_signs, down, up)`` of one
    stacked layer, block by block (``lax.map``: one block's temporaries at a time).

    Per block: ``W`` = :func:`layer_kernel` (the bf16 expert's kernel), ``s ~ U(0.5, 2)`` (the layer sees ``x / s``),
    with ``rot_block`` > 0 random signs ``d`` and ``Q = diag(d) blockdiag(H)`` (Hadamard blocks of ``rot_block``;
    the layer sees ``(x / s) Q``; None without), ``down`` std 1/sqrt(K) and ``up`` std 0.1/sqrt(r) in bf16, then
    RTN (int4 per output channel, packed) of ``(Q^T (s * W) - down @ up)^T``: so ``QLinear(x) ~ x @ W`` up to int4
    rounding, with every part of the real layer present (timing does not depend on the values).
    """
    import jax
    import jax.numpy as jnp

    from wanjax.numerics import formats

    from wanjax.numerics.hadamard import apply_hadamard

    def one(seeds, layer):
        s_w, s_s, s_r, s_d, s_u = seeds
        w = layer_kernel(s_w, layer, k, n, dtype).astype(jnp.float32)
        s = 1.25 + 0.75 * hash_uniform(layer_seed(s_s, layer), (k,))
        w_eff = w * s[:, None]
        signs = None
        if rot_block:  # Q^T (s W) = blockdiag(H) (d * s W): the Hadamard along K of (d * s W)^T, transposed back
            signs = jnp.where(hash_uniform(layer_seed(s_r, layer), (k,)) < 0, -1.0, 1.0).astype(jnp.float32)
            w_eff = apply_hadamard((w_eff * signs[:, None]).T, rot_block).T
        down = up = None
        if rank:
            down = (hash_normalish(layer_seed(s_d, layer), (k, rank)) / math.sqrt(k)).astype(jnp.bfloat16)
            up = (hash_normalish(layer_seed(s_u, layer), (rank, n)) * (0.1 / math.sqrt(rank))).astype(jnp.bfloat16)
            w_eff = w_eff - jnp.dot(
                down.astype(jnp.float32), up.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
            )
        if w_fmt == "int8":  # a mixed recipe's INT8 layer: int8 [N, K] codes, per-channel scales
            qt = formats.quantize_int8(w_eff.T, nonfinite="nan")
        else:
            qt = formats.quantize_int4(w_eff.T, nonfinite="nan").pack()
        return qt.codes, qt.scales, s, signs, down, up

    def build(*seeds):
        return jax.lax.map(lambda l: one(seeds, l), jnp.arange(num_layers, dtype=jnp.uint32))

    return jax.jit(build)


def build_w4a4_expert(
    cfg, seed: int = 0, *, nbins: int, rank: int = 32, mode: str = "real", rotate: bool = True, recipe="default"
):
    """A W4A4 expert of ``recipe``'s structure (``default``; a mixed recipe's INT8 layers get int8 codes) quantized
    (RTN, no calibration) from the random bf16 expert of the same ``seed`` (:func:`random_bf16_expert`), made on the
    device layer stack by layer stack."""
    import jax.numpy as jnp

    from wanjax.quant.apply import get_submodule
    from wanjax.numerics.hadamard import hadamard_block_size

    skeleton = quantized_skeleton(cfg, nbins=nbins, rank=rank, mode=mode, rotate=rotate, recipe=recipe)
    cache: dict[str, dict] = {}

    def quantized(name, leaf):
        path = block_linear_of(name)
        field = name.rsplit(".", 1)[-1]
        if path is None or field == "bias":
            return None
        if field == "act_clip":
            return jnp.ones(leaf.shape, jnp.float32)
        if field == "act_exp_offset":
            return jnp.zeros(leaf.shape, jnp.int32)
        if path not in cache:
            num_layers, n, _ = _qweight_shape(skeleton, path)
            r = _rank_of(skeleton, path)
            q = get_submodule(skeleton, path)
            k = q.config.in_features
            rot = 0 if q.rot_signs is None else hadamard_block_size(k, q.config.rot_block)
            fn = _qlinear_builder(num_layers, k, n, r, np.dtype(jnp.bfloat16), rot, q.config.w_fmt)
            out = fn(
                *(np.uint32(leaf_seed(seed, f"{path}.{p}")) for p in ("kernel", "smooth", "rot_signs", "down", "up"))
            )
            cache[path] = {
                f: a for f, a in zip(("qweight", "wscale", "smooth", "rot_signs", "down", "up"), out) if a is not None
            }
        value = cache[path].pop(field)
        if not cache[path]:
            del cache[path]
        return value

    return fill_random(skeleton, seed, quantized)


def _qweight_shape(skeleton, path):
    from wanjax.quant.apply import get_submodule

    return tuple(get_submodule(skeleton, path).qweight.shape)


def _rank_of(skeleton, path) -> int:
    from wanjax.quant.apply import get_submodule

    q = get_submodule(skeleton, path)
    return 0 if q.down is None else int(q.down.shape[-1])


def default_bins():
    """The seed's timestep bins over the official 40-step schedule (3 per expert), as ``wanjax quantize`` uses."""
    from wanjax.quant.bins import seed_bins
    from wanjax.sampling.schedule import flow_schedule

    return seed_bins(flow_schedule(40, shift=5.0))
