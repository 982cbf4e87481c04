"""Per-(layer, bin) activation table search and layer SQNR.

For each timestep bin ``b`` of one layer, every candidate ``(clip, exp_offset)`` of a grid (the seed's 5 clips x 3
MX exponent offsets = 15 for MXFP4; clips only for int formats; in static mode ``scale = clip * base[b]``) is scored
by the relative output error of the quantized layer (weights already quantized) on that bin's sampled input rows
against the UNQUANTIZED layer::

    err_b(c) = sum ||y_q(x; c) - (x W + bias)||^2 / sum ||x W + bias||^2       (x: raw rows of bin b)

and the argmin is kept (ties: the first candidate). ``per_bin=False`` sums numerators and denominators over the
bins and keeps one candidate for all of them ("one clip"). The forward is ``qlinear_apply`` in fake mode with
float32 operands, so the score measures quantization alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.metrics import sqnr_db
from wanjax.numerics.table import INT_QMAX
from wanjax.quant.linalg import mm
from wanjax.quant.qlinear import QLinearConfig, qlinear_apply

__all__ = ["candidate_grid", "candidate_errors", "layer_sqnr", "search_tables", "static_base_scale"]


def candidate_grid(config: QLinearConfig, clips, exp_offsets) -> tuple[np.ndarray, np.ndarray]:
    """``(clips [C], exp_offsets [C])``: the product for mxfp4 activations, ``clips`` with offset 0 otherwise."""
    clips = [float(c) for c in clips]
    if not clips or any(not (np.isfinite(c) and c > 0) for c in clips):
        raise ValueError(f"candidate_grid: clips must be a non-empty list of finite values > 0, got {clips}")
    offs = [int(o) for o in exp_offsets] if config.a_fmt == "mxfp4" and config.act_mode == "dynamic" else [0]
    if not offs:
        raise ValueError("candidate_grid: exp_offsets must not be empty")
    cc, oo = np.meshgrid(np.asarray(clips, np.float32), np.asarray(offs, np.int32), indexing="ij")
    return cc.reshape(-1), oo.reshape(-1)


def _reference(rows, kernel, bias):
    y = mm(rows, jnp.asarray(kernel, jnp.float32))
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)
    return y


@functools.partial(jax.jit, static_argnames=("config",))
def candidate_errors(config: QLinearConfig, arrays: dict, rows, kernel, bias, clips, offsets, base):
    """Squared-error numerators ``[B, C]`` and reference energies ``[B]`` of every candidate on every bin.

    Args:
      config, arrays: one quantized layer (no leading L; the table entries of ``arrays`` are ignored).
      rows: raw input rows ``[B, n, K]``; kernel ``[K, N]`` / bias ``[N]``: the unquantized layer.
      clips, offsets: candidates ``[C]``; base: ``[B]`` static base scales (static mode) or None.
    """
    rows = jnp.asarray(rows, jnp.float32)

    def per_bin(x, bscale):
        y_ref = _reference(x, kernel, bias)

        def one(c_o):
            c, o = c_o
            scale = None if bscale is None else c * bscale
            y = qlinear_apply(config, arrays, x, c, o, scale, dtype=jnp.float32, mode="fake")
            return jnp.sum((y - y_ref) ** 2)

        return jax.lax.map(one, (clips, offsets)), jnp.sum(y_ref**2)

    if base is None:
        return jax.lax.map(lambda x: per_bin(x, None), rows)
    return jax.lax.map(lambda xb: per_bin(*xb), (rows, base))


def static_base_scale(config: QLinearConfig, xin_absmax) -> jax.Array:
    """Per-bin static scale at clip 1: ``max |x_in| / qmax`` from ``xin_absmax [B, K]`` (abs-max of what the matmul
    sees, i.e. after smoothing / rotation)."""
    qmax = float(INT_QMAX[config.a_fmt])
    return jnp.max(jnp.asarray(xin_absmax, jnp.float32), axis=-1) / qmax


def search_tables(
    config: QLinearConfig, arrays: dict, rows, kernel, bias, clips, exp_offsets, *, per_bin: bool = True, base=None
) -> tuple[dict, dict]:
    """Searches the activation tables of one layer.

    Returns ``(new_arrays, info)``: ``arrays`` with ``act_clip`` / ``act_exp_offset`` (and ``act_scale`` in static
    mode, ``clip * base``) replaced, and ``info = {"errors": [B, C] relative errors, "choice": [B] candidate index,
    "clips": [C], "exp_offsets": [C]}``.
    """
    nb = config.nbins
    rows = jnp.asarray(rows, jnp.float32)
    if rows.ndim != 3 or rows.shape[0] != nb or rows.shape[2] != config.in_features:
        raise ValueError(f"search_tables: rows must be [B={nb}, n, K={config.in_features}], got {tuple(rows.shape)}")
    if config.act_mode == "static" and base is None:
        raise ValueError("search_tables: static act_mode needs the per-bin base scales (static_base_scale)")
    cl, of = candidate_grid(config, clips, exp_offsets)
    num, den = candidate_errors(
        config,
        arrays,
        rows,
        kernel,
        bias,
        jnp.asarray(cl),
        jnp.asarray(of),
        None if config.act_mode == "dynamic" else jnp.asarray(base, jnp.float32),
    )
    tiny = jnp.finfo(jnp.float32).tiny
    rel = num / jnp.maximum(den, tiny)[:, None]
    if per_bin:
        choice = jnp.argmin(rel, axis=1)
    else:
        choice = jnp.broadcast_to(jnp.argmin(jnp.sum(num, 0) / jnp.maximum(jnp.sum(den), tiny)), (nb,))
    out = dict(arrays)
    out["act_clip"] = jnp.asarray(cl)[choice]
    out["act_exp_offset"] = jnp.asarray(of)[choice]
    if config.act_mode == "static":
        out["act_scale"] = out["act_clip"] * jnp.asarray(base, jnp.float32)
    return out, {"errors": rel, "choice": choice, "clips": cl, "exp_offsets": of}


@functools.partial(jax.jit, static_argnames=("config",))
def _sqnr_energies(config, arrays, rows, kernel, bias):
    def per_bin(xb):
        x, clip, off, sc = xb
        y_ref = _reference(x, kernel, bias)
        y = qlinear_apply(config, arrays, x, clip, off, sc, dtype=jnp.float32, mode="fake")
        return jnp.sum(y_ref**2), jnp.sum((y - y_ref) ** 2)

    scale = arrays.get("act_scale")
    return jax.lax.map(
        per_bin,
        (
            rows,
            arrays["act_clip"],
            arrays["act_exp_offset"],
            jnp.zeros_like(arrays["act_clip"]) if scale is None else scale,
        ),
    )


def layer_sqnr(config: QLinearConfig, arrays: dict, rows, kernel, bias) -> np.ndarray:
    """SQNR in dB per bin ``[B]``: ``10 log10(sum ||y_ref||^2 / sum ||y_q - y_ref||^2)`` on rows ``[B, n, K]``,
    each bin with its own table entries (fake mode, float32 operands)."""
    sig, err = _sqnr_energies(config, arrays, jnp.asarray(rows, jnp.float32), kernel, bias)
    return sqnr_db(sig, err)
