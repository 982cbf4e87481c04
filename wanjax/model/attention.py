"""Multi-head attention backends behind one function, `attention(q, k, v)`.

Backends (q, k, v are [B, S, N, D]; no mask; scale 1/sqrt(D)):

* ``"cudnn"``   - cuDNN flash attention via ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16/fp16).
* ``"chunked"`` - pure XLA flash-style attention: query blocks x key blocks with an online softmax, so the S x S
  matrix is never materialized (any platform; the CPU default and the fallback).
* ``"tpu"``     - the Pallas TPU flash-attention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``).
* ``"xla"``     - ``jax.nn.dot_product_attention`` with XLA's default implementation (materializes S x S; short
  sequences only, e.g. cross-attention over 512 text tokens).
* ``"cudnn_fp8"`` - cuDNN FP8 (e4m3) flash attention (`cudnn_fp8_attention`; Hopper or newer, never automatic):
  q, k, v cast to float8_e4m3fn with per-tensor scales from their abs-max, softmax probabilities and the output
  in e4m3 as well; output returned in ``q.dtype``.
* ``"fp8_reference"`` - `fp8_attention_reference`: the same FP8 numerics in plain jnp (materializes S x S; any
  platform; used to predict the FP8 error on CPU).
* ``"attn8"`` - accurate 8-bit attention (INT8 QK^T with per-block scales after smoothing K, FP8 PV with per-channel
  V scales and two-level FP32 accumulation; ``wanjax.kernels.attention8``; never automatic). For self-attention
  only: a call whose key length differs from its query length (cross-attention over the text tokens) runs on the
  automatic backend instead, and so does any call passing ``self_attention=False``. The model layer may not import
  kernels, so the implementation is registered from above: ``register_attention_backend("attn8",
  wanjax.kernels.attention8.attention8)`` (until then selecting it raises a RuntimeError saying so). That function
  runs the jnp reference on CPU, the Pallas TPU kernel on TPU and refuses on GPUs until its Hopper kernel has run.

* ``"auto8"`` - ``"attn8"`` where it is measured faster than cuDNN BF16: self-attention on a Hopper GPU (compute
  capability 9.x) over at most :data:`ATTN8_AUTO_MAX_TOKENS` tokens, with ``"attn8"`` registered; the automatic
  backend everywhere else (longer sequences, cross-attention, other GPUs, CPU, TPU). The W4A4 ``default`` recipe
  asks for it. Measured on an H100 (docs/BENCHMARKS.md, "8-bit attention, third round" and "Seventh session"):
  attn8 with its pre-pass is 1.36x cuDNN BF16 at 32,760 tokens (480p, 81 frames) and 0.96x at 75,600 (720p).

Selection is automatic (`default_backend`) and can be overridden per call (``backend=``), process-wide with
`set_attention_backend`, or by the environment variable ``WANJAX_ATTENTION``.

`attention_hook(fn)` routes every ``attention(q, k, v)`` call without an explicit ``backend`` traced inside the
``with`` block through ``fn(q, k, v)`` (`wanjax.sharding.sequence_parallel` uses it to run sequence-parallel
attention over a mesh); ``fn`` calls `attention` with an explicit ``backend`` for the local computation.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os

import jax
import jax.numpy as jnp

BACKENDS = ("cudnn", "chunked", "tpu", "xla", "cudnn_fp8", "fp8_reference", "attn8", "auto8")
#: ``"auto8"`` runs attn8 up to this many tokens: between the 32,760 of 480p (attn8 1.36x cuDNN BF16 on an H100) and
#: the 75,600 of 720p (0.96x), where the crossover was not measured
ATTN8_AUTO_MAX_TOKENS = 40_960
#: backends implemented outside the model layer and registered with `register_attention_backend`
PLUGGABLE = ("attn8",)
_OVERRIDE: str | None = None
_REGISTERED: dict = {}
_HOOK: contextvars.ContextVar = contextvars.ContextVar("wanjax_attention_hook", default=None)


@contextlib.contextmanager
def attention_hook(fn):
    """Route `attention` calls (those without ``backend=``) traced inside this context through ``fn(q, k, v)``."""
    token = _HOOK.set(fn)
    try:
        yield
    finally:
        _HOOK.reset(token)


def register_attention_backend(name: str, fn) -> None:
    """Provide the implementation ``fn(q, k, v) -> o`` of a pluggable backend (``PLUGGABLE``; ``fn=None`` removes
    it). The app layer registers ``"attn8"`` with ``wanjax.kernels.attention8.attention8``."""
    if name not in PLUGGABLE:
        raise ValueError(f"register_attention_backend: {name!r} is not pluggable; expected one of {PLUGGABLE}")
    if fn is None:
        _REGISTERED.pop(name, None)
    else:
        _REGISTERED[name] = fn


def set_attention_backend(name: str | None) -> None:
    """Force a backend for all subsequent traces (``None`` restores automatic selection)."""
    global _OVERRIDE
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    _OVERRIDE = name


def default_backend(q_len: int, kv_len: int, dtype) -> str:
    """The backend used when none is forced."""
    forced = _OVERRIDE or os.environ.get("WANJAX_ATTENTION") or None
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"WANJAX_ATTENTION={forced!r}; expected one of {BACKENDS}")
        return forced
    return _automatic_backend(q_len, kv_len, dtype)


def _automatic_backend(q_len: int, kv_len: int, dtype) -> str:
    platform = jax.default_backend()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu" and q_len >= 1024 and kv_len >= 1024:
        return "tpu"
    if q_len * kv_len <= 4096 * 4096:
        return "xla"
    return "chunked"


def _hopper() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def auto8_backend(q_len: int, kv_len: int, dtype, self_attention: bool | None = None) -> str:
    """What ``"auto8"`` runs for these shapes: ``"attn8"`` on Hopper for self-attention up to
    :data:`ATTN8_AUTO_MAX_TOKENS` tokens (when registered), else the automatic backend."""
    self_attn = self_attention if self_attention is not None else q_len == kv_len
    if self_attn and q_len <= ATTN8_AUTO_MAX_TOKENS and "attn8" in _REGISTERED and _hopper():
        return "attn8"
    return _automatic_backend(q_len, kv_len, dtype)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str | None = None, self_attention: bool | None = None
) -> jax.Array:
    """Softmax attention over [B, S, N, D] inputs; returns [B, Sq, N, D] in ``q.dtype``.

    ``self_attention``: whether q, k, v come from the same tokens (None: assumed when the query and key lengths
    agree); only the ``"attn8"`` backend looks at it (cross-attention stays on the automatic backend)."""
    if backend is None and (hook := _HOOK.get()) is not None:
        return hook(q, k, v)
    if backend is None:
        backend = default_backend(q.shape[1], k.shape[1], q.dtype)
    if backend == "auto8":
        backend = auto8_backend(q.shape[1], k.shape[1], q.dtype, self_attention)
    if backend == "attn8":
        if self_attention is False or (self_attention is None and q.shape[1] != k.shape[1]):
            backend = _automatic_backend(q.shape[1], k.shape[1], q.dtype)
        else:
            return _registered("attn8")(q, k, v).astype(q.dtype)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if backend == "xla":
        return _xla_attention(q, k, v)
    if backend == "chunked":
        return chunked_attention(q, k, v)
    if backend == "tpu":
        return _tpu_attention(q, k, v)
    if backend == "cudnn_fp8":
        return cudnn_fp8_attention(q, k, v)
    if backend == "fp8_reference":
        return fp8_attention_reference(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _registered(name):
    fn = _REGISTERED.get(name)
    if fn is None:
        raise RuntimeError(
            f"attention backend {name!r} is not registered in this process: its implementation lives in "
            f"wanjax.kernels (which the model layer may not import); call wanjax.model.attention."
            f"register_attention_backend({name!r}, wanjax.kernels.attention8.attention8) first"
        )
    return fn


def _xla_attention(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bnqk,bknd->bqnd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.astype(q.dtype)


def _pad_to(x, axis, mult):
    n = x.shape[axis]
    pad = (-n) % mult
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("q_block", "kv_block"))
def chunked_attention(q, k, v, q_block: int = 1024, kv_block: int = 1024):
    """Flash-style attention in plain XLA: scan over key blocks with a running max/sum (fp32 statistics)."""
    b, sq, n, d = q.shape
    skv = k.shape[1]
    q_block = min(q_block, sq)
    kv_block = min(kv_block, skv)
    scale = 1.0 / math.sqrt(d)
    qp = _pad_to(q, 1, q_block)
    kp = _pad_to(k, 1, kv_block)
    vp = _pad_to(v, 1, kv_block)
    nq, nk = qp.shape[1] // q_block, kp.shape[1] // kv_block
    qb = qp.reshape(b, nq, q_block, n, d).transpose(1, 0, 3, 2, 4)  # [nq, B, N, tq, D]
    kb = kp.reshape(b, nk, kv_block, n, d).transpose(1, 0, 3, 2, 4)  # [nk, B, N, tk, D]
    vb = vp.reshape(b, nk, kv_block, n, d).transpose(1, 0, 3, 2, 4)
    kv_valid = (jnp.arange(nk * kv_block) < skv).reshape(nk, kv_block)

    def one_q_block(qi):
        def step(carry, xs):
            m, l, acc = carry
            kj, vj, valid = xs
            s = jnp.einsum("bnqd,bnkd->bnqk", qi, kj, preferred_element_type=jnp.float32) * scale
            s = jnp.where(valid[None, None, None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum(
                "bnqk,bnkd->bnqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
            )
            return (m_new, l, acc), None

        init = (
            jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32),
            jnp.zeros(qi.shape[:-1], jnp.float32),
            jnp.zeros(qi.shape, jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, kv_valid))
        return (acc / l[..., None]).astype(q.dtype)

    out = jax.lax.map(one_q_block, qb)  # [nq, B, N, tq, D]
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * q_block, n, d)
    return out[:, :sq]


def _tpu_attention(q, k, v):
    """Pallas TPU flash attention (expects [B, N, S, D]); verified only through interpret-free tracing here."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa  # TPU-only import

    scale = 1.0 / math.sqrt(q.shape[-1])
    o = tpu_fa.flash_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), sm_scale=scale
    )
    return o.transpose(0, 2, 1, 3)


