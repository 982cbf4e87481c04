"""Shared pieces of the sequence-parallel attentions: sequence padding and the per-shard PartitionSpec."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from wanjax.parallel.mesh import axis_size
from wanjax.parallel.rules import logical_to_spec


def pad_seq(x: jax.Array, length: int) -> jax.Array:
    """Zero-pad axis 1 of ``x`` [B, S, ...] to ``length`` tokens."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def head_axis(mesh: Mesh, num_heads: int) -> str | None:
    """``"tensor"`` if heads are split over it (size > 1 and divides ``num_heads``), else None (replicated)."""
    t = axis_size(mesh, "tensor")
    return "tensor" if t > 1 and num_heads % t == 0 else None


def qkv_spec(mesh: Mesh, batch: int, num_heads: int, seq_sharded: bool = True) -> P:
    """Spec of a [B, S, N, D] tensor inside the attention shard_map: batch over (data, fsdp) as far as it divides,
    tokens over ``context`` (or replicated), heads over ``tensor`` (when they divide)."""
    b = logical_to_spec(("batch",), (batch,), mesh)[0]
    s = "context" if seq_sharded and axis_size(mesh, "context") > 1 else None
    return P(b, s, head_axis(mesh, num_heads), None)


def check_qkv(fn: str, q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"{fn}: expected q [B, Sq, N, D] and k, v [B, Skv, N, D]; got q {q.shape}, k {k.shape}, v {v.shape}"
        )
