"""The Wan2.2 image-to-video diffusion transformer (one expert) in Flax NNX.

Matches the official ``WanModel`` (Wan-Video/Wan2.2 ``wan/modules/model.py``) for ``model_type="i2v"`` with
``in_dim=36``: patch embedding (a (1,2,2) Conv3d, computed as a dense layer over patches), sinusoidal time embedding
(cos first) -> ``time_embedding`` -> ``time_projection`` (6 x dim modulation), text embedding (GELU tanh), scanned
attention blocks (modulated self-attention with RMSNorm-across-heads q/k and 3D RoPE; affine LayerNorm + unmodulated
cross-attention over all ``text_len`` text tokens; modulated GELU-tanh FFN), modulated head and unpatchify.

Numerics follow the official code: the residual stream, modulation, time embedding and head are fp32; matmul
operands and attention are in ``dtype`` (bf16 by default) with fp32 accumulation; RoPE tables are computed in
float64; the modulation is computed per sample (the timestep is shared by all tokens of a sample in I2V-A14B).

Layout is channels-last: ``x`` [B, F, H, W, in_dim] -> velocity [B, F, H, W, out_dim] (float32).
"""

from __future__ import annotations

import contextvars
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from wanjax.config import WanConfig
from wanjax.model.attention import attention
from wanjax.model.layers import LayerNorm, Linear, RMSNorm, gelu_tanh, layer_norm
from wanjax.model.rope import apply_rope, rope_cos_sin

Dtype = Any
F32 = jnp.float32

_LAYER_INDEX: contextvars.ContextVar[int | None] = contextvars.ContextVar("wanjax_layer_index", default=None)


def current_layer_index() -> int | None:
    """Index of the block being traced when the model runs with ``scan_layers=False`` (else None)."""
    return _LAYER_INDEX.get()


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
    """[B] timesteps -> [B, dim] features ``cat(cos, sin)`` of ``t * 10000^(-i/half)`` (fp32)."""
    half = dim // 2
    freqs = jnp.power(10000.0, -jnp.arange(half, dtype=F32) / half)
    args = t.astype(F32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLP2(nnx.Module):
    """``fc2(act(fc1(x)))`` - the time/text embedders and the FFN."""

    def __init__(self, din: int, dhidden: int, dout: int, act, *, dtype, param_dtype, path: str, rngs: nnx.Rngs):
        self.fc1 = Linear(din, dhidden, dtype=dtype, param_dtype=param_dtype, path=f"{path}.fc1", rngs=rngs)
        self.fc2 = Linear(dhidden, dout, dtype=dtype, param_dtype=param_dtype, path=f"{path}.fc2", rngs=rngs)
        self.act = act

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nnx.Module):
    """Wan self- or cross-attention: q/k/v/o projections with RMSNorm over the full width on q and k."""

    def __init__(self, cfg: WanConfig, *, dtype, param_dtype, path: str, rngs: nnx.Rngs):
        d = cfg.dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear(d, d, path=f"{path}.q", **kw)
        self.k = Linear(d, d, path=f"{path}.k", **kw)
        self.v = Linear(d, d, path=f"{path}.v", **kw)
        self.o = Linear(d, d, path=f"{path}.o", **kw)
        self.norm_q = RMSNorm(d, eps=cfg.eps, dtype=dtype, param_dtype=F32)
        self.norm_k = RMSNorm(d, eps=cfg.eps, dtype=dtype, param_dtype=F32)
        self.num_heads = cfg.num_heads

    def _project(self, x, src):
        """``(q, k, v)`` before the norms. A module with a fused ``qkv`` projection (put in place of ``q`` / ``k`` /
        ``v`` by quantization, `wanjax.model.names.FUSED_LINEARS`; self-attention only: one input) runs it once and
        splits its ``[..., 3 * dim]`` output in that order."""
        fused = getattr(self, "qkv", None)
        if fused is None:
            return self.q(x), self.k(src), self.v(src)
        if src is not x:
            raise ValueError("Attention: a fused qkv projection needs q, k and v of one input (self-attention)")
        return tuple(jnp.split(fused(x), 3, axis=-1))

    def __call__(self, x, ctx=None, rope=None):
        src = x if ctx is None else ctx
        b, s, _ = x.shape
        n = self.num_heads
        q, k, v = self._project(x, src)
        q = self.norm_q(q).reshape(b, s, n, -1)
        k = self.norm_k(k).reshape(b, src.shape[1], n, -1)
        v = v.reshape(b, src.shape[1], n, -1)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        o = attention(q, k, v, self_attention=ctx is None)  # cross-attention never takes a self-only backend
        return self.o(o.reshape(b, s, -1))


