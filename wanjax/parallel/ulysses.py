"""Ulysses sequence-parallel attention (all-to-all over heads) and sequence-sharded cross-attention.

Tokens are sharded over the mesh axis ``context`` (c shards). Ulysses exchanges, with one all-to-all per tensor,
the sequence shard of every head for all tokens of N/c heads, runs the ordinary local attention backend
(`wanjax.model.attention.attention`), and exchanges back. Requires the per-device head count (N, or N/tensor when
heads are also split over ``tensor``) to be divisible by c; `wanjax.parallel.ring` covers the other cases.

The sequence is zero-padded to a multiple of c; padded keys are dropped before the local attention (after the
all-to-all every device holds the full, ordered sequence), so results do not change.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh

from wanjax.model import attention as attn_mod
from wanjax.parallel.common import check_qkv, head_axis, pad_seq, qkv_spec
from wanjax.parallel.mesh import axis_size


def ulysses_heads_ok(mesh: Mesh, num_heads: int) -> bool:
    """Whether Ulysses can run: the heads per ``tensor`` shard divide evenly over ``context``."""
    c = axis_size(mesh, "context")
    t = axis_size(mesh, "tensor") if head_axis(mesh, num_heads) else 1
    return (num_heads // t) % c == 0


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh, *, backend: str | None = None) -> jax.Array:
    """Self-attention over [B, S, N, D] q, k, v (same S) with tokens sharded over ``context``; returns [B, S, N, D].

    Call inside ``jax.jit`` (or eagerly) with global arrays; sharding is applied here. ``backend`` picks the local
    attention backend (default: `wanjax.model.attention.default_backend` for the local shapes).
    """
    check_qkv("ulysses_attention", q, k, v)
    b, s, n, _ = q.shape
    if k.shape[1] != s:
        raise ValueError(f"ulysses_attention: self-attention needs equal q/kv lengths, got {s} and {k.shape[1]}")
    c = axis_size(mesh, "context")
    if not ulysses_heads_ok(mesh, n):
        t = axis_size(mesh, "tensor") if head_axis(mesh, n) else 1
        raise ValueError(
            f"ulysses_attention: {n} heads / tensor {t} = {n // t} heads per shard are not divisible "
            f"by context={c}; use ring attention (mode='ring' or 'auto')"
        )
    sp = math.ceil(s / c) * c
    spec = qkv_spec(mesh, b, n)

    def body(ql, kl, vl):
        ql, kl, vl = (jax.lax.all_to_all(a, "context", 2, 1, tiled=True) for a in (ql, kl, vl))
        kl, vl = kl[:, :s], vl[:, :s]  # drop padded keys: the full sequence is local now
        be = backend or attn_mod.default_backend(ql.shape[1], kl.shape[1], ql.dtype)
        o = attn_mod.attention(ql, kl, vl, backend=be)
        return jax.lax.all_to_all(o, "context", 1, 2, tiled=True)

    # check_vma=False: local backends (scans with replicated initial carries, Pallas/cuDNN calls) are not
    # annotated for shard_map's varying-axes types; the body has no cross-device semantics beyond the all-to-alls.
    o = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        pad_seq(q, sp), pad_seq(k, sp), pad_seq(v, sp)
    )
    return o[:, :s]


def sharded_cross_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh, *, backend: str | None = None
) -> jax.Array:
    """Attention with q [B, S, N, D] sharded over ``context`` and k, v [B, L, N, D] (e.g. 512 text tokens)
    replicated over it: no communication, each device attends its query shard to all keys."""
    check_qkv("sharded_cross_attention", q, k, v)
    b, s, n, _ = q.shape
    sp = math.ceil(s / axis_size(mesh, "context")) * axis_size(mesh, "context")
    qs = qkv_spec(mesh, b, n)
    kvs = qkv_spec(mesh, b, n, seq_sharded=False)

    def body(ql, kl, vl):
        be = backend or attn_mod.default_backend(ql.shape[1], kl.shape[1], ql.dtype)
        return attn_mod.attention(ql, kl, vl, backend=be)

    o = jax.shard_map(body, mesh=mesh, in_specs=(qs, kvs, kvs), out_specs=qs, check_vma=False)(pad_seq(q, sp), k, v)
    return o[:, :s]
