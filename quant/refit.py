"""Refit of the low-rank branch after the residual is quantized (a reduced-rank regression on calibration rows).

SVDQuant fits the rank-r branch ``L = down @ up`` to the weight *before* the residual ``R = W - L`` is quantized, so
the branch never sees the quantization error. Once the quantizer has fixed ``Q_w ~ R`` (codes and scales stay as
they are), the branch can be refit to what the layer actually misses on the calibration inputs ``X`` (the rows the
matmul sees, i.e. already smoothed / rotated)::

    T = X W - Q_a(X) Q_w          (target="output": weight AND activation quantization error of the 4-bit path)
    T = X (W - Q_w)               (target="weight": the weight error only)
    L = argmin_{rank(L) <= r} || bf16(X) L - T ||^2 + sum_k lam_k ||L_k - L0_k||^2

with ``W = R + down @ up`` the full (smoothed) weight, ``L0 = down @ up`` the branch being replaced (the ridge pulls
toward it, not toward zero: input directions the calibration rows do not cover keep the SVD branch) and ``Q_a`` the
recipe's activation quantizer at clip 1. With ``H = X^T X + diag(lam) = C C^T`` (Cholesky) this is
``|| C^T L - C^-1 (X^T T + diag(lam) L0) ||^2`` up to a constant, so ``L`` is ``C^-T`` times the top-r SVD of
``C^-1 (X^T T + diag(lam) L0)``; the new factors keep the singular values split evenly::

    down = C^-T U_r S_r^1/2    [K, r]        up = S_r^1/2 V_r^T    [r, N]

The ridge is per channel, ``lam_k = percdamp * H_kk`` (plus 1e-6 of the mean diagonal for dead channels), so it
does not depend on the channels' scales. The refit is kept only where it lowers the calibration objective
(unregularized) against the branch it replaces, so it never makes the calibration fit worse. Costs nothing at run
time: the branch has the same shape and dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wanjax.quant.linalg import mm
from wanjax.quant.rtn import ActQuantSpec, fake_quant_act

__all__ = ["REFIT_TARGETS", "refit_lowrank"]

REFIT_TARGETS = ("output", "weight")


def refit_lowrank(
    params: dict, residual, x, act_spec: ActQuantSpec | None, *, target: str = "output", percdamp: float = 0.01
) -> tuple[dict, dict]:
    """Refits ``params["down"] / params["up"]`` to the quantized layer's error on the rows ``x``.

    Args:
      params: the quantized layer's params: ``"kernel"`` = dequantized quantized residual ``Q_w [K, N]``, ``"down"``
        ``[K, r]``, ``"up"`` ``[r, N]`` (their dtype is kept).
      residual: the residual ``R [K, N]`` the quantizer was given (so ``W = R + down @ up``).
      x: ``[n, K]`` rows as the matmul sees them (smoothed / rotated), float.
      act_spec: the activation quantizer (clip 1) for ``target="output"``; None: activations unquantized.
      target: ``"output"`` or ``"weight"`` (see the module docstring).
      percdamp: ridge ``lam_k = percdamp * (X^T X)_kk`` per input channel (> 0).

    Returns:
      ``(params with the new or the old branch, {"before": f, "after": f, "kept": bool})``: the calibration objective
      (relative: ``||err||^2 / ||X W||^2``) with the old branch and with the refit one; ``kept`` whether the refit
      replaced the old branch.
    """
    if "down" not in params or "up" not in params:
        raise ValueError(
            "refit_lowrank: params hold no low-rank branch ('down'/'up'); put LowRank before the quantizer"
        )
    if target not in REFIT_TARGETS:
        raise ValueError(f"refit_lowrank: target must be one of {REFIT_TARGETS}, got {target!r}")
    if not percdamp > 0:
        raise ValueError(f"refit_lowrank: percdamp must be > 0, got {percdamp!r}")
    x = jnp.asarray(x, jnp.float32)
    k, n = jnp.shape(params["kernel"])
    if x.ndim != 2 or x.shape[1] != k or tuple(jnp.shape(residual)) != (k, n):
        raise ValueError(
            f"refit_lowrank: expected rows [n, K={k}] and residual [K={k}, N={n}], got {tuple(x.shape)} "
            f"and {tuple(jnp.shape(residual))}"
        )
    dtype = jnp.asarray(params["down"]).dtype
    down, up, before, after = _refit(
        x,
        jnp.asarray(residual, jnp.float32),
        jnp.asarray(params["kernel"], jnp.float32),
        jnp.asarray(params["down"]),
        jnp.asarray(params["up"]),
        act_spec,
        target == "output",
        float(percdamp),
    )
    before, after = float(before), float(after)
    kept = after < before
    if kept:
        params = {**params, "down": down.astype(dtype), "up": up.astype(dtype)}
    return params, {"before": before, "after": after, "kept": kept}


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _refit(x, residual, qw, down, up, act_spec, with_act, percdamp):
    r = down.shape[1]
    l_old = mm(down.astype(jnp.float32), up.astype(jnp.float32))
    w = residual + l_old
    xq = fake_quant_act(x, act_spec) if with_act else x
    t = mm(x, w) - mm(xq, qw)  # what the 4-bit path misses, [n, N]
    xb = x.astype(jnp.bfloat16).astype(jnp.float32)  # the branch's input is bf16 at run time
    h = mm(xb.T, xb)
    dg = jnp.diag(h)
    lam = percdamp * dg + 1e-6 * jnp.mean(dg) + 1e-30  # per-channel ridge (scale-free), dead channels
    c = jnp.linalg.cholesky(h + jnp.diag(lam))  # H + diag(lam) = C C^T, C lower
    m = jax.scipy.linalg.solve_triangular(c, mm(xb.T, t) + lam[:, None] * l_old, lower=True)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[:r])
    new_down = jax.scipy.linalg.solve_triangular(c.T, u[:, :r] * root[None, :], lower=False)
    new_up = root[:, None] * vt[:r]
    # objective with the stored (rounded) factors, relative to the layer's output energy
    ref = jnp.maximum(jnp.sum(jnp.square(mm(x, w))), 1e-30)

    def err(d, u_):
        return (
            jnp.sum(
                jnp.square(
                    mm(xb, mm(d.astype(down.dtype).astype(jnp.float32), u_.astype(up.dtype).astype(jnp.float32))) - t
                )
            )
            / ref
        )

    ok = jnp.all(jnp.isfinite(new_down)) & jnp.all(jnp.isfinite(new_up))
    after = jnp.where(ok, err(new_down, new_up), jnp.inf)
    return new_down, new_up, err(down, up), after
