"""Multi-head attention backends behind one function, `attention(q, k, v)`.

Backends (q, k, v are [B, S, N, D]; no mask; scale 1/sqrt(D)):

* ``"cudnn"``   - cuDNN flash attention via ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16/fp16).
* ``"chunked"`` - pure XLA flash-style attention: query blocks x key blocks with an online softmax, so the S x S
  matrix is never materialized (any platform; the CPU default and the fallback).
* ``"tpu"``     - the Pallas TPU flash-attention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``).
* ``"xla"``     - ``jax.nn.dot_product_attention`` with XLA's default implementation (materializes S x S; short
  sequences only, e.g. cross-attention over 512 text tokens).

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

BACKENDS = ("cudnn", "chunked", "tpu", "xla")
_OVERRIDE: str | None = None
_HOOK: contextvars.ContextVar = contextvars.ContextVar("wanjax_attention_hook", default=None)


@contextlib.contextmanager
def attention_hook(fn):
    """Route `attention` calls (those without ``backend=``) traced inside this context through ``fn(q, k, v)``."""
    token = _HOOK.set(fn)
    try:
        yield
    finally:
        _HOOK.reset(token)


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
    platform = jax.default_backend()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu" and q_len >= 1024 and kv_len >= 1024:
        return "tpu"
    if q_len * kv_len <= 4096 * 4096:
        return "xla"
    return "chunked"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str | None = None) -> jax.Array:
    """Softmax attention over [B, S, N, D] inputs; returns [B, Sq, N, D] in ``q.dtype``."""
    if backend is None and (hook := _HOOK.get()) is not None:
        return hook(q, k, v)
    if backend is None:
        backend = default_backend(q.shape[1], k.shape[1], q.dtype)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if backend == "xla":
        return _xla_attention(q, k, v)
    if backend == "chunked":
        return chunked_attention(q, k, v)
    if backend == "tpu":
        return _tpu_attention(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


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
    qb = qp.reshape(b, nq, q_block, n, d).transpose(1, 0, 3, 2, 4)            # [nq, B, N, tq, D]
    kb = kp.reshape(b, nk, kv_block, n, d).transpose(1, 0, 3, 2, 4)           # [nk, B, N, tk, D]
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
            acc = acc * corr[..., None] + jnp.einsum("bnqk,bnkd->bnqd", p.astype(vj.dtype), vj,
                                                     preferred_element_type=jnp.float32)
            return (m_new, l, acc), None

        init = (jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(qi.shape[:-1], jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, kv_valid))
        return (acc / l[..., None]).astype(q.dtype)

    out = jax.lax.map(one_q_block, qb)                                        # [nq, B, N, tq, D]
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * q_block, n, d)
    return out[:, :sq]


def _tpu_attention(q, k, v):
    """Pallas TPU flash attention (expects [B, N, S, D]); verified only through interpret-free tracing here."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa  # TPU-only import

    scale = 1.0 / math.sqrt(q.shape[-1])
    o = tpu_fa.flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                               sm_scale=scale)
    return o.transpose(0, 2, 1, 3)