# ------------------------------------------------------------------------------------------------ FP8 attention
#: largest finite float8_e4m3fn value
FP8_MAX = 448.0
#: ``scale_s``: the softmax probabilities (<= 1) are multiplied by this before the e4m3 cast (max 1 -> 448)
FP8_P_SCALE = FP8_MAX
#: the output is cast to e4m3 with ``scale_o = FP8_MAX / (FP8_O_HEADROOM * amax(v))``: |o| <= amax(v) up to the
#: rounding of the probabilities, so 2x headroom keeps it from saturating
FP8_O_HEADROOM = 2.0
_FP8_SCALE_KEYS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o", "descale_o")


def _amax(x):
    return jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))), jnp.float32(1e-30))


def fp8_attention_scales(q, k, v, p_scale: float | None = None) -> dict:
    """Per-tensor FP8 scale factors of one attention call, float32 scalars of shape ``(1, 1, 1, 1)``.

    ``scale_x = FP8_MAX / amax(x)`` maps ``x`` onto the e4m3 range (``x * scale_x`` is cast), ``descale_x =
    amax(x) / FP8_MAX`` undoes it; ``scale_s`` / ``descale_s`` for the probabilities (``FP8_P_SCALE``),
    ``scale_o`` / ``descale_o`` for the output. (cuDNN's FP8 attention takes whole-tensor scales only: no per-head
    scales through this API.) ``p_scale`` overrides ``FP8_P_SCALE``.
    """
    ps = FP8_P_SCALE if p_scale is None else float(p_scale)
    one = lambda a: jnp.reshape(jnp.asarray(a, jnp.float32), (1, 1, 1, 1))
    aq, ak, av = _amax(q), _amax(k), _amax(v)
    out = {
        "scale_q": one(FP8_MAX / aq),
        "scale_k": one(FP8_MAX / ak),
        "scale_v": one(FP8_MAX / av),
        "descale_q": one(aq / FP8_MAX),
        "descale_k": one(ak / FP8_MAX),
        "descale_v": one(av / FP8_MAX),
        "scale_s": one(ps),
        "descale_s": one(1.0 / ps),
    }
    out["scale_o"] = one(FP8_MAX / (FP8_O_HEADROOM * av))
    out["descale_o"] = one(FP8_O_HEADROOM * av / FP8_MAX)
    return out


