"""Linear-algebra helpers of the transforms: Hessian accumulation and GPTQ's damped inverse Cholesky factor.

Precision policy:

* Matmuls use ``Precision.HIGHEST`` (true fp32 on GPU/TPU, no TF32/bf16 passes).
* The damped Cholesky and the triangular inverse run in ``linalg_dtype``: ``None`` means float64 when JAX's x64 mode
  is enabled (``jax.config.update("jax_enable_x64", True)`` or ``with jax.enable_x64():``) and float32 otherwise.
  float64 is the safer choice for large, badly conditioned Hessians (outlier channels make diag(H) span many
  decades) and is cheap on CPU; float32 is what the GPTQ reference uses on GPU and works with the 1 % damping.
  Asking for float64 without x64 mode raises ``ValueError`` (JAX would silently give float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wanjax.quant.rtn import ActQuantSpec, fake_quant_act

__all__ = [
    "HIGHEST",
    "accumulate_hessian",
    "gptq_inverse_factor",
    "hessian_from_rows",
    "mm",
    "resolve_linalg_dtype",
]

HIGHEST = jax.lax.Precision.HIGHEST


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full precision (``Precision.HIGHEST``), result dtype of the inputs."""
    return jnp.matmul(a, b, precision=HIGHEST)


def resolve_linalg_dtype(dtype=None):
    """The dtype for Cholesky work: ``dtype`` if given, else float64 under x64 mode, else float32."""
    x64 = bool(jax.config.jax_enable_x64)
    if dtype is None:
        return jnp.float64 if x64 else jnp.float32
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not x64:
        raise ValueError(
            "linalg_dtype=float64 needs JAX x64 mode (jax.config.update('jax_enable_x64', True) or "
            "`with jax.enable_x64():`); got x64 disabled. Pass None or float32 instead."
        )
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"linalg_dtype must be float32 or float64, got {dtype}")
    return dtype


def _rows_2d(fn: str, rows: jax.Array) -> jax.Array:
    rows = jnp.asarray(rows)
    if rows.ndim < 2:
        raise ValueError(f"{fn}: rows must be [..., n, K] (at least 2-D), got shape {tuple(rows.shape)}")
    return rows.reshape(-1, rows.shape[-1]).astype(jnp.float32)


def hessian_from_rows(
    rows: jax.Array, smooth: jax.Array | None = None, act_spec: ActQuantSpec | None = None
) -> tuple[jax.Array, jax.Array]:
    """GPTQ Hessian sum ``H = X~^T X~`` (float32 ``[K, K]``) and its row count (int32 scalar).

    ``X~`` are the input rows ``[..., K]`` (flattened to ``[n, K]``), divided by the smoothing vector ``smooth``
    ``[K]`` if given (the layer sees ``x / s``), then fake-quantized per token with ``act_spec`` if given - the seed's
    Hessian from activation-quantized inputs (``ActQuantSpec("mxfp4", scale_rule="safe_ceil")``, clip 1.0).
    GPTQ is invariant to a global scale of H, so sums and means are interchangeable there.
    """
    return _hessian(_rows_2d("hessian_from_rows", rows), smooth, act_spec)


@functools.partial(jax.jit, static_argnums=2)
def _hessian(x, smooth, act_spec):
    if smooth is not None:
        x = x / jnp.asarray(smooth, jnp.float32)
    x = fake_quant_act(x, act_spec)
    return mm(x.T, x), jnp.asarray(x.shape[0], jnp.int32)


def accumulate_hessian(
    hessian: jax.Array,
    count: jax.Array,
    rows: jax.Array,
    smooth: jax.Array | None = None,
    act_spec: ActQuantSpec | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Streaming form of :func:`hessian_from_rows`: returns ``(hessian + H(rows), count + n)``."""
    h, n = hessian_from_rows(rows, smooth, act_spec)
    return hessian + h, count + n


def _upper_inverse_cholesky(h: jax.Array) -> jax.Array:
    """Upper-triangular ``U`` with ``U^T U = h^-1`` (the factor GPTQ uses), via one Cholesky of the reversed matrix.

    With ``J`` the reversal permutation and ``J h J = L L^T``: ``h^-1 = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is
    upper triangular with a positive diagonal, so it is THE upper Cholesky factor of ``h^-1`` (equal to
    ``cholesky(inv(h)).T``) without forming the inverse. NaN when ``h`` is not positive definite.
    """
    l = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    linv = jax.scipy.linalg.solve_triangular(l, eye, lower=True)
    return jnp.triu(linv[::-1, ::-1])


def gptq_inverse_factor(
    hessian: jax.Array, percdamp: float = 0.01, max_tries: int = 6, linalg_dtype=None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Damped inverse Cholesky factor of a GPTQ Hessian.

    Steps (as the seed / GPTQ reference): dead input channels (``diag(H) == 0``) get ``H_jj = 1``; damping
    ``lambda = percdamp * mean(diag H)`` is added to the diagonal; ``U = chol_upper((H + lambda I)^-1)``. If the
    factorization fails (non-finite ``U``), it retries with ``lambda * 10**t`` for ``t = 1 .. max_tries``
    (a ``lax.while_loop``: jit- and vmap-safe). A Hessian that is all zeros is treated as the identity.

    Returns:
      ``(U [K, K] in linalg_dtype, dead [K] bool, tries int32)``; ``tries`` is how many retries were needed.
    """
    dtype = resolve_linalg_dtype(linalg_dtype)
    h = jnp.asarray(hessian).astype(dtype)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"gptq_inverse_factor: hessian must be square [K, K], got shape {tuple(h.shape)}")
    k = h.shape[0]
    h = 0.5 * (h + h.T)
    diag = jnp.diagonal(h)
    dead = diag <= 0
    idx = jnp.arange(k)
    h = h.at[idx, idx].set(jnp.where(dead, jnp.ones_like(diag), diag))
    h = jnp.where(dead[:, None] | dead[None, :], jnp.where(idx[:, None] == idx[None, :], h, 0), h)
    damp = jnp.asarray(percdamp, dtype) * jnp.mean(jnp.diagonal(h))

    def attempt(t):
        lam = damp * jnp.asarray(10.0, dtype) ** t.astype(dtype)
        return _upper_inverse_cholesky(h.at[idx, idx].add(lam))

    def failed(u):
        return ~jnp.all(jnp.isfinite(u))

    def cond(state):
        t, u = state
        return failed(u) & (t < max_tries)

    def body(state):
        t, _ = state
        return t + 1, attempt(t + 1)

    t0 = jnp.asarray(0, jnp.int32)
    tries, u = jax.lax.while_loop(cond, body, (t0, attempt(t0)))
    return u, dead, tries
