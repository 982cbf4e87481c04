"""Packing of 4-bit codes two per byte: the one owner of the nibble layout (formats, kernels and their references).

Layout: codes ``[..., K]`` -> bytes ``uint8 [..., K/2]`` along the last (K) axis, so a weight ``[N, K]`` packs to
``[N, K/2]`` (K-major). Byte ``j`` holds element ``k = 2j`` in the LOW nibble (bits 3..0) and ``k = 2j + 1`` in the
HIGH nibble (bits 7..4); this is the bit layout of a little-endian packed ``jnp.int4`` array of shape ``[..., K]``.

Nibble contents:
* int4 codes: 4-bit two's complement (value range [-8, 7]; our quantizers produce [-7, 7]);
* FP4 (E2M1) codes: the raw code 0..15 (bit 3 sign, bits 2-1 exponent, bit 0 mantissa).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from wanjax.numerics.checks import is_traced

__all__ = ["pack_int4", "pack_nibbles", "packed_as_int4", "unpack_int4", "unpack_nibbles"]


def _pack(codes):
    """The nibble layout itself (plain jnp, traceable; no checks): low nibble = even k, high nibble = odd k."""
    nib = codes.astype(jnp.int32) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(jnp.uint8)


def _unpack(packed, signed: bool):
    """Inverse of :func:`_pack` (plain jnp, traceable; no checks); ``signed`` sign-extends the nibbles to int8."""
    b = packed.astype(jnp.int32)
    low = b & 0xF
    if signed:
        low = (low ^ 8) - 8  # sign-extend a nibble
    high = b >> 4  # b is a byte (0..255): its high nibble needs no mask
    if signed:
        high = (high ^ 8) - 8
    out = jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return out.astype(jnp.int8 if signed else jnp.uint8)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Packs 4-bit codes ``[..., K]`` (K even) into ``uint8 [..., K/2]`` (see module docstring for the layout).

    ``codes`` may be signed (int4 values in [-8, 7], stored two's complement) or unsigned (FP4 codes in [0, 15]).
    On concrete input, out-of-range codes raise ``ValueError``; under tracing only the low 4 bits are used.
    """
    codes = jnp.asarray(codes)
    if codes.ndim == 0 or codes.shape[-1] % 2 != 0:
        raise ValueError(f"pack_nibbles: expected codes [..., K] with K even, got shape {tuple(codes.shape)}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"pack_nibbles: expected an integer dtype (int4 values or FP4 codes), got {codes.dtype}")
    if not is_traced(codes) and codes.size:
        signed = jnp.issubdtype(codes.dtype, jnp.signedinteger)
        lo, hi = (-8, 7) if signed else (0, 15)
        cmin, cmax = (int(v) for v in _min_max(codes))  # two scalars leave the device
        if cmin < lo or cmax > hi:
            raise ValueError(f"pack_nibbles: {codes.dtype} codes must lie in [{lo}, {hi}], got min {cmin} max {cmax}")
    return _pack_core(codes)


@jax.jit
def _min_max(codes):
    return jnp.min(codes.astype(jnp.int32)), jnp.max(codes.astype(jnp.int32))


_pack_core = jax.jit(_pack)


def unpack_nibbles(packed: jax.Array, signed: bool) -> jax.Array:
    """Inverse of :func:`pack_nibbles`: ``uint8 [..., K/2]`` -> ``[..., K]``.

    ``signed=True`` sign-extends each nibble to ``int8`` in [-8, 7] (int4 codes); ``signed=False`` returns ``uint8``
    codes in [0, 15] (FP4 codes).
    """
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"unpack_nibbles: expected uint8 packed bytes, got {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("unpack_nibbles: expected packed bytes [..., K/2], got a scalar")
    return _unpack_core(packed, signed=bool(signed))


_unpack_core = functools.partial(jax.jit, static_argnames=("signed",))(_unpack)


# ------------------------------------------------------------------- int4 as the kernels use it (traced inline)
def pack_int4(q: jax.Array) -> jax.Array:
    """Packs int4 codes ``q`` (any integer dtype, values in [-8, 7], shape [..., K] with K even) into uint8 [..., K/2].

    The layout of :func:`pack_nibbles` without its range check and its own jit (inlined into the caller's trace).
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension must be even, got shape {q.shape}")
    return _pack(q)


def unpack_int4(p: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_int4`: uint8 [..., K/2] -> int8 [..., K] with values in [-8, 7]."""
    if p.dtype != jnp.uint8:
        raise ValueError(f"unpack_int4: expected uint8 packed codes, got {p.dtype}")
    return _unpack(p, signed=True)


def packed_as_int4(p: jax.Array) -> jax.Array:
    """Reinterprets packed uint8 [N, K/2] as a ``jnp.int4`` array [N, K] (same bits; no arithmetic).

    Only valid where XLA stores int4 packed (GPU/TPU); on CPU use :func:`unpack_int4`.
    """
    n, kh = p.shape
    return lax.bitcast_convert_type(p, jnp.int4).reshape(n, 2 * kh)
