"""8-bit attention (SageAttention2-style) in plain jnp: the oracle of ``attention8_tpu`` and ``attention8_gpu``.

Non-causal softmax attention over [B, S, N, D] (scale 1/sqrt(D)), computed as the 8-bit kernels compute it:

Pre-pass (:func:`quantize_qkv`, separate so its cost can be measured on its own; inputs [B, S, N, D], outputs
head-major [B, N, S_pad, D]):

* K is smoothed: ``k - mean_tokens(k)`` per (batch, head, channel) over the valid tokens. Exact under softmax: it
  subtracts ``q . mean(k)``, the same number from every score of a query row.
* Q and K are balanced per channel (``balance_qk``, :func:`balance_channels`: a power-of-two factor per channel
  moved from one to the other; exact for every score).
* Q and the smoothed K are quantized to INT8 with one scale per block of tokens per head (``q_block`` / ``k_block``
  tokens x all D channels): ``scale = amax / 127``, codes ``rint(x / scale)`` (round half to even) in [-127, 127].
* V is quantized to FP8 e4m3 per channel: ``v_scale[d] = amax_tokens |v[:, d]| / 448``, codes ``e4m3(v / v_scale)``
  (round to nearest even, saturating).
* The token axis is zero-padded to a multiple of the blocks; padded keys are masked in the core.

Core (:func:`attention8_core`), flash-style over KV tiles of ``kv_block`` keys with FP32 statistics:

* ``S = (q8 @ k8^T)`` in int32 (exact), then ``s = float(S) * (q_scale[row] * sm_scale * log2(e)) * k_scale[col]``
  (exp2 domain; padded keys -> -inf);
* running max ``m``; ``P = exp2(s - (m - log2(448)))`` lies in (0, 448], the full e4m3 range (SageAttention's free
  x448: the small probabilities keep 3 mantissa bits instead of falling into the subnormals); the row sum ``l`` adds
  the FP32 (unrounded) ``P``, as SageAttention does, and the 448 cancels at the end;
* ``P8 = e4m3(P)``; the tile's ``P8 @ V8`` goes into a FRESH FP32 partial sum, which is added into the FP32
  accumulator ``O = O * exp2(m_old - m_new) + PV_tile`` (two-level accumulation: the tensor core's FP8 accumulator
  keeps only 13 mantissa bits, see ``../shared/reference/attention8_hopper.md`` section 1.7, so it must never carry
  the running sum across tiles);
* ``out = O / l * v_scale[d]``, cast to ``out_dtype`` (bf16).

Inside one tile the FP8 MMA accumulation is modelled as exact FP32 by default; ``fp22=True`` models the Hopper
accumulator instead (the partial sum truncated to 13 mantissa bits after every 32-key k-chunk), and
``two_level=False`` carries the running sum through that truncated accumulator over all tiles (what a kernel without
the second level would do) -- both only to measure what the two-level scheme buys.

Layer: jax + ``wanjax.numerics`` only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from wanjax.numerics.codecs import fp8_e4m3_encode

LOG2E = 1.4426950408889634
FP8_MAX = 448.0
#: log2(448): the running max is kept this much below the true max, so exp2 lands in (0, 448]
P_OFFSET = math.log2(FP8_MAX)
INT8_MAX = 127.0


@dataclasses.dataclass(frozen=True)
class Attn8Config:
    """Granularity and blocking of the 8-bit attention.

    q_block / k_block: tokens per INT8 scale of Q / of K (per head). kv_block: keys per tile of the online softmax
    (the kernels' KV tile; the two-level PV accumulation adds one FP32 partial sum per tile). smooth_k: subtract
    K's token mean. balance_qk: move per-channel magnitude between Q and K
    (``q[:, c] * b_c``, ``k[:, c] / b_c`` with ``b_c = sqrt(amax|k_c| / amax|q_c|)`` per batch, head, channel; exact
    for ``q . k``), so an outlier channel of one does not set the INT8 step of the other's block. p_offset: scale P into (0, 448] (False: P in (0, 1], as plain FP8 flash attention does).
    two_level / fp22: see the module docstring.
    """

    q_block: int = 128
    #: 256-key K scale blocks and tiles: the Hopper kernel's fastest tile (docs/BENCHMARKS.md, "8-bit attention,
    #: third round"), so the reference computes what that kernel computes
    k_block: int = 256
    kv_block: int = 256
    smooth_k: bool = True
    balance_qk: bool = True
    p_offset: bool = True
    two_level: bool = True
    fp22: bool = False

    def __post_init__(self):
        for name in ("q_block", "k_block", "kv_block"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Attn8Config.{name} must be positive, got {getattr(self, name)}")
        if (not self.two_level) and not self.fp22:
            raise ValueError("Attn8Config(two_level=False) models the truncated FP8 accumulator: set fp22=True as well")

    @property
    def k_pad(self) -> int:
        """The multiple the key axis is padded to (both the scale block and the tile)."""
        return math.lcm(self.k_block, self.kv_block)


DEFAULT = Attn8Config()


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("q", "q_scale", "k", "k_scale", "v", "v_scale"),
    meta_fields=("sq", "sk", "q_block", "k_block", "layout"),
)
@dataclasses.dataclass(frozen=True)
class QKV8:
    """Quantized attention operands (head-major, token axis padded).

    q: int8 [B, N, Sq_pad, D]; q_scale: f32 [B, N, Sq_pad / q_block]; k: int8 [B, N, Sk_pad, D] (smoothed);
    k_scale: f32 [B, N, Sk_pad / k_block]; v: float8_e4m3fn [B, N, Sk_pad, D]; v_scale: f32 [B, N, D];
    sq / sk: the valid token counts; q_block / k_block: tokens per scale. ``layout="bsnd"``: q, k and v token-major
    instead ([B, S_pad, N, D], the model's layout; made by ``quantize_qkv(..., layout="bsnd")`` for the GPU kernel,
    which reads it without a transpose); the scales keep their shapes.
    """

    q: jax.Array
    q_scale: jax.Array
    k: jax.Array
    k_scale: jax.Array
    v: jax.Array
    v_scale: jax.Array
    sq: int
    sk: int
    q_block: int
    k_block: int
    layout: str = "bnsd"

    def q_scale_tokens(self) -> jax.Array:
        """Per-row Q scales, f32 [B, N, Sq_pad]."""
        return jnp.repeat(self.q_scale, self.q_block, axis=-1)

    def k_scale_tokens(self) -> jax.Array:
        """Per-key K scales, f32 [B, N, Sk_pad]."""
        return jnp.repeat(self.k_scale, self.k_block, axis=-1)


def _pad_tokens(x, mult, axis: int = 2):
    pad = (-x.shape[axis]) % mult
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def int8_blocks(x: jax.Array, block: int, pad_to: int | None = None, token_axis: int = 2):
    """Per-(batch, head, token-block) INT8 quantization of f32 ``x`` [B, N, S, D] (``token_axis=1``: [B, S, N, D],
    the codes keep that layout).

    Returns (codes int8 in x's layout with S padded, scales f32 [B, N, S_pad / block]); S is zero-padded to a multiple
    of ``pad_to`` (default ``block``, which must divide it). An all-zero block gets scale 1 (codes 0).
    """
    pad_to = block if pad_to is None else pad_to
    if pad_to % block:
        raise ValueError(f"int8_blocks: pad_to={pad_to} must be a multiple of block={block}")
    if token_axis not in (1, 2):
        raise ValueError(f"int8_blocks: token_axis must be 1 ([B, S, N, D]) or 2 ([B, N, S, D]), got {token_axis}")
    x = _pad_tokens(x.astype(jnp.float32), pad_to, token_axis)
    shape = x.shape
    s = shape[token_axis]
    xb = x.reshape(shape[:token_axis] + (s // block, block) + shape[token_axis + 1 :])
    amax = jnp.max(jnp.abs(xb), axis=(token_axis + 1, xb.ndim - 1))  # [B, N, S/blk] or [B, S/blk, N]
    scale = jnp.where(amax > 0, amax / INT8_MAX, jnp.float32(1.0))
    codes = jnp.clip(jnp.rint(xb / jnp.expand_dims(scale, (token_axis + 1, xb.ndim - 1))), -INT8_MAX, INT8_MAX)
    if token_axis == 1:
        scale = jnp.swapaxes(scale, 1, 2)
    return codes.astype(jnp.int8).reshape(shape), scale


def balance_channels(qh: jax.Array, kh: jax.Array, token_axis: int = 2):
    """Per-channel magnitude balancing of f32 [B, N, S, D] q and k (exact for every ``q . k``): channel c of q is
    multiplied and of k divided by ``b_c = sqrt(amax_tokens|k_c| / amax_tokens|q_c|)`` relative to the median channel
    (a common factor of all channels changes nothing under per-block scales; 1 where either abs-max is zero), so an
    outlier channel ends with about the same abs-max in both. ``b_c`` is rounded to a power of two: the rescaling is
    exact in floating point and costs the kernels nothing."""
    aq = jnp.max(jnp.abs(qh), axis=token_axis, keepdims=True)
    ak = jnp.max(jnp.abs(kh), axis=token_axis, keepdims=True)
    ok = (aq > 0) & (ak > 0)
    half_log = jnp.where(ok, 0.5 * jnp.log2(jnp.where(ok, ak, 1.0) / jnp.where(ok, aq, 1.0)), 0.0)
    e = jnp.round(half_log - jnp.median(half_log, axis=3, keepdims=True))
    f = jnp.exp2(jnp.where(ok, e, 0.0))
    return qh * f, kh / f


def quantize_qkv(q: jax.Array, k: jax.Array, v: jax.Array, config: Attn8Config = DEFAULT, layout: str = "bnsd") -> QKV8:
    """The pre-pass: [B, S, N, D] q, k, v -> :class:`QKV8` (see the module docstring). ``layout="bsnd"`` keeps the
    codes token-major (no transpose; the same numbers)."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention8: q [B, Sq, N, D] and k, v [B, Sk, N, D] expected, got {q.shape}, {k.shape}, {v.shape}"
        )
    if layout not in ("bnsd", "bsnd"):
        raise ValueError(f"quantize_qkv: layout must be 'bnsd' or 'bsnd', got {layout!r}")
    f32 = jnp.float32
    ta = 1 if layout == "bsnd" else 2  # the token axis
    qh, kh, vh = (x.astype(f32) if ta == 1 else x.astype(f32).transpose(0, 2, 1, 3) for x in (q, k, v))
    sq, sk = q.shape[1], k.shape[1]
    if config.smooth_k:
        kh = kh - jnp.mean(kh, axis=ta, keepdims=True)
    if config.balance_qk:
        qh, kh = balance_channels(qh, kh, ta)
    q8, qs = int8_blocks(qh, config.q_block, token_axis=ta)
    k8, ks = int8_blocks(kh, config.k_block, config.k_pad, token_axis=ta)
    vmax = jnp.max(jnp.abs(vh), axis=ta)  # [B, N, D]
    vs = jnp.where(vmax > 0, vmax / FP8_MAX, f32(1.0))
    v8 = fp8_e4m3_encode(_pad_tokens(vh, config.k_pad, ta) / jnp.expand_dims(vs, ta))
    return QKV8(q8, qs, k8, ks, v8, vs, sq=sq, sk=sk, q_block=config.q_block, k_block=config.k_block, layout=layout)


def truncate_fp22(x: jax.Array) -> jax.Array:
    """f32 -> f32 keeping 13 mantissa bits (the low 10 cut, toward zero): the Hopper FP8-MMA accumulator."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFFC00), jnp.float32)


def _tile_pv(p8, v8, fp22: bool, acc=None):
    """P8 [B, N, q, t] @ V8 [B, N, t, D] in f32; ``fp22``: chained 32-key chunks through a truncating accumulator
    (starting from ``acc``, else zero)."""
    f32 = jnp.float32
    p, v = p8.astype(f32), v8.astype(f32)
    if not fp22:
        out = jnp.einsum("bnqk,bnkd->bnqd", p, v, precision="highest")
        return out if acc is None else acc + out
    t = p.shape[-1]
    out = jnp.zeros(p.shape[:-1] + (v.shape[-1],), f32) if acc is None else acc
    for c in range(0, t, 32):
        part = jnp.einsum("bnqk,bnkd->bnqd", p[..., c : c + 32], v[:, :, c : c + 32], precision="highest")
        out = truncate_fp22(out + part)
    return out


def attention8_core(x: QKV8, config: Attn8Config = DEFAULT, out_dtype=jnp.bfloat16) -> jax.Array:
    """The attention of quantized operands; returns [B, Sq, N, D] in ``out_dtype``."""
    if x.layout != "bnsd":
        raise ValueError(f"attention8_core: operands in layout {x.layout!r}; the reference core reads 'bnsd'")
    f32 = jnp.float32
    b, n, sqp, d = x.q.shape
    skp = x.k.shape[2]
    t = config.kv_block
    if skp % t:
        raise ValueError(f"attention8_core: padded key count {skp} is not a multiple of kv_block={t}")
    nkv = skp // t
    row = x.q_scale_tokens() * f32(LOG2E / math.sqrt(d))  # [B, N, Sq_pad]
    col = x.k_scale_tokens().reshape(b, n, nkv, t).transpose(2, 0, 1, 3)  # [nkv, B, N, t]
    kb = x.k.reshape(b, n, nkv, t, d).transpose(2, 0, 1, 3, 4)
    vb = x.v.reshape(b, n, nkv, t, d).transpose(2, 0, 1, 3, 4)
    valid = (jnp.arange(skp) < x.sk).reshape(nkv, t)
    offset = f32(P_OFFSET if config.p_offset else 0.0)

    def step(carry, xs):
        m, l, acc = carry
        k8, v8, ks, ok = xs
        s32 = jnp.einsum("bnqd,bnkd->bnqk", x.q, k8, preferred_element_type=jnp.int32)
        s = s32.astype(f32) * row[..., None] * ks[:, :, None, :]
        s = jnp.where(ok[None, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - (m_new - offset)[..., None])
        l = l * alpha + jnp.sum(p, axis=-1)
        p8 = fp8_e4m3_encode(p)
        if config.two_level:
            acc = acc * alpha[..., None] + _tile_pv(p8, v8, config.fp22)
        else:
            acc = _tile_pv(p8, v8, True, truncate_fp22(acc * alpha[..., None]))
        return (m_new, l, acc), None

    init = (jnp.full((b, n, sqp), -jnp.inf, f32), jnp.zeros((b, n, sqp), f32), jnp.zeros((b, n, sqp, d), f32))
    (_, l, acc), _ = jax.lax.scan(step, init, (kb, vb, col, valid))
    out = acc / l[..., None] * x.v_scale[:, :, None, :]
    return out[:, :, : x.sq].transpose(0, 2, 1, 3).astype(out_dtype)


def attention8_reference(q, k, v, config: Attn8Config = DEFAULT, out_dtype=jnp.bfloat16) -> jax.Array:
    """Pre-pass + core: 8-bit attention of [B, S, N, D] q, k, v; returns [B, Sq, N, D] in ``out_dtype``."""
    return attention8_core(quantize_qkv(q, k, v, config), config, out_dtype)


def attention_f32(q, k, v) -> jax.Array:
    """Exact softmax attention in f32 (materializes S x S): the yardstick of the accuracy gates."""
    f32 = jnp.float32
    s = jnp.einsum("bqnd,bknd->bnqk", q.astype(f32), k.astype(f32), precision="highest") / math.sqrt(q.shape[-1])
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bnqk,bknd->bqnd", p, v.astype(f32), precision="highest")
