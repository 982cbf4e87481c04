"""Building blocks of the Wan2.1 video VAE (channels-last, Flax NNX).

Layout: video tensors are ``[B, F, H, W, C]``. Convolution kernels are stored channels-last
(``[kt, kh, kw, in, out]`` for 3-D, ``[kh, kw, in, out]`` for 2-D, ``[in, out]`` for the 1x1
projections of the attention block); the checkpoint loader (`wanjax.io.vae_loader`) transposes
the PyTorch ``[out, in, ...]`` weights.

Causal feature cache. The reference (``wan/modules/vae2_1.py``, diffusers ``AutoencoderKLWan``)
runs the network on frame chunks and keeps, per temporal convolution, the last ``CACHE_T = 2``
input frames of the previous chunk in a mutable list. Here every block is a pure function
``(x, cache) -> (y, new_cache)`` where ``cache`` is a pytree of fixed-shape arrays, so chunks can be
driven by ``jax.lax.scan``. ``cache=None`` means "first chunk": a causal conv then sees zeros in
place of the previous frames (exactly the reference's left zero padding), and the two temporal
resamplers use their first-chunk rules (see `Resample`). After the first chunk every cache has a
fixed shape, which is what lets the remaining chunks run under ``scan``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

CACHE_T = 2  # frames of context a kt=3 causal conv keeps from the previous chunk (as the reference)
_NORM_EPS = 1e-12  # F.normalize's eps


def _precision(dtype) -> jax.lax.Precision:
    """Full fp32 precision for fp32 compute (no TF32 on GPU), default otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _init_kernel(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, param_dtype) -> nnx.Param:
    bound = 1.0 / math.sqrt(fan_in)
    return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(param_dtype))


class CausalConv3d(nnx.Module):
    """3-D convolution, zero-padded spatially on both sides and temporally on the left only.

    ``kernel_size=(kt, kh, kw)``, ``padding=(pt, ph, pw)`` as in the reference: the temporal
    padding is ``2 * pt`` frames on the left (none on the right). With ``pt > 0`` the left padding
    is replaced by the cached last frames of the previous chunk.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size=(3, 3, 3),
        stride=(1, 1, 1),
        padding=(1, 1, 1),
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kt, kh, kw = kernel_size
        self.kernel = _init_kernel(rngs, (kt, kh, kw, in_dim, out_dim), in_dim * kt * kh * kw, param_dtype)
        self.bias = nnx.Param(jnp.zeros((out_dim,), param_dtype))
        self.stride = tuple(stride)
        self.spatial_pad = (padding[1], padding[2])
        self.time_pad = 2 * padding[0]
        if self.time_pad not in (0, CACHE_T):
            raise ValueError(f"CausalConv3d: temporal padding {padding[0]} unsupported (expected 0 or 1)")
        self.dtype = dtype

    def conv(self, x: jax.Array) -> jax.Array:
        """The plain convolution (spatial padding only, no temporal padding or cache)."""
        ph, pw = self.spatial_pad
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=self.stride,
            padding=((0, 0), (ph, ph), (pw, pw)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            precision=_precision(self.dtype),
        )
        return y + self.bias[...].astype(self.dtype)

    def __call__(self, x: jax.Array, cache: jax.Array | None = None):
        """Returns ``(y, new_cache)``; ``new_cache`` is None for convs without temporal padding."""
        if self.time_pad == 0:
            return self.conv(x), None
        x = x.astype(self.dtype)
        if cache is None:
            cache = jnp.zeros(x.shape[:1] + (self.time_pad,) + x.shape[2:], x.dtype)
        xin = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return self.conv(xin), xin[:, -CACHE_T:]


class Conv2d(nnx.Module):
    """Per-frame 2-D convolution on ``[B, F, H, W, C]`` (explicit ``((top, bottom), (left, right))`` padding)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        stride: int = 1,
        padding=((1, 1), (1, 1)),
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = _init_kernel(rngs, (3, 3, in_dim, out_dim), in_dim * 9, param_dtype)
        self.bias = nnx.Param(jnp.zeros((out_dim,), param_dtype))
        self.stride = (stride, stride)
        self.padding = tuple(tuple(p) for p in padding)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape((b * f,) + x.shape[2:]).astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=self.stride,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=_precision(self.dtype),
        )
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape((b, f) + y.shape[1:])