class WanBlock(nnx.Module):
    """One transformer block (both experts share the structure)."""

    def __init__(self, cfg: WanConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 6, cfg.dim), F32) / math.sqrt(cfg.dim))
        self.self_attn = Attention(cfg, path="blocks.self_attn", **kw)
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, param_dtype=F32)
        self.cross_attn = Attention(cfg, path="blocks.cross_attn", **kw)
        self.ffn = MLP2(cfg.dim, cfg.ffn_dim, cfg.dim, gelu_tanh, path="blocks.ffn", **kw)
        self.eps = cfg.eps
        self.dtype = dtype

    def __call__(self, x, e0, ctx, rope):
        """x [B, S, dim] fp32; e0 [B, 6, dim] fp32; ctx [B, L, dim]; rope (cos, sin)."""
        e = self.modulation[...].astype(F32) + e0  # [B, 6, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = (e[:, i : i + 1] for i in range(6))
        h = layer_norm(x, self.eps) * (1.0 + scale1) + shift1
        x = x + self.self_attn(h, rope=rope).astype(F32) * gate1
        x = x + self.cross_attn(self.norm3(x), ctx=ctx).astype(F32)
        h = layer_norm(x, self.eps) * (1.0 + scale2) + shift2
        x = x + self.ffn(h).astype(F32) * gate2
        return x


