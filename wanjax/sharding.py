"""Sharding for TPU pod slices and multi-GPU hosts: mesh, logical-axis rules, sequence-parallel attention.

    mesh = make_mesh(data=2, context=-1)              # CFG's cond/uncond over "data", tokens over "context"
    forward, params = shard_dit(dit, mesh)            # params FSDP/TP-sharded by the rule table
    v = forward(params, x, t, context)                # jitted; self-attention runs as Ulysses (or ring)

    pipe = WanI2VPipeline(high, low, vae, mesh=mesh)  # the whole generation, sharded

Pieces (see docs/SHARDING.md):

* `make_mesh` - axes ("data", "fsdp", "context", "tensor"), ``-1`` = the remaining devices.
* `param_shardings` / `shard_params` - NamedShardings from `wanjax.parallel.rules` (float and quantized leaves).
* `sequence_parallel(mesh)` - context manager: every `wanjax.model.attention.attention` call traced inside runs
  sequence-parallel over ``context``: self-attention as `ulysses_attention` (heads divisible) or `ring_attention`,
  cross-attention with the query sharded and the (512 text token) keys/values replicated.
* `constrain_batch` - shard a batch (CFG's (cond, uncond) pair) over ("data", "fsdp").
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wanjax.model.attention import attention_hook
from wanjax.parallel.mesh import AXES, axis_size, batch_axes, make_mesh
from wanjax.parallel.ring import ring_attention
from wanjax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    activation_spec,
    bytes_per_device,
    logical_to_spec,
    param_logical_axes,
    param_shardings,
    param_specs,
    shard_params,
)
from wanjax.parallel.ulysses import sharded_cross_attention, ulysses_attention, ulysses_heads_ok

__all__ = [
    "AXES",
    "LOGICAL_AXIS_RULES",
    "MODES",
    "activation_spec",
    "axis_size",
    "batch_axes",
    "bytes_per_device",
    "constrain_batch",
    "logical_to_spec",
    "make_mesh",
    "param_logical_axes",
    "param_shardings",
    "param_specs",
    "replicate",
    "ring_attention",
    "sequence_parallel",
    "sequence_parallel_attention",
    "shard_dit",
    "shard_params",
    "sharded_cross_attention",
    "ulysses_attention",
    "ulysses_heads_ok",
]

MODES = ("auto", "ulysses", "ring")


def sequence_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mesh: Mesh,
    *,
    mode: str = "auto",
    backend: str | None = None,
    ring_block: int = 1024,
) -> jax.Array:
    """Attention over [B, S, N, D] with tokens sharded over ``context``.

    Self-attention (equal q/kv lengths): ``mode="ulysses"``, ``"ring"``, or ``"auto"`` (Ulysses when the heads
    divide, else ring). Cross-attention (different lengths): q sharded, k/v replicated over ``context``. Equal
    lengths are always treated as self-attention; that is correct for cross-attention as well.
    """
    if mode not in MODES:
        raise ValueError(f"sequence-parallel attention mode {mode!r}; expected one of {MODES}")
    if k.shape[1] != q.shape[1]:
        return sharded_cross_attention(q, k, v, mesh, backend=backend)
    if mode == "ring" or (mode == "auto" and not ulysses_heads_ok(mesh, q.shape[2])):
        return ring_attention(q, k, v, mesh, block=ring_block)
    return ulysses_attention(q, k, v, mesh, backend=backend)


@contextlib.contextmanager
def sequence_parallel(mesh: Mesh, mode: str = "auto", backend: str | None = None, ring_block: int = 1024):
    """Within this context, `wanjax.model.attention.attention` calls being traced run sequence-parallel on ``mesh``
    (see `sequence_parallel_attention`). Enter it around the code that *traces* (first call of a jitted function,
    or inside the jitted function itself)."""
    if mode not in MODES:
        raise ValueError(f"sequence-parallel attention mode {mode!r}; expected one of {MODES}")

    def hook(q, k, v):
        return sequence_parallel_attention(q, k, v, mesh, mode=mode, backend=backend, ring_block=ring_block)

    with attention_hook(hook):
        yield


def constrain_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """``x`` with its leading (batch) axis sharded over ("data", "fsdp") as far as they divide it (inside jit)."""
    spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicate(tree, mesh: Mesh):
    """Place every array of ``tree`` on all devices of ``mesh`` (replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_dit(model, mesh: Mesh, *, mode: str = "auto", backend: str | None = None) -> tuple[Callable, object]:
    """A jitted sharded forward of a `WanDiT` and its parameters placed on ``mesh``.

    Returns ``(forward, params)``; ``forward(params, x, t, context)`` computes ``model(x, t, context)`` with the batch
    over ("data", "fsdp"), tokens over ``context`` (sequence-parallel attention) and weights by the rule table.
    """
    graphdef, state = nnx.split(model)
    params = shard_params(state, mesh)

    def fwd(st, x, t, ctx):
        with sequence_parallel(mesh, mode=mode, backend=backend):
            x, t, ctx = constrain_batch(x, mesh), constrain_batch(t, mesh), constrain_batch(ctx, mesh)
            return constrain_batch(nnx.merge(graphdef, st)(x, t, ctx), mesh)

    return jax.jit(fwd), params


def _on_mesh(a, mesh: Mesh) -> bool:
    s = getattr(a, "sharding", None)
    return s is not None and s.device_set == set(mesh.devices.flat)


def sharded_velocity(
    velocity_fn: Callable, graphdef, mesh: Mesh, *, mode: str = "auto", backend: str | None = None
) -> Callable:
    """Jit a guided-velocity function ``velocity_fn(graphdef, params, x, y, ctx, t, guide, constrain=...)`` for
    ``mesh`` (used by `wanjax.pipeline.WanI2VPipeline` when given ``mesh=``).

    The returned ``f(params, x, y, ctx, t, guide)`` places x, y, ctx on the mesh (replicated) unless they already are,
    traces under `sequence_parallel`, passes ``constrain`` (CFG's doubled batch -> "data"), and returns the velocity
    replicated. ``params`` must already be placed (`shard_params`).
    """
    rep = NamedSharding(mesh, P())

    def traced(params, x, y, ctx, t, guide):
        with sequence_parallel(mesh, mode=mode, backend=backend):
            v = velocity_fn(graphdef, params, x, y, ctx, t, guide, constrain=lambda a: constrain_batch(a, mesh))
        return jax.lax.with_sharding_constraint(v, rep)

    jitted = jax.jit(traced)

    def call(params, x, y, ctx, t, guide):
        x, y, ctx = (a if _on_mesh(a, mesh) else jax.device_put(a, rep) for a in (x, y, ctx))
        return jitted(params, x, y, ctx, t, guide)

    return call
