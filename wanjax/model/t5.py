"""UMT5 text encoder (the umT5-XXL encoder Wan2.2 uses), in Flax NNX.

Matches the official ``Wan-Video/Wan2.2:wan/modules/t5.py`` ``T5Encoder`` (and
``transformers.UMT5EncoderModel``):

* token embedding -> ``num_layers`` pre-norm blocks -> final RMS norm; no dropout (inference only);
* every block has its own relative position bias (umT5 style, ``shared_pos=False``):
  ``num_buckets`` bidirectional log-spaced buckets up to ``max_distance``, one scalar per head;
* attention is *not* scaled by ``1/sqrt(head_dim)``; padded keys are masked out;
* feed-forward is gated GELU (tanh approximation): ``fc2(fc1(x) * gelu(gate(x)))``.

Numerics follow the official code: activations and matmuls in ``cfg.dtype`` (bf16 for the real model),
RMS norm statistics and softmax in fp32. Attention logits are kept in fp32 (the official code rounds them to bf16
before the fp32 softmax; keeping fp32 is strictly more accurate). With ``dtype=float32`` everything is fp32,
which is what the parity tests use.

Parameters of the blocks are stacked along a leading ``num_layers`` axis and the blocks run under
``jax.lax.scan`` (one compiled block for all layers).

Public API: `T5Config`, presets `UMT5_XXL` and `TINY_T5`, `UMT5Encoder`, `relative_position_buckets`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a UMT5 encoder (field names follow the official ``umt5_xxl`` config).

    ``dtype`` is the activation / matmul dtype, ``param_dtype`` the storage dtype of the weights.
    """

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"T5Config: dim_attn ({self.dim_attn}) must be divisible by num_heads ({self.num_heads})")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"T5Config: num_buckets must be an even number >= 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(
                f"T5Config: max_distance ({self.max_distance}) must exceed num_buckets // 4 ({self.num_buckets // 4})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def replace(self, **kw) -> "T5Config":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        """Parameter count implied by the config (embedding included)."""
        per_layer = (
            4 * self.dim * self.dim_attn  # q, k, v, o
            + 3 * self.dim * self.dim_ffn  # gate, fc1, fc2
            + 2 * self.dim  # norm1, norm2
            + self.num_buckets * self.num_heads
        )  # relative position bias
        return self.vocab_size * self.dim + self.num_layers * per_layer + self.dim


def small_t5_config(vocab_size: int, dim: int, dim_ffn: int, num_heads: int, num_layers: int, **kw) -> T5Config:
    """A small fp32 UMT5 config (tests, the mini and tiny models): ``dim_attn == dim``, fp32 activations and weights;
    ``kw``: the other fields (default: the umT5 values, ``num_buckets`` 32, ``max_distance`` 128, ``eps`` 1e-6)."""
    return T5Config(
        vocab_size=vocab_size,
        dim=dim,
        dim_attn=dim,
        dim_ffn=dim_ffn,
        num_heads=num_heads,
        num_layers=num_layers,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        **kw,
    )


# umT5-XXL encoder as used by Wan2.1/2.2 (``models_t5_umt5-xxl-enc-bf16.pth``).
UMT5_XXL = T5Config()

# Small fp32 config for tests.
TINY_T5 = small_t5_config(vocab_size=300, dim=64, dim_ffn=96, num_heads=4, num_layers=2, text_len=32)


def relative_position_buckets(
    q_len: int, k_len: int, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """Bucket index [q_len, k_len] (int32) of the relative position ``key_pos - query_pos``.

    Same arithmetic as the official ``T5RelativeEmbedding._relative_position_bucket`` (float32 log, truncation
    toward zero), computed with numpy at trace time because the shapes are static.
    """
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    if bidirectional:
        nb = num_buckets // 2
        buckets = (rel > 0).astype(np.int64) * nb
        rel = np.abs(rel)
    else:
        nb = num_buckets
        buckets = np.zeros_like(rel)
        rel = -np.minimum(rel, 0)
    max_exact = nb // 2
    # log of positions < max_exact is never used; clamp to avoid log(0) warnings.
    ratio = np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact)
    scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))) * np.float32(nb - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), nb - 1)
    buckets = buckets + np.where(rel < max_exact, rel, large)
    return buckets.astype(np.int32)


class T5RMSNorm(nnx.Module):
    """T5 layer norm: ``scale * x / sqrt(mean(x^2) + eps)``, statistics in fp32, no mean, no bias."""

    def __init__(self, dim: int, eps: float, dtype: Any, param_dtype: Any):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def _linear(din: int, dout: int, std: float, cfg: T5Config, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=jax.nn.initializers.normal(std),
        rngs=rngs,
    )


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive fp32 bias and a key padding mask."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.dtype = cfg.dtype
        # Init scales as the official init_weights (only matters for random-weight runs).
        self.q = _linear(cfg.dim, cfg.dim_attn, (cfg.dim * cfg.dim_attn) ** -0.5, cfg, rngs)
        self.k = _linear(cfg.dim, cfg.dim_attn, cfg.dim**-0.5, cfg, rngs)
        self.v = _linear(cfg.dim, cfg.dim_attn, cfg.dim**-0.5, cfg, rngs)
        self.o = _linear(cfg.dim_attn, cfg.dim, (cfg.num_heads * cfg.dim_attn) ** -0.5, cfg, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x [B, L, dim]; bias [1 or B, heads, L, L] fp32; mask [B, L] (nonzero = real token) or None."""
        b, n = x.shape[0], x.shape[1]
        h, c = self.num_heads, self.head_dim
        q = self.q(x).reshape(b, n, h, c)
        k = self.k(x).reshape(b, n, h, c)
        v = self.v(x).reshape(b, n, h, c)
        logits = jnp.einsum("binc,bjnc->bnij", q, k, preferred_element_type=jnp.float32)
        logits = logits + bias
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bnij,bjnc->binc", probs, v)
        return self.o(out.reshape(b, n, h * c))


