"""Dequantizers of every format: codes and scales -> float values (the inverse of each quantizer).

Each takes an unpacked :class:`~wanjax.numerics.tensor.QuantizedTensor` (any pytree with its fields ``codes``,
``scales``, ``tensor_scale``, ``group_size``) and a dtype; :func:`wanjax.numerics.tensor.dequantize` picks one by
``fmt``. Nothing here constructs a ``QuantizedTensor``, so the container can call these without an import cycle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wanjax.numerics.codecs import E8M0_NAN_CODE, e2m1_decode, ldexp_exact

__all__ = ["DEQUANTIZERS", "dequantize_fp8", "dequantize_int", "dequantize_mxfp4", "dequantize_nvfp4"]


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_int(q, dtype=jnp.float32) -> jax.Array:
    """``codes * scale`` per group for an unpacked int4/int8 ``QuantizedTensor``, cast to ``dtype``."""
    codes = jnp.asarray(q.codes)
    n_groups = codes.shape[-1] // q.group_size
    vals = codes.astype(jnp.float32).reshape(*codes.shape[:-1], n_groups, q.group_size) * q.scales[..., None]
    return vals.reshape(codes.shape).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_fp8(q, dtype=jnp.float32) -> jax.Array:
    """``codes * scale`` for an FP8 ``QuantizedTensor``, cast to ``dtype``."""
    # scales () (per tensor) or [..., 1] (per channel) broadcast over the codes [..., K].
    return (jnp.asarray(q.codes).astype(jnp.float32) * q.scales).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_mxfp4(q, dtype=jnp.float32) -> jax.Array:
    """``E2M1(code) * 2**(scale_code - 127)`` (exact for normal results; scale code 255 gives NaN), cast to ``dtype``."""
    codes = jnp.asarray(q.codes)
    n_groups = codes.shape[-1] // q.group_size
    vals = e2m1_decode(codes).reshape(*codes.shape[:-1], n_groups, q.group_size)
    sc = jnp.asarray(q.scales).astype(jnp.int32)
    out = ldexp_exact(vals, (sc - 127)[..., None])
    out = jnp.where((sc == E8M0_NAN_CODE)[..., None], jnp.float32(jnp.nan), out)
    return out.reshape(codes.shape).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_nvfp4(q, dtype=jnp.float32) -> jax.Array:
    """``E2M1(code) * (float(s_b) * tensor_scale)`` per block, cast to ``dtype``."""
    codes = jnp.asarray(q.codes)
    n_groups = codes.shape[-1] // q.group_size
    vals = e2m1_decode(codes).reshape(*codes.shape[:-1], n_groups, q.group_size)
    eff = jnp.asarray(q.scales).astype(jnp.float32) * q.tensor_scale
    return (vals * eff[..., None]).reshape(codes.shape).astype(dtype)


#: format name -> its dequantizer
DEQUANTIZERS = {
    "int4": dequantize_int,
    "int8": dequantize_int,
    "fp8_e4m3": dequantize_fp8,
    "mxfp4": dequantize_mxfp4,
    "nvfp4": dequantize_nvfp4,
}
