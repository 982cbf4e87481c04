"""Quantization number formats: pure, jit-friendly quantize / dequantize / pack / unpack.

Formats (all quantize along the LAST axis K; a weight is ``[N, K]``, an activation ``[M, K]``):

========== ============================ ================================== =====================================
fmt        element codes                scale                              function
========== ============================ ================================== =====================================
int4       int8 in [-7, 7]              f32 per channel or per group g     :func:`quantize_int4`
int8       int8 in [-127, 127]          f32 per channel (or group)         :func:`quantize_int8`
fp8_e4m3   float8_e4m3fn                f32 per tensor or per channel      :func:`quantize_fp8`
mxfp4      uint8 E2M1 codes 0..15       uint8 E8M0 per 32                  :func:`quantize_mxfp4`
nvfp4      uint8 E2M1 codes 0..15       float8_e4m3fn per 16 + f32 tensor  :func:`quantize_nvfp4`
========== ============================ ================================== =====================================

Every quantizer returns a :class:`QuantizedTensor` (a frozen dataclass registered as a pytree); :func:`dequantize`
inverts any of them; ``QuantizedTensor.pack()`` packs 4-bit codes two per byte in the kernels' layout
(:func:`pack_nibbles`). Non-finite input: ``nonfinite="raise"`` (default: ``ValueError`` eagerly, a run-time error
under jit) or ``"nan"`` (affected groups get NaN scales). See ``docs/formats.md`` for the full reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wanjax.quant.formats_checks import NONFINITE_POLICIES, check_choice
from wanjax.quant.formats_codecs import (
    E2M1_MAX,
    E2M1_VALUES,
    E8M0_NAN_CODE,
    FP8_E4M3_MAX,
    e2m1_decode,
    e2m1_encode,
    e8m0_decode,
    e8m0_encode,
    fp8_e4m3_encode,
    ldexp_exact,
)
from wanjax.quant.formats_fp4 import (
    MX_BLOCK_SIZE,
    MX_EXP_MAX,
    MX_EXP_MIN,
    MX_SCALE_RULES,
    NVFP4_BLOCK_SIZE,
    dequantize_mxfp4,
    dequantize_nvfp4,
    mx_shared_exponent,
    nvfp4_tensor_scale,
    quantize_mxfp4,
    quantize_nvfp4,
)
from wanjax.quant.formats_int import (
    dequantize_fp8,
    dequantize_int,
    quantize_fp8,
    quantize_int,
    quantize_int4,
    quantize_int8,
)
from wanjax.quant.formats_pack import pack_nibbles, unpack_nibbles
from wanjax.quant.formats_types import FORMATS, FOUR_BIT_FORMATS, QuantizedTensor

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "E8M0_NAN_CODE",
    "FORMATS",
    "FOUR_BIT_FORMATS",
    "FP8_E4M3_MAX",
    "MX_BLOCK_SIZE",
    "MX_EXP_MAX",
    "MX_EXP_MIN",
    "MX_SCALE_RULES",
    "NONFINITE_POLICIES",
    "NVFP4_BLOCK_SIZE",
    "QuantizedTensor",
    "dequantize",
    "dequantize_fp8",
    "dequantize_int",
    "dequantize_mxfp4",
    "dequantize_nvfp4",
    "e2m1_decode",
    "e2m1_encode",
    "e8m0_decode",
    "e8m0_encode",
    "fp8_e4m3_encode",
    "ldexp_exact",
    "mx_shared_exponent",
    "nvfp4_tensor_scale",
    "pack_nibbles",
    "quantize",
    "quantize_dequantize",
    "quantize_fp8",
    "quantize_int",
    "quantize_int4",
    "quantize_int8",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "unpack_nibbles",
]

_QUANTIZERS = {
    "int4": quantize_int4,
    "int8": quantize_int8,
    "fp8_e4m3": quantize_fp8,
    "mxfp4": quantize_mxfp4,
    "nvfp4": quantize_nvfp4,
}
_DEQUANTIZERS = {
    "int4": dequantize_int,
    "int8": dequantize_int,
    "fp8_e4m3": dequantize_fp8,
    "mxfp4": dequantize_mxfp4,
    "nvfp4": dequantize_nvfp4,
}


def quantize(x: jax.Array, fmt: str, **kwargs) -> QuantizedTensor:
  """Quantizes ``x`` to format ``fmt`` (one of ``FORMATS``); ``kwargs`` go to that format's quantizer."""
  check_choice("quantize", "fmt", fmt, FORMATS)
  return _QUANTIZERS[fmt](x, **kwargs)


def dequantize(q: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
  """Float values of any :class:`QuantizedTensor` (packed or not), cast to ``dtype`` (default float32)."""
  if not isinstance(q, QuantizedTensor):
    raise TypeError(f"dequantize: expected a QuantizedTensor, got {type(q).__name__}")
  check_choice("dequantize", "q.fmt", q.fmt, FORMATS)
  return _DEQUANTIZERS[q.fmt](q.unpack(), dtype)


def quantize_dequantize(x: jax.Array, fmt: str, dtype=None, **kwargs) -> jax.Array:
  """Fake quantization (QDQ): ``dequantize(quantize(x, fmt, **kwargs))`` in ``dtype`` (default: ``x.dtype``)."""
  x = jnp.asarray(x)
  return dequantize(quantize(x, fmt, **kwargs), x.dtype if dtype is None else dtype)