class T5FeedForward(nnx.Module):
    """Gated-GELU MLP: ``fc2(fc1(x) * gelu_tanh(gate(x)))``."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.gate = _linear(cfg.dim, cfg.dim_ffn, cfg.dim**-0.5, cfg, rngs)
        self.fc1 = _linear(cfg.dim, cfg.dim_ffn, cfg.dim**-0.5, cfg, rngs)
        self.fc2 = _linear(cfg.dim_ffn, cfg.dim, cfg.dim_ffn**-0.5, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.fc1(x) * jax.nn.gelu(self.gate(x), approximate=True))


class T5Block(nnx.Module):
    """Pre-norm encoder block with its own relative position bias table [num_buckets, heads]."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps, cfg.dtype, cfg.param_dtype)
        self.attn = T5Attention(cfg, rngs=rngs)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps, cfg.dtype, cfg.param_dtype)
        self.ffn = T5FeedForward(cfg, rngs=rngs)
        std = (2 * cfg.num_buckets * cfg.num_heads) ** -0.5
        self.rel_bias = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_buckets, cfg.num_heads)).astype(cfg.param_dtype) * std
        )

    def __call__(self, x: jax.Array, buckets: jax.Array, mask: jax.Array | None) -> jax.Array:
        # [L, L, heads] -> [1, heads, L, L]
        bias = jnp.take(self.rel_bias[...], buckets, axis=0).astype(jnp.float32)
        bias = jnp.transpose(bias, (2, 0, 1))[None]
        x = x + self.attn(self.norm1(x), bias, mask)
        x = x + self.ffn(self.norm2(x))
        return x


class UMT5Encoder(nnx.Module):
    """UMT5 encoder. ``model(ids, mask)`` -> hidden states [B, L, dim] in ``cfg.dtype``.

    Params (pure-dict paths): ``embedding`` [vocab, dim]; ``blocks/...`` stacked with a leading
    ``num_layers`` axis (``norm1/scale``, ``attn/{q,k,v,o}/kernel`` [in, out], ``norm2/scale``,
    ``ffn/{gate,fc1,fc2}/kernel``, ``rel_bias`` [buckets, heads]); ``norm/scale``.
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim)).astype(cfg.param_dtype))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r: nnx.Rngs) -> T5Block:
            return T5Block(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        self.norm = T5RMSNorm(cfg.dim, cfg.eps, cfg.dtype, cfg.param_dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """ids [B, L] int; mask [B, L] (1 = token, 0 = padding) or None (no padding)."""
        cfg = self.cfg
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"UMT5Encoder: ids must be an integer array [B, L], got {ids.dtype} {ids.shape}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"UMT5Encoder: mask shape {mask.shape} must equal ids shape {ids.shape}")
        seq = ids.shape[1]
        buckets = jnp.asarray(relative_position_buckets(seq, seq, cfg.num_buckets, cfg.max_distance))
        x = jnp.take(self.embedding[...], ids, axis=0).astype(cfg.dtype)

        graphdef, state = nnx.split(self.blocks)

        def body(h, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(h, buckets, mask), None

        x, _ = jax.lax.scan(body, x, state)
        return self.norm(x)