def to_fp8(x, scale):
    """``x * scale`` saturated to +-FP8_MAX and cast (round to nearest even) to float8_e4m3fn."""
    y = x.astype(jnp.float32) * jnp.reshape(scale, ())
    return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def _fp8_check(q, k, v):
    d = q.shape[-1]
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"cudnn_fp8 attention expects [B, S, N, D] q/k/v, got {q.shape}, {k.shape}, {v.shape}")
    if d % 16 or d > 256 or k.shape[-1] != d or v.shape[-1] != d:
        raise NotImplementedError(
            f"cudnn_fp8 attention needs one head dim, a multiple of 16 and <= 256 (cuDNN FP8 "
            f"flash attention); got q/k/v head dims {d}, {k.shape[-1]}, {v.shape[-1]}"
        )
    if q.shape[2] != k.shape[2]:
        raise NotImplementedError(f"cudnn_fp8 attention: q and k/v head counts differ ({q.shape[2]} vs {k.shape[2]})")


def _require_fp8_gpu():
    platform = jax.default_backend()
    if platform != "gpu":
        raise RuntimeError(
            f"attention backend 'cudnn_fp8' needs an NVIDIA GPU (Hopper sm_90 or newer, cuDNN >= 9.1); "
            f"this process runs on {platform!r}. Use 'cudnn'/'chunked', or 'fp8_reference' for the "
            f"same FP8 numerics in plain jnp."
        )
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if cc is not None and tuple(int(x) for x in str(cc).split(".")[:2]) < (9, 0):
        raise RuntimeError(
            f"attention backend 'cudnn_fp8' needs compute capability >= 9.0 (Hopper); "
            f"{getattr(dev, 'device_kind', dev)} has {cc}"
        )


