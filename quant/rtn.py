"""Round-to-nearest (RTN) weight quantization and the quantizer specs shared by the transforms.

Layout conventions (the same in every transform of ``wanjax.quant``):

* A Linear's params are a dict ``{"kernel": [K, N], "bias": [N], ...}`` with the kernel stored ``[in, out]`` as in
  ``wanjax/model/layers.py``. Transforms return a NEW dict (input never mutated) and keep keys they do not own.
* ``wanjax.numerics.formats`` quantizes along the LAST axis of ``[N, K]`` weights, i.e. per output channel / per group
  of consecutive input channels. So a kernel ``[K, N]`` is quantized as ``kernel.T`` and the resulting
  :class:`~wanjax.numerics.tensor.QuantizedTensor` (key ``"qweight"``) has codes ``[N, K]`` and scales
  ``[N, K // group_size]`` - the layout the kernels pack.
* After RTN / GPTQ, ``"kernel"`` holds the dequantized (fake-quantized) float32 weight ``[K, N]``, exactly
  ``dequantize(qweight).T``, so fake-quant forward passes and error measurements need nothing else.

Specs are frozen (hashable) dataclasses so they can be passed as static arguments to ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.numerics import formats
from wanjax.numerics.codecs import E2M1_MAX, e2m1_decode, e2m1_encode, ldexp_exact
from wanjax.numerics.table import FORMAT_TABLE, INT_FORMATS, INT_QMAX, LINEAR_FORMATS
from wanjax.numerics.two_level import TwoLevelInt4, check_scale_levels, quantize_int4_two_level, two_level_qdq

__all__ = [
    "ActQuantSpec",
    "WeightQuantSpec",
    "check_linear_params",
    "dequantize_kernel",
    "fake_quant_act",
    "fake_quant_kernel",
    "quantize_elements",
    "quantize_kernel",
    "rtn",
    "two_level_rows",
    "weight_scales",
]

_F32_TINY = float(jnp.finfo(jnp.float32).tiny)
_WEIGHT_FORMATS = LINEAR_FORMATS
_ACT_FORMATS = LINEAR_FORMATS
_DEFAULT_BLOCK = {f.name: f.block for f in FORMAT_TABLE.values() if f.kind == "fp4"}  # mxfp4 32, nvfp4 16


@dataclasses.dataclass(frozen=True)
class WeightQuantSpec:
    """How a weight is quantized (per output channel ``n``, along the input axis K).

    Attributes:
      fmt: ``"int4"`` (codes [-7, 7]), ``"int8"``, ``"mxfp4"`` (E2M1 + E8M0 per 32) or ``"nvfp4"`` (E2M1 + e4m3 per
        16 + f32 tensor scale).
      group_size: int formats: ``None`` = one scale per output channel, or a divisor of K (32/64/128). FP4 formats:
        the block size (``None`` -> 32 for mxfp4, 16 for nvfp4).
      clip: weight clip ratio multiplied into the group abs-max (the seed uses 1.0).
      scale_rule: mxfp4 only: ``"ocp_floor"`` (the seed's weight rule) or ``"safe_ceil"``.
      scale_levels: None (float32 group scales), or ``L`` in [1, 18] for two-level integer group scales (int4 with a
        ``group_size`` only; ``wanjax.numerics.two_level``): each group scale an integer multiple ``m <= L`` of one
        unit per output channel, so the carried int8 values ``q * m`` run on the per-channel int8 GEMM exactly.
    """

    fmt: str = "int4"
    group_size: int | None = None
    clip: float = 1.0
    scale_rule: str = "ocp_floor"
    scale_levels: int | None = None

    def __post_init__(self):
        if self.fmt not in _WEIGHT_FORMATS:
            raise ValueError(f"WeightQuantSpec: fmt must be one of {_WEIGHT_FORMATS}, got {self.fmt!r}")
        if self.fmt in _DEFAULT_BLOCK and self.group_size is None:
            object.__setattr__(self, "group_size", _DEFAULT_BLOCK[self.fmt])
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"WeightQuantSpec: group_size must be a positive int or None, got {self.group_size!r}")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"WeightQuantSpec: clip must be finite and > 0, got {self.clip!r}")
        if self.scale_rule not in formats.MX_SCALE_RULES:
            raise ValueError(
                f"WeightQuantSpec: scale_rule must be one of {formats.MX_SCALE_RULES}, got {self.scale_rule!r}"
            )
        _check_levels("WeightQuantSpec", self)

    def group(self, k: int) -> int:
        """Elements per scale along K for an input size ``k`` (``k`` itself for per-channel int scales)."""
        g = k if self.group_size is None else self.group_size
        if k % g:
            raise ValueError(f"WeightQuantSpec({self.fmt}): group_size={g} does not divide K={k}; expected K % g == 0")
        return g


@dataclasses.dataclass(frozen=True)
class ActQuantSpec:
    """How activations are quantized (along K of ``x [..., K]``): the one activation-quantizer description.

    Recipes hold one (``Recipe.act``), a quantized layer's config builds one from its ``a_*`` fields
    (``wanjax.quant.qlinear.QLinearConfig.act_spec``), and calibration's quantized-input Hessian uses one
    (``wanjax.quant.calibrate.mx_act_quant_transform``); all of them quantize through :meth:`qdq`.

    Dynamic (default): one scale per token (or per group / FP4 block) from the abs-max times ``clip``. Static (int
    formats, a layer with ``act_mode="static"``): :meth:`qdq` is given one calibrated scale per timestep bin
    (``static_scale``) instead. The per-bin tables of a quantized layer (clip, MX exponent offset, static scale) are
    passed to :meth:`qdq` at call time and may be traced; ``clip`` / ``exp_offset`` here are the defaults.

    Attributes:
      fmt: ``"int4"``, ``"int8"``, ``"mxfp4"`` or ``"nvfp4"``.
      group_size: int formats: ``None`` = one scale per token, or a group size; FP4: block size (default 32 / 16).
      clip: clip ratio (seed grid 0.6..1.0).
      scale_rule: mxfp4: ``"safe_ceil"`` (the seed's activation rule, default) or ``"ocp_floor"``.
      exp_offset: mxfp4 exponent offset delta (seed grid -1/0/+1).
      scale_levels: None, or ``L`` in [1, 18]: two-level integer group scales (int4 with a ``group_size`` only; one
        unit per token, an integer multiple ``m <= L`` of it per group; ``wanjax.numerics.two_level``). ``clip``
        multiplies the token's unit.
    """

    fmt: str = "int4"
    group_size: int | None = None
    clip: float = 1.0
    scale_rule: str = "safe_ceil"
    exp_offset: int = 0
    scale_levels: int | None = None

    def __post_init__(self):
        if self.fmt not in _ACT_FORMATS:
            raise ValueError(f"ActQuantSpec: fmt must be one of {_ACT_FORMATS}, got {self.fmt!r}")
        if self.fmt in _DEFAULT_BLOCK and self.group_size is None:
            object.__setattr__(self, "group_size", _DEFAULT_BLOCK[self.fmt])
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"ActQuantSpec: clip must be finite and > 0, got {self.clip!r}")
        if self.scale_rule not in formats.MX_SCALE_RULES:
            raise ValueError(
                f"ActQuantSpec: scale_rule must be one of {formats.MX_SCALE_RULES}, got {self.scale_rule!r}"
            )
        _check_levels("ActQuantSpec", self)

    def qdq(self, x: jax.Array, *, clip=None, exp_offset=None, static_scale=None, nonfinite: str = "nan") -> jax.Array:
        """Fake quantization ``dequantize(quantize(x))`` of ``x [..., K]`` (computed in ``x``'s dtype; callers pass
        float32).

        Args:
          clip: clip ratio (default ``self.clip``); may be traced (a bin's table entry).
          exp_offset: mxfp4 exponent offset (default ``self.exp_offset``); may be traced. Ignored by other formats.
          static_scale: a static activation scale (int formats): ``clip(round(x / s), -qmax, qmax) * s`` with ``s``
            replaced by 1 where it is not > 0, the kernels' static rule (``kernels/reference.py``); ``clip`` is then
            unused. None: the dynamic rule of ``wanjax.numerics.formats``.
          nonfinite: the formats' non-finite policy (``"nan"``: no check, NaN groups stay NaN).
        """
        clip = self.clip if clip is None else clip
        if static_scale is not None:
            if self.fmt not in INT_FORMATS:
                raise ValueError(f"ActQuantSpec.qdq: a static scale needs an int format, got {self.fmt!r}")
            qmax = float(INT_QMAX[self.fmt])
            s = jnp.asarray(static_scale, jnp.float32)
            s = jnp.where(s > 0, s, jnp.float32(1.0))
            return jnp.clip(jnp.round(x / s), -qmax, qmax) * s
        if self.scale_levels is not None:
            return two_level_qdq(x, self.group_size, self.scale_levels, clip=clip, nonfinite=nonfinite)
        if self.fmt in INT_FORMATS:
            return formats.quantize_dequantize(x, self.fmt, group_size=self.group_size, clip=clip, nonfinite=nonfinite)
        if self.fmt == "mxfp4":
            return formats.quantize_dequantize(
                x,
                "mxfp4",
                scale_rule=self.scale_rule,
                exp_offset=self.exp_offset if exp_offset is None else exp_offset,
                clip=clip,
                block_size=self.group_size,
                nonfinite=nonfinite,
            )
        return formats.quantize_dequantize(x, "nvfp4", clip=clip, block_size=self.group_size, nonfinite=nonfinite)


def _check_levels(owner: str, spec) -> None:
    """``scale_levels`` of a weight / activation spec: None, or an int in [1, 18] with int4 and a group size."""
    if spec.scale_levels is None:
        return
    check_scale_levels(owner, spec.scale_levels)
    if spec.fmt != "int4" or spec.group_size is None:
        raise ValueError(
            f"{owner}: scale_levels (two-level integer group scales) needs fmt='int4' with a group_size, got "
            f"fmt={spec.fmt!r}, group_size={spec.group_size!r}"
        )


def check_linear_params(fn: str, params) -> tuple[int, int]:
    """Validates a Linear params dict and returns ``(K, N)``; raises ``ValueError`` naming ``fn`` and the problem."""
    if not isinstance(params, dict) or "kernel" not in params:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{fn}: expected a Linear params dict with key 'kernel' [K, N], got {got}")
    kernel = params["kernel"]
    if kernel.ndim != 2:
        raise ValueError(
            f"{fn}: params['kernel'] must be [K, N] (use jax.vmap for stacked [L, K, N] kernels), got shape "
            f"{tuple(kernel.shape)}"
        )
    k, n = kernel.shape
    bias = params.get("bias")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(
            f"{fn}: params['bias'] must have shape ({n},) to match kernel {tuple(kernel.shape)}, got "
            f"{tuple(bias.shape)}"
        )
    return int(k), int(n)


def check_finite_eager(fn: str, name: str, x) -> None:
    """Raises ``ValueError`` if concrete ``x`` holds inf/NaN; traced values are not checked (documented policy)."""
    if isinstance(x, jax.core.Tracer):
        return
    arr = np.asarray(jax.device_get(x), dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad.reshape(-1))), arr.shape)
        raise ValueError(
            f"{fn}: {name} of shape {arr.shape} has {int(bad.sum())} non-finite value(s), first at "
            f"{tuple(int(i) for i in first)}; expected all finite"
        )


def _quantize_rows(w_nk: jax.Array, spec: WeightQuantSpec, tensor_scale=None):
    """formats quantizer for ``[N, K]`` rows (non-finite policy "nan": finiteness is checked once at API entry)."""
    g = spec.group(w_nk.shape[-1])
    if spec.scale_levels is not None:
        return two_level_rows(w_nk, spec).as_quantized_tensor()
    if spec.fmt in INT_FORMATS:
        return formats.quantize_int(
            w_nk, FORMAT_TABLE[spec.fmt].bits, group_size=spec.group_size, clip=spec.clip, nonfinite="nan"
        )
    if spec.fmt == "mxfp4":
        return formats.quantize_mxfp4(w_nk, scale_rule=spec.scale_rule, clip=spec.clip, block_size=g, nonfinite="nan")
    return formats.quantize_nvfp4(w_nk, tensor_scale=tensor_scale, clip=spec.clip, block_size=g, nonfinite="nan")


def two_level_rows(w_nk: jax.Array, spec: WeightQuantSpec, clip=None) -> TwoLevelInt4:
    """Two-level INT4 of ``w_nk [N, K]`` (a spec with ``scale_levels``): codes, multipliers and the row units.
    ``clip`` (default ``spec.clip``; scalar or ``[N, 1]``, may be traced) multiplies each row's unit."""
    if spec.scale_levels is None:
        raise ValueError(f"two_level_rows: the spec has no scale_levels (fmt {spec.fmt}, group {spec.group_size})")
    g = spec.group(w_nk.shape[-1])
    clip = spec.clip if clip is None else clip
    return quantize_int4_two_level(w_nk, g, spec.scale_levels, clip=clip, nonfinite="nan")


def weight_scales(w_nk: jax.Array, spec: WeightQuantSpec, tensor_scale=None) -> tuple[jax.Array, jax.Array | None]:
    """Format-native scales of ``w_nk [N, K]`` exactly as ``wanjax.numerics.formats`` computes them.

    Returns ``(scales [N, K // g], tensor_scale)``: float32 for int formats, uint8 E8M0 codes for mxfp4, float8_e4m3fn
    for nvfp4 (with the float32 tensor scale; ``tensor_scale`` fixes it instead of deriving it from ``w_nk``).
    """
    qt = _quantize_rows(w_nk, spec, tensor_scale)
    return qt.scales, qt.tensor_scale


def quantize_elements(x: jax.Array, scales: jax.Array, tensor_scale, spec: WeightQuantSpec):
    """Quantizes ``x`` element-wise with given format-native ``scales`` (broadcast against ``x``).

    Reproduces the element rule of ``wanjax.numerics.formats`` bit for bit (reciprocal-multiply for int / nvfp4,
    exact power-of-two shift for mxfp4), so RTN with scales from :func:`weight_scales` equals ``formats.quantize``.

    Returns ``(codes, dequantized float32)``: int8 codes for int formats, uint8 E2M1 codes for FP4 formats.
    """
    x = jnp.asarray(x, jnp.float32)
    if spec.fmt in INT_FORMATS:
        qmax = float(INT_QMAX[spec.fmt])
        s = jnp.asarray(scales, jnp.float32)
        q = jnp.clip(jnp.round(x * (1.0 / s)), -qmax, qmax)
        return q.astype(jnp.int8), q * s
    if spec.fmt == "mxfp4":
        e = jnp.asarray(scales).astype(jnp.int32) - 127
        codes = e2m1_encode(jnp.clip(ldexp_exact(x, -e), -E2M1_MAX, E2M1_MAX))
        return codes, ldexp_exact(e2m1_decode(codes), e)
    eff = jnp.asarray(scales).astype(jnp.float32) * tensor_scale
    codes = e2m1_encode(jnp.clip(x * (1.0 / jnp.maximum(eff, _F32_TINY)), -E2M1_MAX, E2M1_MAX))
    return codes, e2m1_decode(codes) * eff


def quantize_kernel(kernel: jax.Array, spec: WeightQuantSpec) -> formats.QuantizedTensor:
    """RTN of a kernel ``[K, N]``: the :class:`QuantizedTensor` of ``kernel.T`` (codes ``[N, K]``)."""
    return _quantize_rows(jnp.asarray(kernel, jnp.float32).T, spec)


def dequantize_kernel(qweight: formats.QuantizedTensor) -> jax.Array:
    """Float32 kernel ``[K, N]`` of a quantized weight whose codes are ``[N, K]``."""
    return formats.dequantize(qweight, jnp.float32).T


def fake_quant_kernel(kernel: jax.Array, spec: WeightQuantSpec) -> jax.Array:
    """``dequantize(quantize(kernel))`` for a ``[K, N]`` kernel (RTN), float32."""
    return dequantize_kernel(quantize_kernel(kernel, spec))


def fake_quant_act(x: jax.Array, spec: ActQuantSpec | None) -> jax.Array:
    """Dynamic per-token fake quantization of activations ``x [..., K]`` (float32); ``spec=None`` returns ``x``."""
    x = jnp.asarray(x, jnp.float32)
    return x if spec is None else spec.qdq(x)


def rtn(params: dict, spec: WeightQuantSpec) -> dict:
    """Round-to-nearest weight quantization of one Linear.

    Args:
      params: ``{"kernel": [K, N], "bias": [N], ...}`` (use ``jax.vmap`` for stacked ``[L, K, N]``).
      spec: the weight quantizer.

    Returns:
      A new dict: ``"qweight"`` (QuantizedTensor, codes ``[N, K]``), ``"kernel"`` = its dequantized float32 ``[K, N]``,
      other keys unchanged; with two-level scales (``spec.scale_levels``) also ``"qunit"``: the row units f32 ``[N]``
      (``qweight.scales`` are then ``f32(m * unit)``). Raises ``ValueError`` for a non-finite kernel (checked when
      called eagerly).
    """
    check_linear_params("rtn", params)
    check_finite_eager("rtn", "params['kernel']", params["kernel"])
    kernel, qt, unit = _rtn_core(jnp.asarray(params["kernel"], jnp.float32), spec)
    out = {**params, "kernel": kernel, "qweight": qt}
    if unit is not None:
        out["qunit"] = unit
    return out


@functools.partial(jax.jit, static_argnums=1)
def _rtn_core(kernel, spec):
    if spec.scale_levels is not None:
        tl = two_level_rows(kernel.T, spec)
        qt = tl.as_quantized_tensor()
        return dequantize_kernel(qt), qt, tl.unit[:, 0]
    qt = quantize_kernel(kernel, spec)
    return dequantize_kernel(qt), qt, None
