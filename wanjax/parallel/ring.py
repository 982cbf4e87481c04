"""Ring attention: sequence-parallel self-attention for any head count.

Tokens are sharded over the mesh axis ``context`` (c shards). Each device keeps its query shard and passes its key/
value shard around the ring with ``ppermute`` (c - 1 hops); at every hop it folds the visiting block into a running
online softmax (fp32 max / sum / accumulator), processing queries and keys in sub-blocks of at most ``block``
tokens so no [S_local x S_local] score matrix is formed. The sequence is zero-padded so every shard holds a whole
number of equal sub-blocks; padded keys are masked by their global position, padded queries are dropped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from wanjax.parallel.common import check_qkv, pad_seq, qkv_spec
from wanjax.parallel.mesh import axis_size

F32 = jnp.float32


def ring_layout(seq_len: int, context: int, block: int) -> tuple[int, int]:
    """(sub-blocks per shard, sub-block length) for ``seq_len`` tokens over ``context`` shards."""
    per = math.ceil(seq_len / context)
    nb = math.ceil(per / block)
    return nb, math.ceil(per / nb)


def _fold_block(qb, kb, vb, key_valid, stats, scale):
    """Fold one kv shard into the running stats of all q sub-blocks.

    qb [nb, B, blk, N, D]; kb, vb [nb, B, blk, N, D]; key_valid [nb, blk]; stats (m, l [nb, B, N, blk],
    acc [nb, B, N, blk, D]).
    """

    def per_q(args):
        qi, m, l, acc = args

        def step(carry, xs):
            m, l, acc = carry
            kj, vj, valid = xs
            s = jnp.einsum("bqnd,bknd->bnqk", qi, kj, preferred_element_type=F32) * scale
            s = jnp.where(valid[None, None, None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # all keys so far masked: keep exps at 0, not NaN
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum(
                "bnqk,bknd->bnqd", p.astype(vj.dtype), vj, preferred_element_type=F32
            )
            return (m_new, l, acc), None

        return jax.lax.scan(step, (m, l, acc), (kb, vb, key_valid))[0]

    return jax.lax.map(per_q, (qb,) + tuple(stats))


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh, *, block: int = 1024) -> jax.Array:
    """Self-attention over [B, S, N, D] q, k, v (same S) with tokens sharded over ``context``; returns [B, S, N, D]
    in ``q.dtype``. Heads are additionally split over ``tensor`` when they divide it; any head count works."""
    check_qkv("ring_attention", q, k, v)
    b, s, n, d = q.shape
    if k.shape[1] != s:
        raise ValueError(f"ring_attention: self-attention needs equal q/kv lengths, got {s} and {k.shape[1]}")
    c = axis_size(mesh, "context")
    nb, blk = ring_layout(s, c, block)
    per = nb * blk
    spec = qkv_spec(mesh, b, n)
    scale = 1.0 / math.sqrt(d)
    perm = [(j, (j + 1) % c) for j in range(c)]

    def blocks(x):  # [B, per, N, D] -> [nb, B, blk, N, D]
        bl, _, nl, dl = x.shape
        return x.reshape(bl, nb, blk, nl, dl).transpose(1, 0, 2, 3, 4)

    def body(ql, kl, vl):
        me = jax.lax.axis_index("context")
        qb = blocks(ql)
        bl, nl = ql.shape[0], ql.shape[2]
        stats = (
            jnp.full((nb, bl, nl, blk), -jnp.inf, F32),
            jnp.zeros((nb, bl, nl, blk), F32),
            jnp.zeros((nb, bl, nl, blk, d), F32),
        )
        # loop carries must vary over the same mesh axes as q: those named in its spec
        varying = tuple(a for e in spec if e for a in ((e,) if isinstance(e, str) else e))
        if varying:
            stats = tuple(jax.lax.pcast(a, varying, to="varying") for a in stats)

        def fold(hop, kv, stats):
            src = (me - hop) % c  # the shard this kv block came from
            pos = src * per + jnp.arange(per)
            valid = (pos < s).reshape(nb, blk)
            return _fold_block(qb, blocks(kv[0]), blocks(kv[1]), valid, stats, scale)

        def hop(i, carry):
            kv, stats = carry
            nxt = tuple(jax.lax.ppermute(a, "context", perm) for a in kv)  # independent of the fold: can overlap
            return nxt, fold(i, kv, stats)

        kv, stats = jax.lax.fori_loop(0, c - 1, hop, ((kl, vl), stats))
        m, l, acc = fold(c - 1, kv, stats)
        out = acc / l[..., None]  # [nb, B, N, blk, D]
        return out.transpose(1, 0, 3, 2, 4).reshape(bl, per, nl, d).astype(ql.dtype)

    sp = c * per
    o = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(
        pad_seq(q, sp), pad_seq(k, sp), pad_seq(v, sp)
    )
    return o[:, :s]
