"""Wan2.1 video VAE (``WanVAE_`` / diffusers ``AutoencoderKLWan``) in Flax NNX, channels-last.

Public API:

* `VAEConfig` - hyper-parameters (defaults = the published Wan2.1 VAE, 126,892,531 params).
* `WanVAE` - the model. ``encode(video)`` takes ``[B, F, H, W, 3]`` in [-1, 1] (``F = 4n+1``,
  ``H, W`` multiples of the spatial stride) and returns the *normalised* latent mean
  ``(mu - mean) / std`` of shape ``[B, 1 + (F-1)/4, H/8, W/8, 16]``; ``decode(latents)``
  un-normalises and returns video in [-1, 1] (clamped as the reference). ``encode_raw`` /
  ``decode_raw`` skip the normalisation.
* `encode_video` / `decode_video` - ``nnx.jit``-compiled wrappers of the above.
* `abstract_vae` (shape-only model to load weights into), `init_vae` (fast random init).

Chunking follows the reference exactly: the encoder sees frame chunks ``1, 4, 4, ...`` and the
decoder one latent frame at a time, each causal conv carrying the last frames of the previous
chunk. The first chunk runs outside ``jax.lax.scan`` (it fixes the cache shapes), the rest run
inside it, so the full video never goes through a conv at once and memory stays bounded
(times and peak memory: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.model.vae_layers import AttentionBlock, CausalConv3d, Resample, ResidualBlock, RMSNorm

LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)

ENCODE_CHUNK = 4  # frames per encoder chunk after the first single frame (as the reference)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE hyper-parameters (names follow diffusers ``AutoencoderKLWan``; ``temporal_downsample``
    is its ``temperal_downsample``). ``temporal_downsample[i]`` says whether down level ``i`` also
    halves time; the decoder mirrors it. Attention is only in the mid blocks (``attn_scales=[]``)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        object.__setattr__(self, "latents_mean", tuple(float(m) for m in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(s) for s in self.latents_std))
        if len(self.dim_mult) < 2:
            raise ValueError(f"VAEConfig: dim_mult needs >= 2 levels, got {self.dim_mult}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAEConfig: temporal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                f"entries, got {len(self.temporal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"VAEConfig: latents_mean/std need z_dim = {self.z_dim} entries, got "
                f"{len(self.latents_mean)}/{len(self.latents_std)}"
            )
        if any(s == 0 for s in self.latents_std):
            raise ValueError("VAEConfig: latents_std contains 0")

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return self.temporal_downsample[::-1]

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def replace(self, **kw) -> "VAEConfig":
        return dataclasses.replace(self, **kw)


WAN21_VAE = VAEConfig()


def _seq(blocks, x, cache, first):
    """Run a list of blocks, each ``(x, cache, first) -> (x, cache)``; returns the list of caches."""
    new = []
    for i, blk in enumerate(blocks):
        x, c = blk(x, None if cache is None else cache[i], first)
        new.append(c)
    return x, new


class MidBlock(nnx.Module):
    """ResidualBlock -> AttentionBlock -> ResidualBlock at constant width."""

    def __init__(self, dim: int, **kw):
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
        self.attentions = nnx.List([AttentionBlock(dim, **kw)])

    def __call__(self, x, cache=None, first: bool = False):
        c = [None, None] if cache is None else cache
        x, c0 = self.resnets[0](x, c[0], first)
        x, _ = self.attentions[0](x)
        x, c1 = self.resnets[1](x, c[1], first)
        return x, [c0, c1]


class Encoder3d(nnx.Module):
    """Video -> ``2*z_dim`` channels (mean and log-variance), spatial /2^(L-1), temporal per config."""

    def __init__(self, cfg: VAEConfig, **kw):
        dims = [cfg.base_dim * m for m in (1,) + cfg.dim_mult]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], **kw)
        blocks = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(din, dout, **kw))
                din = dout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(dout, mode, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = RMSNorm(dims[-1], dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, **kw)

    def __call__(self, x, cache=None, first: bool = False):
        c = {"conv_in": None, "down": None, "mid": None, "conv_out": None} if cache is None else cache
        x, c_in = self.conv_in(x, c["conv_in"])
        x, c_down = _seq(self.down_blocks, x, c["down"], first)
        x, c_mid = self.mid_block(x, c["mid"], first)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c["conv_out"])
        return x, {"conv_in": c_in, "down": c_down, "mid": c_mid, "conv_out": c_out}


class UpBlock(nnx.Module):
    """``num_res_blocks + 1`` residual blocks, then an optional `Resample` (diffusers ``WanUpBlock``)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, **kw):
        res = []
        for _ in range(num_res_blocks + 1):
            res.append(ResidualBlock(in_dim, out_dim, **kw))
            in_dim = out_dim
        self.resnets = nnx.List(res)
        self.upsampler = Resample(out_dim, upsample_mode, **kw) if upsample_mode else None

    def __call__(self, x, cache=None, first: bool = False):
        c = {"resnets": None, "up": None} if cache is None else cache
        x, c_res = _seq(self.resnets, x, c["resnets"], first)
        c_up = None
        if self.upsampler is not None:
            x, c_up = self.upsampler(x, c["up"], first)
        return x, {"resnets": c_res, "up": c_up}