def cudnn_fp8_attention(q, k, v, *, check_platform: bool = True, p_scale: float | None = None):
    """cuDNN FP8 flash attention (forward only) on [B, S, N, D] inputs; returns [B, Sq, N, D] in ``q.dtype``.

    Numerics (cuDNN's SDPA-FP8 graph, ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(...,
    use_fp8=True)``, custom call ``__cudnn$fmhaSoftmaxF8``): q, k, v are cast to e4m3 with the per-tensor scales
    of `fp8_attention_scales`; ``S = (q8 k8^T) * descale_q * descale_k / sqrt(D)`` in fp32; ``P = softmax(S)``;
    ``P * scale_s`` is cast to e4m3; ``O = (P8 v8) * descale_s * descale_v * scale_o`` is cast to e4m3 (the
    kernel's output dtype is the input dtype); we return ``O8 * descale_o`` in ``q.dtype``.
    `fp8_attention_reference` is the same computation in jnp. The scale computation (three abs-max reductions
    and casts) is plain XLA around the custom call.

    ``check_platform=False`` skips the GPU check (only for lowering tests on a CPU host). ``p_scale``: the
    probabilities' scale before their e4m3 cast (default ``FP8_P_SCALE``).
    """
    from jax._src.cudnn import fused_attention_stablehlo as fa

    _fp8_check(q, k, v)
    if check_platform:
        _require_fp8_gpu()
    sc = fp8_attention_scales(q, k, v, p_scale)
    zero = jnp.zeros((1, 1, 1, 1), jnp.float32)
    params = {key: zero for key in fa.fp8_params_keys}  # backward-only entries are unused by the forward
    params.update({key: sc[key] for key in _FP8_SCALE_KEYS})
    o8, _amax_s, _amax_o = fa.dot_product_attention(
        to_fp8(q, sc["scale_q"]),
        to_fp8(k, sc["scale_k"]),
        to_fp8(v, sc["scale_v"]),
        fp8_params=params,
        scale=1.0 / math.sqrt(q.shape[-1]),
        mask_type=fa.MaskType.NO_MASK,
        qkv_layout="BTNH",
        use_fp8=True,
    )
    return (o8.astype(jnp.float32) * jnp.reshape(sc["descale_o"], ())).astype(q.dtype)


