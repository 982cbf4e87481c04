"""GPTQ: Hessian-aware column-by-column weight quantization with error feedback (Frantar et al., 2022).

For a kernel ``W [K, N]`` (row ``k`` = input channel ``k``; the torch reference's column ``k``) and a Hessian
``H = sum X^T X [K, K]`` of the layer inputs, input channels are quantized one at a time; the error of channel ``i``
is spread over the not-yet-quantized channels through the upper Cholesky factor ``U`` of ``(H + lambda I)^-1``::

    q_i = Q(w_i);   e_i = (w_i - q_i) / U_ii;   w_j -= U_ij e_i  (j > i)

with lazy batch updates over blocks of ``block_size`` (128) channels. Settings follow the seed
(arXiv 2605.27003 code, see ``shared/reference/seed_method_w4a4_wan22.md``): damping 0.01 * mean(diag H) with up to
6 retries at 10x more, dead channels (diag 0) zeroed, block 128, no act-order, scales fixed before the pass.
Options beyond the seed: ``act_order`` (channels by descending diag H), ``static_groups=False`` (re-estimate each
group's scale from the already-updated weights when the pass reaches it, as the GPTQ reference does).

Numerics: the column loop runs in float32 with ``Precision.HIGHEST`` matmuls; the Cholesky work in
``linalg_dtype`` (see ``wanjax.quant.linalg``: float64 under x64 mode, else float32). The result's codes are
produced with exactly the element rule of ``wanjax.numerics.formats`` and the returned dequantized kernel equals
``dequantize(qweight).T`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from wanjax.numerics.table import INT_FORMATS
from wanjax.numerics.tensor import QuantizedTensor
from wanjax.quant.linalg import gptq_inverse_factor, mm, resolve_linalg_dtype
from wanjax.quant.rtn import (
    WeightQuantSpec,
    check_finite_eager,
    check_linear_params,
    quantize_elements,
    two_level_rows,
    weight_scales,
)

__all__ = ["gptq", "gptq_quantize_kernel"]


#: the clip search's error measures (``gptq_quantize_kernel(weight_clip_metric=...)``)
WEIGHT_CLIP_METRICS = ("diag", "hessian")


def _check_args(fn, k, spec, block_size, act_order, static_groups, hessian):
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{fn}: hessian must be [K, K] = ({k}, {k}) to match the kernel, got {tuple(hessian.shape)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{fn}: block_size must be a positive int, got {block_size!r}")
    g = spec.group(k)
    dynamic = (not static_groups) and g < k
    b = min(block_size, k)
    if dynamic and spec.scale_levels is not None:
        raise ValueError(
            f"{fn}: two-level group scales (scale_levels={spec.scale_levels}) need static_groups=True: the row unit "
            "comes from the whole row, fixed before the pass"
        )
    if dynamic and act_order:
        raise ValueError(
            f"{fn}: act_order=True needs static_groups=True when scales are per group (g={g}): "
            "re-estimated groups would follow the permuted order and stop being contiguous in K"
        )
    if dynamic and b % g:
        raise ValueError(
            f"{fn}: static_groups=False needs the group size to divide the block: block={b}, group={g}; "
            "use a block_size that is a multiple of the group size, or static_groups=True"
        )
    return g, dynamic, b


def gptq_quantize_kernel(
    kernel: jax.Array,
    hessian: jax.Array,
    spec: WeightQuantSpec,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
    weight_clips: tuple[float, ...] = (),
    weight_clip_metric: str = "diag",
    max_damp_tries: int = 6,
    linalg_dtype=None,
) -> tuple[QuantizedTensor, jax.Array, dict]:
    """GPTQ of one kernel ``[K, N]`` with Hessian ``[K, K]``.

    Args:
      kernel: float ``[K, N]`` (``[in, out]``).
      hessian: ``X^T X`` (sum or mean) of the inputs the quantized layer will see, ``[K, K]``.
      spec: weight quantizer (int4 / int8 per channel or per group, mxfp4, nvfp4).
      block_size: lazy-batch block (128). K need not be a multiple: the last block is padded internally.
      percdamp: damping fraction of mean(diag H).
      act_order: process input channels by descending ``diag(H)`` (results are returned in the original order).
      static_groups: True (seed): all scales computed from the un-updated weights before the pass. False: each
        group's scales are computed from the already-updated weights when the pass reaches the group (group must
        divide the block; not combinable with act_order). Per-channel scales are always computed up front.
      weight_clips: shrink factors (e.g. ``(1.0, 0.95, ..., 0.75)``) searched per output channel before the pass
        (int formats with per-channel scales, or two-level group scales): each channel's scale is the spec's scale
        (``spec.clip * absmax / qmax``) times the factor with the least ``diag(H)``-weighted round-to-nearest error
        ``sum_k H_kk (w_kn - Q(w_kn))^2``. Empty: the spec's scale as is. With two-level scales the factor
        multiplies the channel's unit and its group multipliers are chosen again for that unit.
      weight_clip_metric: the error the clip search minimizes per channel: ``"diag"`` (above) or ``"hessian"``, the
        full quadratic form ``d^T H d`` with ``d = w_n - Q(w_n)`` (the layer's output error of round-to-nearest on
        the calibration inputs, correlations between input channels included; K^2 N work per clip).
      max_damp_tries: Cholesky retries with 10x damping each.
      linalg_dtype: dtype of the Cholesky work (see ``wanjax.quant.linalg``).

    Returns:
      ``(qweight, kernel_q, info)``: ``qweight`` a QuantizedTensor with codes ``[N, K]``; ``kernel_q`` its dequantized
      float32 ``[K, N]``; ``info = {"damp_tries": int32}``, plus ``"unit"`` (f32 ``[N]``, the row units; the
      scales are ``f32(m * unit)``) for two-level scales (``spec.scale_levels``; static groups only).
    """
    fn = "gptq"
    w = jnp.asarray(kernel, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"{fn}: kernel must be [K, N] (vmap for stacked kernels), got shape {tuple(w.shape)}")
    h = jnp.asarray(hessian)
    _check_args(fn, w.shape[0], spec, block_size, act_order, static_groups, h)
    weight_clips = tuple(float(c) for c in weight_clips)
    per_channel = spec.group(w.shape[0]) == w.shape[0]
    if weight_clips and (spec.fmt not in INT_FORMATS or not (per_channel or spec.scale_levels is not None)):
        raise ValueError(
            f"{fn}: weight_clips needs int4/int8 weights with per-channel scales or two-level group scales "
            f"(scale_levels), got {spec.fmt} group {spec.group(w.shape[0])} (K={w.shape[0]})"
        )
    if any(not 0.0 < c <= 1.0 for c in weight_clips):
        raise ValueError(f"{fn}: weight_clips must lie in (0, 1], got {weight_clips}")
    if weight_clip_metric not in WEIGHT_CLIP_METRICS:
        raise ValueError(f"{fn}: weight_clip_metric must be one of {WEIGHT_CLIP_METRICS}, got {weight_clip_metric!r}")
    check_finite_eager(fn, "kernel", w)
    check_finite_eager(fn, "hessian", h)
    return _gptq_core(
        w,
        h,
        spec=spec,
        block_size=block_size,
        percdamp=float(percdamp),
        act_order=bool(act_order),
        static_groups=bool(static_groups),
        weight_clips=weight_clips,
        weight_clip_metric=str(weight_clip_metric),
        max_damp_tries=int(max_damp_tries),
        linalg_dtype=jnp.dtype(resolve_linalg_dtype(linalg_dtype)),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "spec",
        "block_size",
        "percdamp",
        "act_order",
        "static_groups",
        "weight_clips",
        "weight_clip_metric",
        "max_damp_tries",
        "linalg_dtype",
    ),
)
def _gptq_core(
    w,
    h,
    *,
    spec,
    block_size,
    percdamp,
    act_order,
    static_groups,
    max_damp_tries,
    linalg_dtype,
    weight_clips=(),
    weight_clip_metric="diag",
):
    """The GPTQ pass (arguments validated by :func:`gptq_quantize_kernel`); jitted so eager calls compile once."""
    k, n = w.shape
    g, dynamic, b = _check_args("gptq", k, spec, block_size, act_order, static_groups, h)

    # Scales from the un-updated weights (before dead-channel zeroing, as the GPTQ reference).
    unit0 = None
    if spec.scale_levels is not None:
        scales0, unit0, ts = *_two_level_scales(w, h, spec, weight_clips, weight_clip_metric), None
    else:
        scales0, ts = weight_scales(w.T, spec)
        if weight_clips:
            scales0 = _searched_channel_scales(w, scales0, h, spec, weight_clips, weight_clip_metric)
    dead = jnp.diagonal(h) <= 0
    w = jnp.where(dead[:, None], 0.0, w)
    if act_order:
        diag = jnp.where(dead, 1.0, jnp.diagonal(h).astype(jnp.float32))
        perm = jnp.argsort(-diag, stable=True)
        w = w[perm]
        h = h[perm][:, perm]
    else:
        perm = None
    u, _, tries = gptq_inverse_factor(h, percdamp, max_damp_tries, linalg_dtype)
    u = u.astype(jnp.float32)

    kp = -(-k // b) * b
    pad = kp - k
    w = jnp.pad(w, ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad)))
    if pad:
        tail = jnp.arange(k, kp)
        u = u.at[tail, tail].set(1.0)
    # Per-channel scale table [K, N] for the static mode (rows follow the processing order).
    col_scales = jnp.repeat(scales0.T, g, axis=0)
    if perm is not None:
        col_scales = col_scales[perm]
    col_scales = jnp.pad(col_scales, ((0, pad), (0, 0)), mode="edge")

    sub = g if dynamic else b  # columns per scale refresh inside a block
    group_spec = dataclasses.replace(spec, group_size=g) if dynamic else spec
    n_blocks = kp // b
    code_dtype = jnp.int8 if spec.fmt in INT_FORMATS else jnp.uint8

    def block_body(bi, carry):
        w, q_all, c_all, s_all = carry
        i1 = bi * b
        w1 = jax.lax.dynamic_slice(w, (i1, 0), (b, n))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (b, b))

        def group_body(gj, gcarry):
            w1, q1, c1, e1, s_all = gcarry
            j0 = gj * sub
            if dynamic:
                wg = jax.lax.dynamic_slice(w1, (j0, 0), (sub, n))
                sg, _ = weight_scales(wg.T, group_spec, tensor_scale=ts)  # [N, 1]
                s_all = jax.lax.dynamic_update_slice(s_all, sg.astype(s_all.dtype), (0, (i1 + j0) // g))
                s_rows = sg[:, 0]

            def col_body(t, ccarry):
                w1, q1, c1, e1 = ccarry
                i = j0 + t
                wi = jax.lax.dynamic_index_in_dim(w1, i, 0, keepdims=False)
                si = s_rows if dynamic else jax.lax.dynamic_index_in_dim(col_scales, i1 + i, 0, keepdims=False)
                ci, qi = quantize_elements(wi, si, ts, spec)
                urow = jax.lax.dynamic_index_in_dim(u1, i, 0, keepdims=False)
                err = (wi - qi) / urow[i]
                w1 = w1 - urow[:, None] * err[None, :]  # U is upper triangular: rows < i are untouched
                q1 = jax.lax.dynamic_update_index_in_dim(q1, qi, i, 0)
                c1 = jax.lax.dynamic_update_index_in_dim(c1, ci.astype(code_dtype), i, 0)
                e1 = jax.lax.dynamic_update_index_in_dim(e1, err, i, 0)
                return w1, q1, c1, e1

            w1, q1, c1, e1 = jax.lax.fori_loop(0, sub, col_body, (w1, q1, c1, e1))
            return w1, q1, c1, e1, s_all

        zeros = jnp.zeros((b, n), jnp.float32)
        init = (w1, zeros, jnp.zeros((b, n), code_dtype), zeros, s_all)
        _, q1, c1, e1, s_all = jax.lax.fori_loop(0, b // sub, group_body, init)
        # Lazy update of all later channels; rows < i1 get 0 (U upper triangular), rows of this block are done.
        u_rows = jax.lax.dynamic_slice(u, (i1, 0), (b, kp))
        w = w - mm(u_rows.T, e1)
        q_all = jax.lax.dynamic_update_slice(q_all, q1, (i1, 0))
        c_all = jax.lax.dynamic_update_slice(c_all, c1, (i1, 0))
        return w, q_all, c_all, s_all

    s_init = jnp.pad(scales0, ((0, 0), (0, pad // g if dynamic else 0)), mode="edge")
    init = (w, jnp.zeros((kp, n), jnp.float32), jnp.zeros((kp, n), code_dtype), s_init)
    _, q, codes, s_all = jax.lax.fori_loop(0, n_blocks, block_body, init)
    q, codes = q[:k], codes[:k]
    if perm is not None:
        inv = jnp.argsort(perm)
        q, codes = q[inv], codes[inv]
    scales = s_all[:, : k // g] if dynamic else scales0
    qt = QuantizedTensor(codes=codes.T, scales=scales, tensor_scale=ts, fmt=spec.fmt, group_size=g)
    info = {"damp_tries": tries}
    if unit0 is not None:
        info["unit"] = unit0[:, 0]
    return qt, q, info


def _rtn_error(w, q, h, metric):
    """Per output channel ``[N]``: the RTN error of ``q`` against ``w`` (both ``[K, N]``) by ``metric``."""
    d = w - q
    if metric == "hessian":
        return jnp.sum(d * jnp.dot(h, d, precision=jax.lax.Precision.HIGHEST), axis=0)
    return jnp.sum(jnp.maximum(jnp.diagonal(h), 0.0)[:, None] * d**2, axis=0)


def _two_level_scales(w, h, spec, clips, metric):
    """Two-level group scales ``[N, K/g]`` and row units ``[N, 1]`` of ``w [K, N]``: the spec's, or (``clips``) per
    output channel those of the clip factor (multiplying the unit; multipliers chosen again) with the least RTN
    error by ``metric``; ties go to the first clip."""
    k = w.shape[0]
    g = spec.group(k)
    if not clips:
        tl = two_level_rows(w.T, spec)
        return tl.scales, tl.unit
    h = h.astype(jnp.float32)
    cands = [two_level_rows(w.T, spec, clip=spec.clip * c) for c in clips]
    errs = []
    for tl in cands:
        _, q = quantize_elements(w, jnp.repeat(tl.scales.T, g, axis=0), None, spec)  # [K, N]
        errs.append(_rtn_error(w, q, h, metric))
    best = jnp.argmin(jnp.stack(errs), axis=0)  # [N]
    scales = jnp.stack([tl.scales for tl in cands])  # [C, N, G]
    units = jnp.stack([tl.unit for tl in cands])  # [C, N, 1]
    rows = jnp.arange(w.shape[1])
    return scales[best, rows], units[best, rows]


def _searched_channel_scales(w, scales0, h, spec, clips, metric="diag"):
    """Per output channel, the abs-max scale times the clip of ``clips`` with the least RTN error (``w [K, N]``,
    ``scales0 [N, 1]``, ``h [K, K]``): ``metric="diag"`` the ``diag(h)``-weighted squared error, ``"hessian"`` the
    quadratic form ``d^T h d``; ties go to the first clip in ``clips``."""
    h = h.astype(jnp.float32)
    weight = jnp.maximum(jnp.diagonal(h), 0.0)[:, None]
    errs = []
    for c in clips:
        s = scales0 * c  # [N, 1]
        _, q = quantize_elements(w, s.T, None, spec)  # [K, N]
        d = w - q
        if metric == "hessian":
            errs.append(jnp.sum(d * jnp.dot(h, d, precision=jax.lax.Precision.HIGHEST), axis=0))  # [N]
        else:
            errs.append(jnp.sum(weight * d**2, axis=0))  # [N]
    best = jnp.argmin(jnp.stack(errs), axis=0)  # [N]
    factors = jnp.asarray(clips, jnp.float32)[best]
    return (scales0 * factors[:, None]).astype(scales0.dtype)


def gptq(
    params: dict,
    hessian: jax.Array,
    spec: WeightQuantSpec,
    **kwargs,
) -> dict:
    """GPTQ transform of one Linear: ``params, H -> new params``.

    Args:
      params: ``{"kernel": [K, N], "bias": [N], ...}``; use ``jax.vmap`` over stacked ``[L, K, N]`` kernels (and
        ``[L, K, K]`` Hessians). The kernel is whatever the quantized matmul sees (e.g. the smoothed low-rank residual).
      hessian: ``[K, K]`` Hessian of the inputs of that matmul (build with ``wanjax.quant.linalg.hessian_from_rows``;
        transform it alongside smoothing / rotation).
      spec: weight quantizer.
      **kwargs: see :func:`gptq_quantize_kernel` (block_size, percdamp, act_order, static_groups, ...).

    Returns:
      New dict with ``"qweight"`` (QuantizedTensor, codes ``[N, K]``) and ``"kernel"`` = its dequantized float32
      ``[K, N]``, with two-level scales also ``"qunit"`` (f32 ``[N]``, the row units); other keys unchanged.
    """
    check_linear_params("gptq", params)
    qt, kq, info = gptq_quantize_kernel(params["kernel"], hessian, spec, **kwargs)
    out = {**params, "kernel": kq, "qweight": qt}
    if "unit" in info:
        out["qunit"] = info["unit"]
    return out
