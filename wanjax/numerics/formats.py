"""Number formats: pure, jit-friendly quantize / dequantize / pack / unpack (the public face of ``wanjax.numerics``).

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
(:func:`pack_nibbles`). The names, bit widths and qmax of the formats are in ``wanjax.numerics.table``. Non-finite
input: ``nonfinite="raise"`` (default: ``ValueError`` eagerly, a run-time error under jit) or ``"nan"`` (affected
groups get NaN scales). See ``docs/formats.md`` for the full reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wanjax.numerics.checks import NONFINITE_POLICIES, check_choice
from wanjax.numerics.codecs import (
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
from wanjax.numerics.fp4 import (
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
from wanjax.numerics.int_formats import (
    dequantize_fp8,
    dequantize_int,
    quantize_fp8,
    quantize_int,
    quantize_int4,
    quantize_int8,
)
from wanjax.numerics.pack import pack_nibbles, unpack_nibbles
from wanjax.numerics.table import FORMATS, FOUR_BIT_FORMATS
from wanjax.numerics.tensor import QuantizedTensor, dequantize

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


def quantize(x: jax.Array, fmt: str, **kwargs) -> QuantizedTensor:
    """Quantizes ``x`` to format ``fmt`` (one of ``FORMATS``); ``kwargs`` go to that format's quantizer."""
    check_choice("quantize", "fmt", fmt, FORMATS)
    return _QUANTIZERS[fmt](x, **kwargs)


def quantize_dequantize(x: jax.Array, fmt: str, dtype=None, **kwargs) -> jax.Array:
    """Fake quantization (QDQ): ``dequantize(quantize(x, fmt, **kwargs))`` in ``dtype`` (default: ``x.dtype``)."""
    x = jnp.asarray(x)
    return dequantize(quantize(x, fmt, **kwargs), x.dtype if dtype is None else dtype)