def fp8_attention_reference(
    q, k, v, *, p_mode: str = "unnormalized", scales: dict | None = None, quantize_output: bool = True
):
    """The FP8 attention numerics of `cudnn_fp8_attention` in plain jnp (fp32 math; materializes S x S).

    q, k, v are quantized to e4m3 and dequantized with the same per-tensor scales (``scales`` from
    `fp8_attention_scales` of the FULL tensors, e.g. when ``q`` is a subset of the query rows; default: computed
    from the arguments). The probabilities are rounded to e4m3 after multiplying by ``scale_s``:

    * ``p_mode="unnormalized"`` (flash-attention style, the default prediction): ``exp(s - rowmax)`` (max 1) is
      rounded, and ``P8 v`` is divided by the fp32 row sum of the unrounded exponentials;
    * ``p_mode="normalized"`` (the cuDNN graph's literal reading): the normalized softmax is rounded (small
      probabilities at long sequences fall into the e4m3 subnormals).

    Which one cuDNN's kernel does is not documented; bench/attention_fp8.py compares both predictions with the
    kernel. ``quantize_output``: round the output to e4m3 with ``scale_o`` as the kernel does.
    """
    if p_mode not in ("unnormalized", "normalized"):
        raise ValueError(f"p_mode must be 'unnormalized' or 'normalized', got {p_mode!r}")
    sc = fp8_attention_scales(q, k, v) if scales is None else scales
    f32 = jnp.float32
    deq = lambda x, s, d: to_fp8(x, sc[s]).astype(f32) * jnp.reshape(sc[d], ())
    qd, kd, vd = deq(q, "scale_q", "descale_q"), deq(k, "scale_k", "descale_k"), deq(v, "scale_v", "descale_v")
    s = jnp.einsum("bqnd,bknd->bnqk", qd, kd, precision="highest") / math.sqrt(q.shape[-1])
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    l = jnp.sum(e, axis=-1, keepdims=True)
    if p_mode == "unnormalized":
        p8 = deq(e, "scale_s", "descale_s")
        o = jnp.einsum("bnqk,bknd->bnqd", p8, vd, precision="highest") / l
    else:
        p8 = deq(e / l, "scale_s", "descale_s")
        o = jnp.einsum("bnqk,bknd->bnqd", p8, vd, precision="highest")
    o = o.transpose(0, 2, 1, 3)
    if quantize_output:
        o = deq(o, "scale_o", "descale_o")
    return o.astype(q.dtype)


def reference_attention_f32(q, k, v):
    """Exact softmax attention in fp32 (materializes S x S): the yardstick of the FP8 error measurements."""
    f32 = jnp.float32
    s = jnp.einsum("bqnd,bknd->bnqk", q.astype(f32), k.astype(f32), precision="highest") / math.sqrt(q.shape[-1])
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bnqk,bknd->bqnd", p, v.astype(f32), precision="highest")
