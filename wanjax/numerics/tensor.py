"""``QuantizedTensor``: the pytree container every quantizer in ``wanjax.numerics.formats`` returns, and
:func:`dequantize`, the inverse of any of them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from wanjax.numerics.checks import check_choice
from wanjax.numerics.dequant import DEQUANTIZERS
from wanjax.numerics.pack import pack_nibbles, unpack_nibbles
from wanjax.numerics.table import FORMATS, FOUR_BIT_FORMATS

__all__ = ["FORMATS", "FOUR_BIT_FORMATS", "QuantizedTensor", "dequantize"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized array: per-element codes, per-group scales and (NVFP4 only) a per-tensor scale.

    Quantization always runs along the LAST axis (K): a weight ``[N, K]`` gets scales per output row (per channel) or
    per group of ``group_size`` consecutive K elements; an activation ``[M, K]`` gets them per token.

    Fields (array fields are pytree leaves; ``fmt``, ``group_size``, ``packed`` are static metadata):

    ``codes``
        ``int4``: int8 in [-7, 7]; ``int8``: int8 in [-127, 127]; ``fp8_e4m3``: float8_e4m3fn;
        ``mxfp4`` / ``nvfp4``: uint8 E2M1 codes 0..15. When ``packed`` is True (4-bit formats only): uint8
        ``[..., K/2]`` in the layout of ``wanjax.numerics.pack``.
    ``scales``
        shape ``x.shape[:-1] + (K // group_size,)`` (per channel: ``[..., 1]``), or ``()`` when ``group_size == 0``
        (per-tensor FP8). dtype: float32 for int4/int8/fp8_e4m3; uint8 E8M0 codes for mxfp4; float8_e4m3fn for nvfp4.
        ``x ~= codes_value * scale`` (nvfp4: ``* tensor_scale`` as well).
    ``tensor_scale``
        float32 scalar for nvfp4, ``None`` otherwise.
    ``fmt``
        one of ``FORMATS``.
    ``group_size``
        elements per scale along K (equal to K for per-channel scales; 0 for one scale for the whole tensor).
    ``packed``
        whether ``codes`` holds two 4-bit codes per byte.
    """

    codes: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array | None = dataclasses.field(default=None)
    fmt: str = dataclasses.field(default="int4", metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    packed: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape of the quantized array (unpacked)."""
        s = tuple(self.codes.shape)
        return s[:-1] + (s[-1] * 2,) if self.packed else s

    def pack(self) -> "QuantizedTensor":
        """Returns a copy whose 4-bit codes are packed two per byte (``uint8 [..., K/2]``); no-op if already packed."""
        if self.packed:
            return self
        if self.fmt not in FOUR_BIT_FORMATS:
            raise ValueError(f"QuantizedTensor.pack: only 4-bit formats {FOUR_BIT_FORMATS} pack, got fmt={self.fmt!r}")
        return dataclasses.replace(self, codes=pack_nibbles(self.codes), packed=True)

    def unpack(self) -> "QuantizedTensor":
        """Returns a copy with one code per element (inverse of :meth:`pack`); no-op if not packed."""
        if not self.packed:
            return self
        signed = self.fmt == "int4"
        return dataclasses.replace(self, codes=unpack_nibbles(self.codes, signed=signed), packed=False)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Float values of this tensor; see :func:`dequantize`."""
        return dequantize(self, dtype)


def dequantize(q: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
    """Float values of any :class:`QuantizedTensor` (packed or not), cast to ``dtype`` (default float32)."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize: expected a QuantizedTensor, got {type(q).__name__}")
    check_choice("dequantize", "q.fmt", q.fmt, FORMATS)
    return DEQUANTIZERS[q.fmt](q.unpack(), dtype)
