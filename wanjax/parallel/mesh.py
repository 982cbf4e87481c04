"""Device mesh for wanjax: axes ("data", "fsdp", "context", "tensor").

* ``data``    - independent samples; CFG's (cond, uncond) pair is split over it.
* ``fsdp``    - weights sharded (ZeRO-3 style) on their embed axis; also a batch axis when the batch allows.
* ``context`` - sequence parallelism: activations are sharded along the token axis; self-attention runs as Ulysses
  (all-to-all over heads) or ring attention. Weights are FSDP-sharded over it as well (as maxdiffusion does).
* ``tensor``  - tensor parallelism over attention heads and the FFN hidden axis.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "context", "tensor")
#: Mesh axes over which the batch is split, in order of preference.
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    data: int = 1, fsdp: int = 1, context: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A `Mesh` with axes ``("data", "fsdp", "context", "tensor")`` (all ``Auto``, i.e. GSPMD-partitioned under jit).

    Exactly one size may be ``-1``: it takes all remaining devices. ``devices`` defaults to ``jax.devices()``; on
    TPU and GPU the device order follows ``jax.make_mesh`` (physical topology), so the innermost axes (``tensor``,
    ``context``) land on the fastest links.
    """
    sizes = [data, fsdp, context, tensor]
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs)
    if any((not isinstance(s, int)) or s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"make_mesh: sizes must be positive ints or -1, got data={data}, fsdp={fsdp}, "
            f"context={context}, tensor={tensor}"
        )
    auto = [i for i, s in enumerate(sizes) if s == -1]
    if len(auto) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if auto:
        if n % known:
            raise ValueError(
                f"make_mesh: {n} devices are not divisible by the fixed axis sizes "
                f"{dict((a, s) for a, s in zip(AXES, sizes) if s != -1)} (product {known})"
            )
        sizes[auto[0]] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"make_mesh: axis sizes {dict(zip(AXES, sizes))} multiply to {math.prod(sizes)}, but there are {n} devices"
        )
    types = (AxisType.Auto,) * len(AXES)
    if devices is None:
        return jax.make_mesh(tuple(sizes), AXES, axis_types=types)
    return jax.make_mesh(tuple(sizes), AXES, axis_types=types, devices=devs)


def axis_size(mesh: Mesh, name: str) -> int:
    """Size of mesh axis ``name`` (1 if the mesh has no such axis)."""
    return int(mesh.shape.get(name, 1))


def batch_axes(mesh: Mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes (from ``BATCH_AXES``, in order) a batch of ``batch`` samples is split over.

    An axis is used only if it has size > 1 and the running product still divides ``batch``; e.g. batch 2 on
    data=2, fsdp=2 is split over ``("data",)`` and replicated over ``fsdp``.
    """
    used, prod = [], 1
    for a in BATCH_AXES:
        s = axis_size(mesh, a)
        if s > 1 and batch % (prod * s) == 0:
            used.append(a)
            prod *= s
    return tuple(used)