class RMSNorm(nnx.Module):
    """``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over the channel axis (the reference ``RMS_norm``,
    bias-free as in the Wan2.1 VAE). Normalised in fp32, returned in the compute dtype."""

    def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32):
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))
        self.scale = dim**0.5
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, _NORM_EPS)
        return (y * self.scale * self.gamma[...].astype(jnp.float32)).astype(self.dtype)


class ResidualBlock(nnx.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with causal 3x3x3 convs."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(in_dim, **kw)
        self.conv1 = CausalConv3d(in_dim, out_dim, rngs=rngs, **kw)
        self.norm2 = RMSNorm(out_dim, **kw)
        self.conv2 = CausalConv3d(out_dim, out_dim, rngs=rngs, **kw)
        self.conv_shortcut = (
            CausalConv3d(in_dim, out_dim, (1, 1, 1), padding=(0, 0, 0), rngs=rngs, **kw) if in_dim != out_dim else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array, cache=None, first: bool = False):
        x = x.astype(self.dtype)
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        c1, c2 = (None, None) if cache is None else cache
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), c2)
        return y + h, (c1, c2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the ``H*W`` positions of each frame (no temporal mixing)."""

    def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.to_qkv_kernel = _init_kernel(rngs, (dim, 3 * dim), dim, param_dtype)
        self.to_qkv_bias = nnx.Param(jnp.zeros((3 * dim,), param_dtype))
        self.proj_kernel = _init_kernel(rngs, (dim, dim), dim, param_dtype)
        self.proj_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array, cache=None, first: bool = False):
        b, f, hh, ww, c = x.shape
        dt, prec = self.dtype, _precision(self.dtype)
        x = x.astype(dt)
        xn = self.norm(x).reshape(b * f, hh * ww, c)
        qkv = jnp.einsum("bnc,cd->bnd", xn, self.to_qkv_kernel[...].astype(dt), precision=prec)
        qkv = qkv + self.to_qkv_bias[...].astype(dt)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=prec, preferred_element_type=jnp.float32) * (
            1.0 / math.sqrt(c)
        )
        p = jax.nn.softmax(logits, axis=-1).astype(dt)
        o = jnp.einsum("bqk,bkc->bqc", p, v, precision=prec)
        o = jnp.einsum("bnc,cd->bnd", o, self.proj_kernel[...].astype(dt), precision=prec)
        o = o + self.proj_bias[...].astype(dt)
        return o.reshape(b, f, hh, ww, c) + x, None


class Resample(nnx.Module):
    """Spatial x2 up/down-sampling, optionally with a temporal x2 step (the reference ``Resample``).

    * ``downsample2d`` / ``downsample3d``: zero-pad right/bottom by 1, 3x3 conv with stride 2.
      ``downsample3d`` then halves time with a (3,1,1) stride-2 conv over ``[last frame of the previous
      chunk, this chunk]``; on the first chunk it passes the frame through unchanged.
    * ``upsample2d`` / ``upsample3d``: nearest x2, 3x3 conv to ``dim // 2`` channels. ``upsample3d``
      first doubles time with a causal (3,1,1) conv to ``2*dim`` channels whose halves become
      frames ``2t`` and ``2t+1``; on the first chunk it is skipped (one frame in, one frame out) and
      the next chunk sees zeros as its past (the reference's ``"Rep"`` marker).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if mode not in self.MODES:
            raise ValueError(f"Resample: mode {mode!r} not in {self.MODES}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode = mode
        self.dtype = dtype
        if mode.startswith("up"):
            self.conv = Conv2d(dim, dim // 2, 1, ((1, 1), (1, 1)), **kw)
            self.time_conv = (
                CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kw) if mode == "upsample3d" else None
            )
        else:
            self.conv = Conv2d(dim, dim, 2, ((0, 1), (0, 1)), **kw)
            self.time_conv = (
                CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0), **kw)
                if mode == "downsample3d"
                else None
            )

    def __call__(self, x: jax.Array, cache=None, first: bool = False):
        x = x.astype(self.dtype)
        new_cache = None
        if self.mode == "upsample3d":
            if first:
                new_cache = jnp.zeros(x.shape[:1] + (CACHE_T,) + x.shape[2:], x.dtype)
            else:
                y, new_cache = self.time_conv(x, cache)
                b, f, h, w, c2 = y.shape
                x = y.reshape(b, f, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * f, h, w, c2 // 2)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact x2 == repeat
        x = self.conv(x)
        if self.mode == "downsample3d":
            new_cache = x[:, -1:]
            if not first:
                x = self.time_conv.conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
        return x, new_cache