class Decoder3d(nnx.Module):
    """``z_dim`` latent channels -> video; mirrors `Encoder3d` (Wan2.1: non-residual up blocks)."""

    def __init__(self, cfg: VAEConfig, **kw):
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        n = len(cfg.dim_mult)
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                din //= 2  # the previous up-sampler's 2-D conv halves the channels
            mode = None
            if i != n - 1:
                mode = "upsample3d" if cfg.temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(din, dout, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, **kw)

    def __call__(self, x, cache=None, first: bool = False):
        c = {"conv_in": None, "mid": None, "up": None, "conv_out": None} if cache is None else cache
        x, c_in = self.conv_in(x, c["conv_in"])
        x, c_mid = self.mid_block(x, c["mid"], first)
        x, c_up = _seq(self.up_blocks, x, c["up"], first)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c["conv_out"])
        return x, {"conv_in": c_in, "mid": c_mid, "up": c_up, "conv_out": c_out}


def _run_chunks(fn, first_chunk: jax.Array, rest: jax.Array | None) -> jax.Array:
    """``fn(x, cache, first) -> (y, cache)`` on ``first_chunk`` then (scanned) on ``rest``.

    ``rest`` is ``[n, B, f, ...]`` (n chunks) or None; outputs are concatenated along frames.
    """
    y0, cache = fn(first_chunk, None, True)
    if rest is None or rest.shape[0] == 0:
        return y0

    def body(carry, chunk):
        y, carry = fn(chunk, carry, False)
        return carry, y

    _, ys = jax.lax.scan(body, cache, rest)
    n, b, f = ys.shape[:3]
    ys = jnp.swapaxes(ys, 0, 1).reshape((b, n * f) + ys.shape[3:])
    return jnp.concatenate([y0, ys.astype(y0.dtype)], axis=1)


