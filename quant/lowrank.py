"""SVDQuant low-rank branch: split a (smoothed) kernel into a rank-r 16-bit branch and a residual to quantize.

``W [K, N] = U S V^T`` (thin SVD, singular values descending); the branch keeps the top ``r`` triplets with the
singular values split evenly between the factors (the seed's ``A = S^1/2 V^T``, ``B = U S^1/2``, transposed to our
``[in, out]`` layout)::

    down = U_r S_r^1/2      [K, r]   (x_s @ down: the "lora down" the act-quant kernel fuses)
    up   = S_r^1/2 V_r^T    [r, N]
    residual = W - f32(down) @ f32(up)

``down`` / ``up`` are stored in ``dtype`` (bfloat16 by default, as the seed) and the residual is taken against
those stored values, so ``residual + down @ up`` reproduces ``W`` up to float32 rounding whatever ``dtype`` is.
At run time: ``y = Q(x_s) @ Q(residual) + (x_s @ down) @ up + bias``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wanjax.quant.linalg import mm
from wanjax.quant.rtn import check_finite_eager, check_linear_params

__all__ = ["LOWRANK_METHODS", "lowrank", "svd_lowrank"]

#: ``"svd"``: exact thin SVD (the seed's). ``"randomized"``: subspace iteration (Halko et al. 2011) with
#: ``oversample`` extra columns and ``power_iters`` re-orthonormalized power steps: O(K N (r + p)) per step instead
#: of a full SVD, accurate to well under 1 % of the optimal residual for the fast-decaying spectra of trained
#: weights; for a flat spectrum it is merely a good rank-r branch, not the best one.
LOWRANK_METHODS = ("svd", "randomized")


def svd_lowrank_check(kernel, rank) -> None:
    """Raises ``ValueError`` unless ``kernel`` is 2-D and ``1 <= rank <= min(K, N)``."""
    if kernel.ndim != 2:
        raise ValueError(f"svd_lowrank: kernel must be [K, N], got shape {tuple(kernel.shape)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(kernel.shape):
        raise ValueError(f"svd_lowrank: rank must be an int in [1, min(K, N)] = [1, {min(kernel.shape)}], got {rank!r}")


def _check_method(method: str, oversample: int, power_iters: int) -> None:
    if method not in LOWRANK_METHODS:
        raise ValueError(f"lowrank: method must be one of {LOWRANK_METHODS}, got {method!r}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"lowrank: oversample and power_iters must be >= 0, got {oversample}, {power_iters}")


def _randomized_svd(w: jax.Array, rank: int, oversample: int, power_iters: int, seed: int):
    """Thin ``(u, s, vt)`` of the top ``rank + oversample`` subspace of ``w`` by randomized subspace iteration."""
    k, n = w.shape
    m = min(rank + oversample, k, n)
    omega = jax.random.normal(jax.random.key(seed), (n, m), jnp.float32)
    q, _ = jnp.linalg.qr(mm(w, omega))
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(mm(w.T, q))
        q, _ = jnp.linalg.qr(mm(w, z))
    ub, s, vt = jnp.linalg.svd(mm(q.T, w), full_matrices=False)
    return mm(q, ub), s, vt


def svd_lowrank(
    kernel: jax.Array, rank: int, method: str = "svd", oversample: int = 16, power_iters: int = 4, seed: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Top-``rank`` SVD factors ``(down [K, r], up [r, N])`` (float32) of ``kernel [K, N]``: ``down @ up`` is the best
    rank-r approximation (Eckart-Young; ``method="svd"``) and ``down^T down = up up^T = diag(S_r)``.

    ``method="randomized"`` computes the same factors from a randomized subspace iteration (see ``LOWRANK_METHODS``;
    ``seed`` fixes its Gaussian test matrix, so results are deterministic).
    """
    w = jnp.asarray(kernel, jnp.float32)
    svd_lowrank_check(w, rank)
    _check_method(method, oversample, power_iters)
    if method == "svd":
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    else:
        u, s, vt = _randomized_svd(w, rank, oversample, power_iters, seed)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def lowrank(
    params: dict,
    rank: int,
    dtype=jnp.bfloat16,
    method: str = "svd",
    oversample: int = 16,
    power_iters: int = 4,
    seed: int = 0,
) -> dict:
    """Low-rank transform of one Linear: ``params -> {kernel: residual, down, up, ...}``.

    Args:
      params: ``{"kernel": [K, N], "bias": [N], ...}`` (already smoothed / rotated if those run first); use
        ``jax.vmap`` over stacked kernels.
      rank: r >= 1 (seed 16, SVDQuant 32).
      dtype: storage dtype of ``down`` / ``up`` (bfloat16 default; float32 for exactness tests).
      method, oversample, power_iters, seed: ``"svd"`` (exact, default) or ``"randomized"`` (faster for large
        kernels); see :func:`svd_lowrank`.

    Returns:
      A new dict with ``"kernel"`` = float32 residual ``[K, N]``, ``"down"`` ``[K, r]``, ``"up"`` ``[r, N]``; other keys
      unchanged. Raises ``ValueError`` if the params already hold a branch (apply it once).
    """
    check_linear_params("lowrank", params)
    if "down" in params or "up" in params:
        raise ValueError("lowrank: params already hold a low-rank branch ('down'/'up'); apply lowrank once per layer")
    check_finite_eager("lowrank", "params['kernel']", params["kernel"])
    svd_lowrank_check(params["kernel"], rank)
    _check_method(method, oversample, power_iters)
    residual, down, up = _lowrank_core(
        jnp.asarray(params["kernel"], jnp.float32),
        rank,
        jnp.dtype(dtype),
        method,
        int(oversample),
        int(power_iters),
        int(seed),
    )
    return {**params, "kernel": residual, "down": down, "up": up}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _lowrank_core(w, rank, dtype, method, oversample, power_iters, seed):
    down, up = svd_lowrank(w, rank, method, oversample, power_iters, seed)
    down, up = down.astype(dtype), up.astype(dtype)
    return w - mm(down.astype(jnp.float32), up.astype(jnp.float32)), down, up
