"""Basic layers of the Wan DiT: the single `Linear` hook point, norms, activations.

Every dense projection of the model goes through `Linear`, so quantization can replace or intercept it in one
place: `linear_interceptor(fn)` installs ``fn(module, x) -> y`` for all `Linear` calls traced inside the
``with`` block (calibration captures statistics this way, with no edits to model code).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

_INTERCEPTOR: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "wanjax_linear_interceptor", default=None
)


@contextlib.contextmanager
def linear_interceptor(fn: Callable[["Linear", jax.Array], jax.Array]):
    """Route every `Linear.__call__` traced inside this context through ``fn(module, x)``.

    ``fn`` may call `Linear.apply_default(module, x)` to get the unmodified result. The module's ``path`` attribute
    (e.g. ``"blocks.self_attn.q"``) names the layer; inside scanned blocks the layer index is the scan's.
    """
    token = _INTERCEPTOR.set(fn)
    try:
        yield
    finally:
        _INTERCEPTOR.reset(token)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype: Dtype) -> jax.Array:
    """``x @ kernel + bias`` with operands in ``dtype``, fp32 accumulation, result in ``dtype``."""
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


class Linear(nnx.Module):
    """Dense layer ``y = x @ kernel + bias`` (kernel stored [in, out]).

    Args:
      in_features, out_features: sizes.
      dtype: compute dtype of the matmul operands and of the result (accumulation is fp32).
      param_dtype: storage dtype of kernel and bias.
      path: dotted name of this layer in the model (used by quantization and calibration).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        path: str = "",
        rngs: nnx.Rngs,
    ):
        std = 1.0 / math.sqrt(in_features)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (in_features, out_features), param_dtype, -std, std))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.path = path

    def apply_default(self, x: jax.Array) -> jax.Array:
        """The un-intercepted computation."""
        return dense(x, self.kernel[...], None if self.bias is None else self.bias[...], self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        fn = _INTERCEPTOR.get()
        if fn is not None:
            return fn(self, x)
        return self.apply_default(x)


def layer_norm(x: jax.Array, eps: float, scale: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """LayerNorm over the last axis, computed in fp32; returns fp32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


class LayerNorm(nnx.Module):
    """Affine LayerNorm (fp32 compute), e.g. the official ``norm3`` before cross-attention."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps, self.scale[...], self.bias[...])


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale, fp32 compute; result cast to ``dtype``.

    Wan applies it to q/k over the full model width (across heads) before splitting heads.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (``approximate='tanh'`` in PyTorch)."""
    return jax.nn.gelu(x, approximate=True)