def _run_chunks_repeated(fn, first_chunk: jax.Array, chunk: jax.Array, n: int) -> jax.Array:
    """As `_run_chunks` with ``rest`` = ``n`` copies of ``chunk`` (e.g. the black frames after the image of an I2V
    condition), computing only until the carried cache repeats.

    The encoder is causal with a finite memory (each causal conv keeps its last frames), so after enough identical
    chunks the cache it carries from one chunk to the next is bitwise the same; from then on every chunk's output
    is the last one's (same input, same state), and the loop stops and repeats it. The result is the scan's: the
    same per-chunk computation, only the repeats are copied instead of recomputed (on the Wan2.1 VAE: 5 of the 20
    chunks of an 81-frame condition are computed)."""
    y0, cache = fn(first_chunk, None, True)
    if n == 0:
        return y0
    y1, cache1 = fn(chunk, cache, False)
    ys = jnp.zeros((n,) + y1.shape, y1.dtype).at[0].set(y1)

    def same(a, b):
        return jnp.all(jnp.asarray([jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))

    def cond(state):
        i, _, done, _ = state
        return (i < n) & ~done

    def body(state):
        i, c, _, ys = state
        y, new = fn(chunk, c, False)
        return i + 1, new, same(new, c), jax.lax.dynamic_update_index_in_dim(ys, y.astype(ys.dtype), i, 0)

    i, _, _, ys = jax.lax.while_loop(cond, body, (jnp.int32(1), cache1, same(cache1, cache), ys))
    last = jax.lax.dynamic_index_in_dim(ys, i - 1, 0, keepdims=False)
    ys = jnp.where((jnp.arange(n) >= i).reshape((n,) + (1,) * y1.ndim), last[None], ys)
    b, f = y1.shape[:2]
    ys = jnp.swapaxes(ys, 0, 1).reshape((b, n * f) + ys.shape[3:])
    return jnp.concatenate([y0, ys.astype(y0.dtype)], axis=1)


class WanVAE(nnx.Module):
    """The Wan2.1 VAE. ``dtype`` is the compute dtype (fp32 for tests, bf16 on GPU); ``param_dtype``
    the storage dtype of the weights. Norms, softmax and latent (un)normalisation run in fp32.

    Constructing it directly draws every weight eagerly (slow on CPU); use `abstract_vae` + the loader
    for checkpoints and `init_vae` for random weights."""

    def __init__(
        self, cfg: VAEConfig = WAN21_VAE, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None
    ):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.dtype = dtype
        self.encoder = Encoder3d(cfg, **kw)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), padding=(0, 0, 0), **kw)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), padding=(0, 0, 0), **kw)
        self.decoder = Decoder3d(cfg, **kw)

    # ---------------------------------------------------------------- checks
    def _check_video(self, video: jax.Array) -> None:
        cfg = self.cfg
        if video.ndim != 5 or video.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"WanVAE.encode: expected video [B, F, H, W, {cfg.in_channels}] (channels-last), "
                f"got shape {tuple(video.shape)}"
            )
        _, f, h, w, _ = video.shape
        if f < 1 or (f - 1) % ENCODE_CHUNK:
            raise ValueError(f"WanVAE.encode: frame count must be 4n+1 (1, 5, 9, ..., 81), got {f}")
        s = cfg.spatial_stride
        if h % s or w % s or h == 0 or w == 0:
            raise ValueError(f"WanVAE.encode: height and width must be positive multiples of {s}, got {h}x{w}")

    def _check_latents(self, z: jax.Array) -> None:
        if z.ndim != 5 or z.shape[-1] != self.cfg.z_dim or z.shape[1] < 1:
            raise ValueError(
                f"WanVAE.decode: expected latents [B, F_lat>=1, h, w, {self.cfg.z_dim}] "
                f"(channels-last), got shape {tuple(z.shape)}"
            )

    # ---------------------------------------------------------------- encode
    def encode_raw(self, video: jax.Array) -> jax.Array:
        """Latent mean ``mu`` (not normalised), fp32 ``[B, F_lat, h, w, z_dim]``."""
        self._check_video(video)
        b, f, h, w, c = video.shape
        x = video.astype(self.dtype)
        n = (f - 1) // ENCODE_CHUNK
        rest = None
        if n:
            rest = jnp.swapaxes(x[:, 1:].reshape(b, n, ENCODE_CHUNK, h, w, c), 0, 1)
        out = _run_chunks(self.encoder, x[:, :1], rest)
        enc, _ = self.quant_conv(out)
        return enc[..., : self.cfg.z_dim].astype(jnp.float32)

    def encode_image_raw(self, image: jax.Array, num_frames: int) -> jax.Array:
        """`encode_raw` of the I2V condition video (``image`` [B, H, W, 3] in [-1, 1] as frame 0, then
        ``num_frames - 1`` black frames) without recomputing the chunks whose output repeats
        (`_run_chunks_repeated`); the same latents as ``encode_raw`` of the full video."""
        b, h, w, c = image.shape
        self._check_video(jax.ShapeDtypeStruct((b, num_frames, h, w, c), self.dtype))
        n = (num_frames - 1) // ENCODE_CHUNK
        x0 = image.astype(self.dtype)[:, None]
        out = _run_chunks_repeated(self.encoder, x0, jnp.zeros((b, ENCODE_CHUNK, h, w, c), self.dtype), n)
        enc, _ = self.quant_conv(out)
        return enc[..., : self.cfg.z_dim].astype(jnp.float32)

    def normalize(self, mu: jax.Array) -> jax.Array:
        """``(mu - mean) * (1 / std)`` per channel, as the official ``WanVAE_.encode``."""
        mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
        inv_std = 1.0 / jnp.asarray(self.cfg.latents_std, jnp.float32)
        return (mu.astype(jnp.float32) - mean) * inv_std

    def denormalize(self, latents: jax.Array) -> jax.Array:
        """``latents / (1 / std) + mean`` per channel, as the official ``WanVAE_.decode``."""
        mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
        inv_std = 1.0 / jnp.asarray(self.cfg.latents_std, jnp.float32)
        return latents.astype(jnp.float32) / inv_std + mean

    def encode(self, video: jax.Array) -> jax.Array:
        """Video ``[B, F, H, W, 3]`` in [-1, 1] -> normalised latents ``[B, F_lat, h, w, z_dim]`` (fp32)."""
        return self.normalize(self.encode_raw(video))

    # ---------------------------------------------------------------- decode
    def decode_raw(self, z: jax.Array) -> jax.Array:
        """Un-normalised latents -> video in [-1, 1] (fp32, clamped), one latent frame per step."""
        self._check_latents(z)
        x, _ = self.post_quant_conv(z.astype(self.dtype))
        rest = jnp.swapaxes(x[:, 1:], 0, 1)[:, :, None] if x.shape[1] > 1 else None
        out = _run_chunks(self.decoder, x[:, :1], rest)
        return jnp.clip(out.astype(jnp.float32), -1.0, 1.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Normalised latents ``[B, F_lat, h, w, z_dim]`` -> video ``[B, 1 + 4(F_lat-1), H, W, 3]`` in [-1, 1]."""
        self._check_latents(latents)
        return self.decode_raw(self.denormalize(latents))


def abstract_vae(cfg: VAEConfig = WAN21_VAE, *, dtype=jnp.float32, param_dtype=jnp.float32) -> WanVAE:
    """A `WanVAE` whose parameters are shape/dtype placeholders (no memory, no compute); fill it with
    `wanjax.io.vae_loader.load_vae_state_dict`."""
    return nnx.eval_shape(lambda: WanVAE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=8)
def _random_params_fn(specs: tuple[tuple[str, tuple[int, ...], Any], ...]):
    """Jitted ``key -> [param arrays]`` for the given ``(leaf name, shape, dtype)`` specs (cached per model shape)."""

    @jax.jit
    def draw(key):
        keys = jax.random.split(key, len(specs))
        out = []
        for k, (name, shape, dt) in zip(keys, specs):
            if name == "gamma":
                out.append(jnp.ones(shape, dt))
            elif name.endswith("kernel"):
                bound = 1.0 / float(np.sqrt(np.prod(shape[:-1])))
                out.append(jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(dt))
            else:
                out.append(jnp.zeros(shape, dt))
        return out

    return draw


def init_vae(cfg: VAEConfig = WAN21_VAE, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32) -> WanVAE:
    """Randomly initialised `WanVAE`, fast: all weights drawn by one jitted function with the
    ``unsafe_rbg`` PRNG (eager ``WanVAE(...)`` compiles a threefry sampler per weight shape, which takes
    tens of seconds on CPU). Kernels ~ U(+-1/sqrt(fan_in)), biases 0, norm gammas 1."""
    vae = abstract_vae(cfg, dtype=dtype, param_dtype=param_dtype)
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    specs = tuple((str(path[-1]), tuple(v.get_value().shape), jnp.dtype(v.get_value().dtype)) for path, v in flat)
    values = _random_params_fn(specs)(jax.random.key(seed, impl="unsafe_rbg"))
    for (_, var), val in zip(flat, values):
        var.set_value(val)
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


@nnx.jit
def encode_video(vae: WanVAE, video: jax.Array) -> jax.Array:
    """Jitted `WanVAE.encode` (normalised latents)."""
    return vae.encode(video)


@functools.partial(nnx.jit, static_argnames=("num_frames",))
def encode_image_video(vae: WanVAE, image: jax.Array, num_frames: int) -> jax.Array:
    """Jitted normalised latents of the I2V condition video (``image`` [B, H, W, 3] then black frames), as
    `encode_video` of that video computes them, without recomputing repeated chunks (`WanVAE.encode_image_raw`)."""
    return vae.normalize(vae.encode_image_raw(image, num_frames))


@nnx.jit
def decode_video(vae: WanVAE, latents: jax.Array) -> jax.Array:
    """Jitted `WanVAE.decode` (normalised latents in, video in [-1, 1] out)."""
    return vae.decode(latents)
