"""QuaRot-style Hadamard rotation of a Linear's input axis K (online on activations, folded into the weight).

The rotation is ``Q = diag(d) @ blockdiag(H_b, ..., H_b)`` with ``H_b`` the normalized Sylvester Walsh-Hadamard
matrix of size ``b`` (symmetric, orthogonal: ``H_b H_b = I``), ``b`` the largest power of two dividing K
(5120 -> 1024, 13824 -> 512), at most ``block_size`` if given, and ``d`` an optional random +-1 sign vector (all
ones otherwise).
``Q`` is orthogonal, so ``(x Q)(Q^T W) = x W`` exactly in real arithmetic:

* weight side (offline): ``kernel <- Q^T kernel`` (:func:`rotate`);
* activation side (run time): ``x <- x Q = apply_hadamard(x * d)`` (:func:`rotate_activations`), applied AFTER the
  smoothing division if the layer is smoothed (smooth first, then rotate);
* statistics: ``H <- Q^T H Q`` (:func:`rotate_hessian`), rows ``<- rows Q``; a per-channel abs-max does not rotate
  (recompute it from rotated rows).

:func:`apply_hadamard`, :func:`rotate_activations`, :func:`rotate_activations_mxu` and the other primitives live in
``wanjax.numerics.hadamard`` (import them from there); this module holds the transforms of a Linear's params and
statistics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wanjax.numerics.hadamard import hadamard_block_size, random_signs, rotate_activations
from wanjax.quant.rtn import check_finite_eager, check_linear_params

__all__ = ["rotate", "rotate_hessian"]


@functools.partial(jax.jit, static_argnums=2)
def _rotate_rows_of(m: jax.Array, signs: jax.Array, block_size) -> jax.Array:
    """``Q^T m`` for ``m [K, ...2-D]``: apply the transform along axis 0."""
    return rotate_activations(m.T, signs, block_size).T


def rotate_hessian(hessian: jax.Array, signs: jax.Array, block_size: int | None = None) -> jax.Array:
    """``Q^T H Q`` for a Hessian ``[K, K]`` of the un-rotated inputs (the Hessian of the rotated inputs)."""
    h = jnp.asarray(hessian, jnp.float32)
    b = hadamard_block_size(h.shape[-1], block_size)
    return rotate_activations(_rotate_rows_of(h, signs, b), signs, b)


def rotate(params: dict, key: jax.Array | None = None, block_size: int | None = None) -> dict:
    """Rotation transform of one Linear: ``kernel <- Q^T kernel``; adds ``"rot_signs"`` ``[K]`` (the ``d`` of ``Q``).

    Args:
      params: ``{"kernel": [K, N], "bias": [N], ...}`` (vmap over stacked kernels; pass a batch of keys for
        per-layer signs). If the layer is smoothed, smooth BEFORE rotating (run time: ``x / s`` then rotate).
      key: PRNG key for random signs; ``None`` for no signs (plain block Hadamard, ``d = 1``).
      block_size: largest Hadamard block (default: the largest power of two dividing K; see
        :func:`hadamard_block_size`). The activation side must use the same value; it is not stored.

    Returns:
      New dict with the rotated float32 ``"kernel"`` and ``"rot_signs"``; other keys (bias) unchanged.
      Raises ``ValueError`` if the params already carry a rotation or a low-rank branch (rotate before ``lowrank``).
    """
    k, _ = check_linear_params("rotate", params)
    if "rot_signs" in params:
        raise ValueError("rotate: params already carry 'rot_signs'; rotate a layer once")
    if "down" in params or "qweight" in params:
        raise ValueError("rotate: apply rotation before lowrank / gptq / rtn (params hold 'down' or 'qweight')")
    hadamard_block_size(k, block_size)
    check_finite_eager("rotate", "params['kernel']", params["kernel"])
    signs = jnp.ones((k,), jnp.float32) if key is None else random_signs(key, k)
    kernel = _rotate_rows_of(jnp.asarray(params["kernel"], jnp.float32), signs, hadamard_block_size(k, block_size))
    return {**params, "kernel": kernel, "rot_signs": signs}
