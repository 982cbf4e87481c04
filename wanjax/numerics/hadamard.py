"""Walsh-Hadamard butterflies and the block-diagonal Hadamard rotation of the last axis K (QuaRot-style).

The rotation is ``Q = diag(d) @ blockdiag(H_b, ..., H_b)`` with ``H_b`` the normalized Sylvester Walsh-Hadamard
matrix of size ``b`` (symmetric, orthogonal: ``H_b H_b = I``), ``b`` the largest power of two dividing K
(5120 -> 1024, 13824 -> 512), at most ``block_size`` if given, and ``d`` an optional random +-1 sign vector.

:func:`apply_hadamard` is a fast Walsh-Hadamard transform built from reshapes (``log2 b`` butterfly stages,
O(K log b) adds), in float32: the definition, used for calibration, fake quantization and references.
:func:`rotate_activations_mxu` is the run-time form of the quantized linears (the numerics of the fused GPU act-quant
kernel, as one matrix product on the tensor cores / MXU instead of ``log2 b`` passes over the activations).
The transforms that fold ``Q`` into weights and Hessians live in ``wanjax.quant.rotate``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MXU_PIECE",
    "apply_hadamard",
    "hadamard_block_size",
    "hadamard_matrix",
    "random_signs",
    "rotate_activations",
    "rotate_activations_mxu",
]


def hadamard_block_size(k: int, block_size: int | None = None) -> int:
    """Block size of the block-diagonal Hadamard for input size ``k``: the largest power of two dividing ``k``, at most
    ``block_size`` if given (a power of two: the largest block wanted; 256 gives 256 at K = 5120 and 64 at K = 192)."""
    k = int(k)
    if k <= 0:
        raise ValueError(f"hadamard_block_size: K must be positive, got {k}")
    if block_size is None:
        return k & -k
    b = int(block_size)
    if b <= 0 or b & (b - 1):
        raise ValueError(
            f"hadamard_block_size: block_size must be a power of two (the largest block for K={k}), got {block_size!r}"
        )
    return min(b, k & -k)


def hadamard_matrix(n: int, dtype=np.float32) -> np.ndarray:
    """Dense normalized Sylvester Hadamard matrix ``[n, n]`` (numpy; for references and tests)."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: n must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(dtype)


def apply_hadamard(x: jax.Array, block_size: int | None = None) -> jax.Array:
    """``x @ blockdiag(H_b, ...)`` along the last axis (normalized, Sylvester order), as a fast WHT in float32.

    Args:
      x: ``[..., K]``.
      block_size: the largest block (a power of two); default: the largest power of two dividing K (see
        :func:`hadamard_block_size`).
    """
    x = jnp.asarray(x, jnp.float32)
    return _fwht(x, hadamard_block_size(x.shape[-1], block_size))


@functools.partial(jax.jit, static_argnums=1)
def _fwht(x: jax.Array, b: int) -> jax.Array:
    """Normalized block WHT of the last axis with block ``b`` (jitted: one compile per shape)."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < b:
        y = x.reshape(*lead, k // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + c, a - c], axis=-2).reshape(*lead, k)
        h *= 2
    return x * jnp.float32(1.0 / np.sqrt(b))


def random_signs(key: jax.Array, k: int) -> jax.Array:
    """Random +-1 float32 vector ``[k]`` (the diagonal ``d`` of the rotation)."""
    return jnp.where(jax.random.bernoulli(key, 0.5, (k,)), 1.0, -1.0).astype(jnp.float32)


def rotate_activations(x: jax.Array, signs: jax.Array, block_size: int | None = None) -> jax.Array:
    """Activation side ``x Q = apply_hadamard(x * signs)`` for ``x [..., K]``."""
    return apply_hadamard(jnp.asarray(x, jnp.float32) * jnp.asarray(signs, jnp.float32), block_size)


#: Columns of the dense +-1 Hadamard factor of :func:`rotate_activations_mxu` (larger blocks are butterflies of it).
MXU_PIECE = 128


def rotate_activations_mxu(x: jax.Array, signs: jax.Array, block_size: int | None = None) -> jax.Array:
    """``x Q`` as the quantized linears compute it at run time: float32 ``[..., K]``, equal to
    :func:`rotate_activations` up to the bf16 rounding of the product's input.

    The Hadamard block ``b`` factors as ``H_b = H_p (x) H_h`` (Sylvester order, ``h = min(b, MXU_PIECE)``,
    ``p = b / h``): ``x * signs`` is mixed across its ``p`` pieces of ``h`` columns by float32 butterflies, rounded to
    bf16 and multiplied by the +-1 matrix of ``H_h`` (exact in bf16) with float32 accumulation, then scaled by
    ``1 / sqrt(b)``. These are the numerics of the fused GPU kernel's in-kernel rotation
    (``kernels.act_quant_gpu``, ``rot_signs``) as one batched matrix product, which runs on the tensor cores / MXU
    where the float32 transform is ``log2 b`` passes over the activations.
    """
    x = jnp.asarray(x, jnp.float32) * jnp.asarray(signs, jnp.float32)
    b = hadamard_block_size(x.shape[-1], block_size)
    return _rotate_mxu(x, b, min(b, MXU_PIECE))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rotate_mxu(x: jax.Array, b: int, h: int) -> jax.Array:
    k, lead = x.shape[-1], x.shape[:-1]
    p = b // h
    y = x.reshape(*lead, k // b, p, h)
    step = 1
    while step < p:  # f32 Walsh-Hadamard butterflies over the piece axis (size p)
        z = y.reshape(*lead, k // b, p // (2 * step), 2, step, h)
        a, c = z[..., 0, :, :], z[..., 1, :, :]
        y = jnp.stack([a + c, a - c], axis=-3).reshape(*lead, k // b, p, h)
        step *= 2
    pm1 = jnp.asarray(np.sign(hadamard_matrix(h)), jnp.bfloat16)
    y = jnp.einsum("...ph,hj->...pj", y.astype(jnp.bfloat16), pm1, preferred_element_type=jnp.float32)
    return y.reshape(*lead, k) * jnp.float32(1.0 / np.sqrt(b))
