"""Element codecs shared by the quantization formats: E2M1 (FP4), E8M0 (MX scale), FP8 e4m3, exact powers of two.

All functions are pure ``jnp`` and jit-friendly. Nothing here knows about groups or scales; see
``wanjax.numerics.formats`` for the formats built on top of these codecs.

E2M1 codes (OCP MX v1.0, 4 bits): bit 3 = sign, bits 2-1 = exponent (bias 1), bit 0 = mantissa.
Code ``c`` and ``c | 8`` are the positive / negative value of the magnitude index ``c & 7``::

    magnitude index  0    1    2    3    4    5    6    7
    value            0.0  0.5  1.0  1.5  2.0  3.0  4.0  6.0

The magnitude index is monotone in the value, so encoding is "count the thresholds passed".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.numerics.table import E2M1_MAX, FP8_E4M3_MAX

__all__ = [
    "E2M1_MAX",
    "E2M1_THRESHOLDS",
    "E2M1_VALUES",
    "E8M0_NAN_CODE",
    "FP8_E4M3_MAX",
    "e2m1_decode",
    "e2m1_encode",
    "e8m0_decode",
    "e8m0_encode",
    "exp2_int",
    "floor_log2",
    "fp8_e4m3_encode",
    "ldexp_exact",
]

#: Value of each of the 16 E2M1 codes (index = code). Codes 0 and 8 are +0 and -0.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
#: E8M0 code reserved for NaN (OCP MX).
E8M0_NAN_CODE = 255

# Midpoints between consecutive E2M1 magnitudes, with the direction a tie goes (round half to even code):
# a tie goes UP when the upper neighbour has an even magnitude index (mantissa bit 0), else DOWN.
#   0.25: 0 | 0.5  -> tie to 0   (index 0, even)        strict  '>'
#   0.75: 0.5 | 1  -> tie to 1   (index 2, even)        '>='
#   1.25: 1 | 1.5  -> tie to 1   (index 2)              '>'
#   1.75: 1.5 | 2  -> tie to 2   (index 4)              '>='
#   2.5 : 2 | 3    -> tie to 2   (index 4)              '>'
#   3.5 : 3 | 4    -> tie to 4   (index 6)              '>='
#   5.0 : 4 | 6    -> tie to 4   (index 6)              '>'
E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_encode(y: jax.Array) -> jax.Array:
    """Rounds ``y`` to the nearest E2M1 value (ties to even code, saturating at +-6) and returns uint8 codes 0..15.

    The sign bit follows ``signbit(y)``, so negative inputs that round to zero give code 8 (-0), exactly like
    ``ml_dtypes.float4_e2m1fn``. NaN inputs give code 0 or 8 (callers handle non-finite values before encoding).
    """
    y = jnp.asarray(y, jnp.float32)
    mag = jnp.abs(y)
    idx = jnp.zeros(y.shape, jnp.uint8)
    for threshold, inclusive in E2M1_THRESHOLDS:
        passed = (mag >= threshold) if inclusive else (mag > threshold)
        idx = idx + passed.astype(jnp.uint8)
    sign = jnp.signbit(y).astype(jnp.uint8) << 3
    return sign | idx


def e2m1_decode(codes: jax.Array) -> jax.Array:
    """Maps E2M1 codes (any integer dtype, only the low 4 bits are used) to their float32 values (``E2M1_VALUES``).

    Computed with element-wise arithmetic rather than a table gather, so that XLA fuses it into its neighbours."""
    codes = jnp.asarray(codes).astype(jnp.int32)
    idx = (codes & 7).astype(jnp.float32)
    mag = jnp.where(idx <= 4, idx * 0.5, jnp.where(idx == 5, 3.0, jnp.where(idx == 6, 4.0, 6.0)))
    return jnp.where((codes & 8) != 0, -mag, mag)


def exp2_int(n: jax.Array) -> jax.Array:
    """Exact float32 ``2**n`` for integer ``n`` in [-126, 127], built from the exponent bits (no rounding).

    Outside that range the result is meaningless; use :func:`ldexp_exact` for wider exponents.
    """
    n = jnp.asarray(n).astype(jnp.int32)
    return jax.lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def ldexp_exact(x: jax.Array, n: jax.Array) -> jax.Array:
    """``x * 2**n`` for integer ``n`` in [-252, 252], exact whenever the result is a normal float32.

    The power of two is applied in two halves of the same sign, so the intermediate value lies between ``x`` and the
    result and never overflows or underflows when the result does not. (XLA on CPU/GPU flushes subnormals, so a single
    multiplication by a subnormal ``2**n`` such as ``2**-127`` would give 0.)
    """
    n = jnp.asarray(n).astype(jnp.int32)
    half = n >> 1  # floor(n / 2); half and n - half have the same sign
    return jnp.asarray(x, jnp.float32) * exp2_int(half) * exp2_int(n - half)


def floor_log2(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(floor(log2(a)), mantissa_bits)`` of positive float32 ``a``, exactly, from its bit pattern.

    ``mantissa_bits`` is the 23-bit fraction field (``a = 2**f * (1 + mantissa_bits / 2**23)`` for normal ``a``).
    Zero and subnormal inputs give ``f = -127``; callers treat them as zero.
    """
    bits = jax.lax.bitcast_convert_type(jnp.abs(jnp.asarray(a, jnp.float32)), jnp.int32)
    return (bits >> 23) - 127, bits & 0x7FFFFF


def e8m0_encode(exponent: jax.Array) -> jax.Array:
    """E8M0 code (uint8) of the power of two ``2**exponent``; ``exponent`` must already lie in [-127, 127]."""
    return (jnp.asarray(exponent).astype(jnp.int32) + 127).astype(jnp.uint8)


def e8m0_decode(codes: jax.Array) -> jax.Array:
    """Float32 value of E8M0 codes: ``2**(code - 127)``; code 255 is NaN (OCP MX).

    Code 0 (``2**-127``) is returned bit-exactly as a float32 subnormal, which XLA may flush to 0 in later arithmetic;
    the quantizers in this package never produce code 0 (see ``docs/formats.md``).
    """
    c = jnp.asarray(codes).astype(jnp.int32)
    # Normal codes: exponent field = code. Code 0: the subnormal with only the top fraction bit set.
    bits = jnp.where(c == 0, 1 << 22, c << 23)
    value = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(c == E8M0_NAN_CODE, jnp.float32(jnp.nan), value)


def fp8_e4m3_encode(y: jax.Array) -> jax.Array:
    """Rounds float32 ``y`` to float8_e4m3fn (round half to even), saturating at +-448 instead of producing NaN.

    NaN inputs stay NaN.
    """
    y = jnp.asarray(y, jnp.float32)
    return jnp.clip(y, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)