class Head(nnx.Module):
    """Output head: LayerNorm (no affine), modulation by the time embedding, fp32 dense to 4*out_dim."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        out = cfg.out_dim * math.prod(cfg.patch_size)
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 2, cfg.dim), F32) / math.sqrt(cfg.dim))
        self.head = Linear(cfg.dim, out, dtype=F32, param_dtype=F32, path="head.head", rngs=rngs)
        self.eps = cfg.eps

    def __call__(self, x, temb):
        e = self.modulation[...].astype(F32) + temb[:, None, :]  # [B, 2, dim]
        shift, scale = e[:, 0:1], e[:, 1:2]
        return self.head(layer_norm(x, self.eps) * (1.0 + scale) + shift)


class WanDiT(nnx.Module):
    """One Wan2.2 DiT expert.

    Args:
      cfg: architecture (`wanjax.config.WanConfig`).
      dtype: compute dtype of matmul operands and attention (bf16 default; fp32 for parity tests).
      param_dtype: storage dtype of the large weights (Linear kernels/biases of blocks, patch and text embedding,
        time projection). Modulation tables, norms, the time embedding and the head are always fp32.
      scan_layers: run the stacked blocks under ``jax.lax.scan`` (fast compile). ``False`` unrolls them in Python
        and exposes the block index through `current_layer_index` (used by calibration).
      rngs: random init (weights are normally loaded with `wanjax.load_dit`).

    Call: ``dit(x, t, context)`` with x [B, F, H, W, in_dim] (H, W even), t [B] timesteps in [0, 1000], context
    [B, L <= text_len, text_dim]; returns the velocity [B, F, H, W, out_dim] in float32.
    """

    def __init__(
        self,
        cfg: WanConfig,
        *,
        dtype: Dtype = jnp.bfloat16,
        param_dtype: Dtype = jnp.bfloat16,
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.scan_layers = scan_layers
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        pt, ph, pw = cfg.patch_size
        self.patch_embedding = Linear(pt * ph * pw * cfg.in_dim, cfg.dim, path="patch_embedding", **kw)
        self.text_embedding = MLP2(cfg.text_dim, cfg.dim, cfg.dim, gelu_tanh, path="text_embedding", **kw)
        self.time_embedding = MLP2(
            cfg.freq_dim, cfg.dim, cfg.dim, jax.nn.silu, dtype=F32, param_dtype=F32, path="time_embedding", rngs=rngs
        )
        self.time_projection = Linear(
            cfg.dim, 6 * cfg.dim, dtype=F32, param_dtype=param_dtype, path="time_projection", rngs=rngs
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r):
            return WanBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.blocks = make_blocks(rngs)
        self.head = Head(cfg, rngs=rngs)

    # ---- pieces -------------------------------------------------------------------------------------------------
    def patchify(self, x: jax.Array) -> jax.Array:
        """[B, F, H, W, C] -> [B, F*(H/2)*(W/2), 4*C], patch features ordered (ph, pw, c)."""
        b, f, h, w, c = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"latent height/width must be even for the (1,2,2) patch, got H={h}, W={w}")
        if c != self.cfg.in_dim:
            raise ValueError(
                f"expected {self.cfg.in_dim} input channels (16 noise + 4 mask + 16 image latent), got {c}"
            )
        x = x.reshape(b, f, h // 2, 2, w // 2, 2, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, f * (h // 2) * (w // 2), 4 * c)

    def unpatchify(self, y: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """[B, S, 4*out] (features ordered (ph, pw, c)) -> [B, F, H, W, out]."""
        f, h, w = grid
        b = y.shape[0]
        o = self.cfg.out_dim
        y = y.reshape(b, f, h, w, 2, 2, o).transpose(0, 1, 2, 4, 3, 5, 6)
        return y.reshape(b, f, 2 * h, 2 * w, o)

    def embed_text(self, context: jax.Array) -> jax.Array:
        """Zero-pad [B, L, text_dim] to text_len tokens and embed -> [B, text_len, dim]."""
        b, length, d = context.shape
        if d != self.cfg.text_dim:
            raise ValueError(f"context last dim: expected text_dim {self.cfg.text_dim}, got {d}")
        if length > self.cfg.text_len:
            raise ValueError(f"context has {length} tokens, more than text_len {self.cfg.text_len}")
        context = jnp.pad(context, ((0, 0), (0, self.cfg.text_len - length), (0, 0)))
        return self.text_embedding(context)

    def embed_time(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B] timesteps -> (temb [B, dim], e0 [B, 6, dim]) in fp32."""
        temb = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim))
        e0 = self.time_projection(jax.nn.silu(temb)).reshape(t.shape[0], 6, self.cfg.dim)
        return temb, e0

    def run_blocks(self, x, e0, ctx, rope):
        graphdef, state = nnx.split(self.blocks)
        if self.scan_layers:

            def body(h, st):
                return nnx.merge(graphdef, st)(h, e0, ctx, rope), None

            x, _ = jax.lax.scan(body, x, state)
            return x
        for i in range(self.cfg.num_layers):
            token = _LAYER_INDEX.set(i)
            try:
                blk = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
                x = blk(x, e0, ctx, rope)
            finally:
                _LAYER_INDEX.reset(token)
        return x

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        b, f, h, w, _ = x.shape
        grid = (f, h // 2, w // 2)
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        tokens = self.patch_embedding(self.patchify(x)).astype(F32)
        temb, e0 = self.embed_time(t)
        ctx = self.embed_text(context)
        rope = rope_cos_sin(
            grid, self.cfg.head_dim, self.cfg.rope_split, self.cfg.rope_max_seq_len, self.cfg.rope_theta
        )
        tokens = self.run_blocks(tokens, e0, ctx, rope)
        out = self.head(tokens, temb)
        return self.unpatchify(out, grid).astype(F32)


def param_count(cfg: WanConfig) -> int:
    """Number of parameters of one expert, from shapes only (no allocation)."""
    abstract = nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))
    return sum(int(math.prod(a.shape)) for a in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
