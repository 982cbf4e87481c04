"""The format table: every number format's name, code width, largest code magnitude and default scale block.

This is the one place that lists the formats; the quantizers (``wanjax.numerics.formats``), the kernels' references
(``wanjax.kernels.reference``) and the quantization specs (``wanjax.quant.rtn``, ``wanjax.quant.qlinear``) read their
names and constants from here.

========== ==== ======== ============ =======================================================
fmt        bits qmax     block        codes
========== ==== ======== ============ =======================================================
int4       4    7        per channel  int8 in [-7, 7] (two's complement nibbles when packed)
int8       8    127      per channel  int8 in [-127, 127]
fp8_e4m3   8    448      per channel  float8_e4m3fn (448: largest finite e4m3)
mxfp4      4    6        32           uint8 E2M1 codes 0..15, E8M0 scale per block
nvfp4      4    6        16           uint8 E2M1 codes 0..15, e4m3 scale per block + f32 tensor scale
========== ==== ======== ============ =======================================================
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "E2M1_MAX",
    "FORMATS",
    "FORMAT_TABLE",
    "FOUR_BIT_FORMATS",
    "FP8_E4M3_MAX",
    "FormatInfo",
    "INT4_QMAX",
    "INT8_QMAX",
    "INT_FORMATS",
    "INT_QMAX",
    "LINEAR_FORMATS",
    "MX_BLOCK_SIZE",
    "MX_SCALE_RULES",
    "NVFP4_BLOCK_SIZE",
    "default_block",
]


@dataclasses.dataclass(frozen=True)
class FormatInfo:
    """One row of the format table.

    Attributes:
      name: the format name (``QuantizedTensor.fmt``).
      bits: bits per element code.
      qmax: largest code magnitude (int formats) or largest element value (FP formats).
      block: default elements per scale along K (None: one scale per channel / token).
      kind: ``"int"``, ``"fp8"`` or ``"fp4"``.
    """

    name: str
    bits: int
    qmax: float
    block: int | None
    kind: str


#: Symmetric int4 grid [-7, 7] (-8 unused).
INT4_QMAX = 7
#: Symmetric int8 grid [-127, 127] (-128 unused).
INT8_QMAX = 127
#: Largest E2M1 (FP4) magnitude.
E2M1_MAX = 6.0
#: Largest finite float8_e4m3fn magnitude.
FP8_E4M3_MAX = 448.0
#: OCP MXFP4 block: one E8M0 scale per 32 elements.
MX_BLOCK_SIZE = 32
#: NVFP4 block: one e4m3 scale per 16 elements.
NVFP4_BLOCK_SIZE = 16
#: MX shared-exponent rules of the seed (arXiv 2605.27003 code): weights use ocp_floor, activations safe_ceil.
MX_SCALE_RULES = ("ocp_floor", "safe_ceil")

FORMAT_TABLE: dict[str, FormatInfo] = {
    "int4": FormatInfo("int4", 4, INT4_QMAX, None, "int"),
    "int8": FormatInfo("int8", 8, INT8_QMAX, None, "int"),
    "fp8_e4m3": FormatInfo("fp8_e4m3", 8, FP8_E4M3_MAX, None, "fp8"),
    "mxfp4": FormatInfo("mxfp4", 4, E2M1_MAX, MX_BLOCK_SIZE, "fp4"),
    "nvfp4": FormatInfo("nvfp4", 4, E2M1_MAX, NVFP4_BLOCK_SIZE, "fp4"),
}

#: Format names, the values of ``QuantizedTensor.fmt``.
FORMATS = tuple(FORMAT_TABLE)
#: Formats whose codes can be packed two per byte.
FOUR_BIT_FORMATS = tuple(f.name for f in FORMAT_TABLE.values() if f.bits == 4)
#: Symmetric integer formats.
INT_FORMATS = tuple(f.name for f in FORMAT_TABLE.values() if f.kind == "int")
#: Formats of a quantized linear's weights and activations (FP8 is a kernel operand, not a layer format).
LINEAR_FORMATS = ("int4", "int8", "mxfp4", "nvfp4")
#: Largest code magnitude of the integer formats (ints; ``float(...)`` where a float constant is wanted).
INT_QMAX = {f.name: f.qmax for f in FORMAT_TABLE.values() if f.kind == "int"}


def default_block(fmt: str) -> int | None:
    """The default scale block of ``fmt`` along K (32 mxfp4, 16 nvfp4; None for per-channel formats)."""
    return FORMAT_TABLE[fmt].block
