"""SmoothQuant-style smoothing: move activation outliers of input channels into the weight.

Per input channel ``j``: ``a_j`` = activation abs-max (calibration statistic of the layer's raw input),
``w_j = max_n |W[j, n]|`` (abs-max of the kernel's row j, ``[in, out]`` layout) and::

    s_j = max(a_j, eps)^alpha / max(w_j, eps)^(1 - alpha)        (seed: alpha 0.5, eps 1e-8)

The smoothed layer computes ``(x / s) @ (s[:, None] * W)``, identical to ``x @ W`` before quantization. ``alpha`` is
fixed (:func:`smooth`) or searched per layer over a grid (:func:`smooth_search`) by the relative output error of the
quantized layer on sampled input rows (optionally with the low-rank branch in the loop, as DeepCompressor's
``allow_low_rank``). Order of transforms on one layer: smooth -> (rotate) -> lowrank -> gptq / rtn.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.quant.linalg import mm
from wanjax.quant.lowrank import lowrank
from wanjax.quant.rtn import (
    ActQuantSpec,
    WeightQuantSpec,
    check_finite_eager,
    check_linear_params,
    fake_quant_act,
    fake_quant_kernel,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "smooth",
    "smooth_hessian",
    "smooth_search",
    "smoothing_scales",
    "smoothed_output_error",
]

#: Search grid of DeepCompressor's SVDQuant config (num_grids 20): 1/20 .. 19/20.
DEFAULT_ALPHAS = tuple(round(i / 20, 2) for i in range(1, 20))


def _check_absmax(fn: str, act_absmax, k: int) -> jax.Array:
    a = jnp.asarray(act_absmax, jnp.float32)
    if a.shape != (k,):
        raise ValueError(f"{fn}: act_absmax must be [K] = ({k},) to match the kernel, got {tuple(a.shape)}")
    check_finite_eager(fn, "act_absmax", a)
    if not isinstance(a, jax.core.Tracer) and bool(jnp.any(a < 0)):
        raise ValueError(f"{fn}: act_absmax must be >= 0 (an abs-max), got min {float(jnp.min(a))}")
    return a


def _check_order(fn: str, params: dict) -> None:
    for key, why in (
        ("smooth", "smooth a layer once"),
        ("rot_signs", "smooth before rotating"),
        ("down", "smooth before lowrank"),
        ("qweight", "smooth before gptq / rtn"),
    ):
        if key in params:
            raise ValueError(f"{fn}: params already hold {key!r}; {why}")


def smoothing_scales(act_absmax: jax.Array, kernel: jax.Array, alpha, eps: float = 1e-8) -> jax.Array:
    """``s = max(a, eps)^alpha / max(w, eps)^(1 - alpha)`` ``[K]`` with ``w`` the kernel's per-input-row abs-max.

    ``alpha`` may be traced (the search vmaps / maps over it).
    """
    a = jnp.maximum(jnp.asarray(act_absmax, jnp.float32), eps)
    w = jnp.maximum(jnp.max(jnp.abs(jnp.asarray(kernel, jnp.float32)), axis=1), eps)
    alpha = jnp.asarray(alpha, jnp.float32)
    return a**alpha / w ** (1.0 - alpha)


def smooth(params: dict, act_absmax: jax.Array, alpha: float = 0.5, eps: float = 1e-8) -> dict:
    """Smoothing transform with a fixed ``alpha``: ``kernel <- s[:, None] * kernel``, adds ``"smooth"`` = ``s`` [K].

    At run time the layer input is divided by ``s`` (``x / s``). ``act_absmax`` [K] is the abs-max of the layer's raw
    input. Returns a new dict (float32 kernel); bias unchanged. Use ``jax.vmap`` over stacked layers.
    """
    k, _ = check_linear_params("smooth", params)
    _check_order("smooth", params)
    a = _check_absmax("smooth", act_absmax, k)
    w = jnp.asarray(params["kernel"], jnp.float32)
    check_finite_eager("smooth", "params['kernel']", w)
    kernel, s = _smooth_core(w, a, alpha, float(eps))
    return {**params, "kernel": kernel, "smooth": s}


@functools.partial(jax.jit, static_argnums=3)
def _smooth_core(w, a, alpha, eps):
    s = smoothing_scales(a, w, alpha, eps)
    return w * s[:, None], s


@functools.partial(jax.jit, static_argnames=("w_spec", "a_spec", "rank", "lowrank_dtype", "lowrank_method"))
def smoothed_output_error(
    kernel: jax.Array,
    rows: jax.Array,
    s: jax.Array,
    w_spec: WeightQuantSpec,
    a_spec: ActQuantSpec | None,
    rank: int = 0,
    lowrank_dtype=jnp.bfloat16,
    lowrank_method: str = "svd",
) -> jax.Array:
    """Relative output error ``||X W - y_q||^2 / ||X W||^2`` of the smoothed, quantized layer on rows ``X [n, K]``.

    ``y_q = Qa(X / s) @ Qw(s W - L) + (X / s) @ L`` with ``L = down @ up`` the rank-``rank`` branch of ``s W``
    (none when ``rank == 0``; ``lowrank_method`` as :func:`wanjax.quant.lowrank.lowrank`), ``Qw`` RTN with ``w_spec``
    and ``Qa`` dynamic per-token fake quant with ``a_spec``.
    """
    w = jnp.asarray(kernel, jnp.float32)
    x = jnp.asarray(rows, jnp.float32)
    y_ref = mm(x, w)
    xs = x / s
    p = {"kernel": w * s[:, None]}
    if rank:
        p = lowrank(p, rank, lowrank_dtype, method=lowrank_method)
    y = mm(fake_quant_act(xs, a_spec), fake_quant_kernel(p["kernel"], w_spec))
    if rank:
        y = y + mm(mm(xs, p["down"].astype(jnp.float32)), p["up"].astype(jnp.float32))
    return jnp.sum((y_ref - y) ** 2) / jnp.maximum(jnp.sum(y_ref**2), jnp.finfo(jnp.float32).tiny)


def smooth_search(
    params: dict,
    act_absmax: jax.Array,
    rows: jax.Array,
    w_spec: WeightQuantSpec,
    a_spec: ActQuantSpec | None,
    alphas=DEFAULT_ALPHAS,
    rank: int = 0,
    eps: float = 1e-8,
    lowrank_dtype=jnp.bfloat16,
    lowrank_method: str = "svd",
) -> tuple[dict, dict]:
    """Smoothing with ``alpha`` chosen per layer from ``alphas`` by :func:`smoothed_output_error` on ``rows``.

    Args:
      params: Linear params ``{"kernel": [K, N], ...}``.
      act_absmax: ``[K]`` abs-max of the raw layer input.
      rows: sampled raw input rows ``[n, K]``.
      w_spec, a_spec: the quantizers the layer will use (RTN stands in for GPTQ during the search).
      alphas: static grid (default 0.05 .. 0.95).
      rank: include a low-rank branch of this rank in the objective (0: none).
      lowrank_method: ``"svd"`` (exact) or ``"randomized"`` for that branch (see ``wanjax.quant.lowrank``).

    Returns:
      ``(new_params, info)``: params as :func:`smooth` at the best alpha; ``info = {"alpha": scalar,
      "errors": [len(alphas)]}``. Ties pick the first alpha of the grid. jit/vmap-safe (alphas are static).
    """
    k, _ = check_linear_params("smooth_search", params)
    _check_order("smooth_search", params)
    a = _check_absmax("smooth_search", act_absmax, k)
    x = jnp.asarray(rows, jnp.float32)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"smooth_search: rows must be [n, K] with K={k}, got {tuple(x.shape)}")
    grid = np.asarray(alphas, np.float32)
    if grid.ndim != 1 or grid.size == 0 or np.any(grid < 0) or np.any(grid > 1):
        raise ValueError(f"smooth_search: alphas must be a non-empty 1-D grid in [0, 1], got {alphas!r}")
    w = jnp.asarray(params["kernel"], jnp.float32)
    check_finite_eager("smooth_search", "params['kernel']", w)
    check_finite_eager("smooth_search", "rows", x)

    errors, best, s = _search(
        w,
        a,
        x,
        w_spec=w_spec,
        a_spec=a_spec,
        alphas=tuple(float(v) for v in grid),
        rank=rank,
        eps=float(eps),
        lowrank_dtype=jnp.dtype(lowrank_dtype),
        lowrank_method=lowrank_method,
    )
    return {**params, "kernel": w * s[:, None], "smooth": s}, {"alpha": best, "errors": errors}


@functools.partial(
    jax.jit, static_argnames=("w_spec", "a_spec", "alphas", "rank", "eps", "lowrank_dtype", "lowrank_method")
)
def _search(w, a, x, *, w_spec, a_spec, alphas, rank, eps, lowrank_dtype, lowrank_method):
    """(errors per alpha, best alpha, its scales); jitted so repeated layers of one shape compile once."""
    grid = jnp.asarray(alphas, jnp.float32)

    def err(alpha):
        return smoothed_output_error(
            w, x, smoothing_scales(a, w, alpha, eps), w_spec, a_spec, rank, lowrank_dtype, lowrank_method
        )

    errors = jax.lax.map(err, grid)
    best = grid[jnp.argmin(errors)]
    return errors, best, smoothing_scales(a, w, best, eps)


def smooth_hessian(hessian: jax.Array, s: jax.Array) -> jax.Array:
    """Hessian of the smoothed inputs ``x / s``: ``H / (s s^T)`` for ``H`` of the raw inputs."""
    s = jnp.asarray(s, jnp.float32)
    return jnp.asarray(hessian, jnp.float32) / (s[:, None] * s[None, :])
