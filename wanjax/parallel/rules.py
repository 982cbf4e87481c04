"""Logical-axis rules: which mesh axes each parameter and activation dimension is sharded over.

Every parameter leaf of a `WanDiT` (and of its quantized form) is named by its dotted path, e.g.
``blocks.self_attn.q.kernel`` or ``blocks.ffn.fc1.qweight.codes``. Its dimensions get *logical* names from two
tables, and `LOGICAL_AXIS_RULES` maps logical names to mesh axes:

* `LINEAR_AXES`: for every dense layer, the logical names of its input (K) and output (N) features, e.g. attention
  q/k/v are ``("embed", "heads")``, the FFN up-projection ``("embed", "mlp")``, the out-projections ``(.., "embed")``.
* `LINEAR_LEAF_AXES`: how each leaf of a (possibly quantized) Linear uses K and N: ``kernel`` [K, N], ``bias`` [N],
  packed ``qweight`` codes [N, K/2] and ``scales`` [N, K/g], low-rank ``down`` [K, r] / ``up`` [r, N], ``smooth``
  [K]. A quantized weight is thereby sharded along the same N/K axes as the float kernel it replaces.
* Leaves under ``blocks.`` carry the scan-stacked leading ``layers`` axis (never sharded).

Defaults (as maxdiffusion's Wan config): ``embed -> (fsdp, context)`` (FSDP over both), ``heads``/``mlp``/``norm`` ->
``tensor``; activations ``batch -> (data, fsdp)``, ``length -> context``, ``act_heads -> tensor``.

A dimension keeps the longest prefix of its mesh axes whose size product divides it (so every spec is valid for
every mesh); a mesh axis is used at most once per array.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wanjax.model.names import BLOCK_LINEARS, FUSED_LINEARS

Logical = tuple  # tuple[str | None, ...]

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "layers": (),
    "embed": ("fsdp", "context"),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": ("tensor",),
    # activations
    "batch": ("data", "fsdp"),
    "length": ("context",),
    "act_heads": ("tensor",),
    "act_embed": (),
}

#: (K, N) logical axes of a block Linear (`wanjax.model.names.BLOCK_LINEARS`) by its last name: the attention
#: projections q/k/v map embed -> heads and o back, the FFN embed -> mlp -> embed.
BLOCK_LINEAR_AXES: dict[str, tuple[str | None, str | None]] = {
    "q": ("embed", "heads"),
    "k": ("embed", "heads"),
    "v": ("embed", "heads"),
    "o": ("heads", "embed"),
    "fc1": ("embed", "mlp"),
    "fc2": ("mlp", "embed"),
}

#: (regex on the Linear's path, (K logical axis, N logical axis)); first match wins.
LINEAR_AXES: tuple[tuple[str, tuple[str | None, str | None]], ...] = (
    (r"patch_embedding", (None, "embed")),
    (r"text_embedding\.fc1", (None, "embed")),
    (r"text_embedding\.fc2", ("mlp", "embed")),
    (r"time_embedding\.fc1", (None, "embed")),
    (r"time_embedding\.fc2", ("mlp", "embed")),
    (r"time_projection", ("embed", "mlp")),
    *((re.escape(p), BLOCK_LINEAR_AXES[p.rpartition(".")[2]]) for p in BLOCK_LINEARS),
    # a fused q/k/v (`wanjax.model.names.FUSED_LINEARS`, recipe option fuse_qkv): its N = [q | k | v] stays whole
    # (contiguous shards of it would not follow the heads of each part)
    *((re.escape(p), ("embed", None)) for p in FUSED_LINEARS),
    (r"head\.head", ("embed", None)),
)

#: Leaf name inside a Linear -> its dims as "K", "N" or None (replicated). Extra trailing dims are replicated.
LINEAR_LEAF_AXES: dict[str, tuple[str | None, ...]] = {
    "kernel": ("K", "N"),
    "bias": ("N",),
    "qweight": ("N", "K"),  # packed codes stored directly under the Linear
    "qweight.codes": ("N", "K"),  # `wanjax.quant.QuantizedTensor` fields
    "qweight.scales": ("N", "K"),
    "qweight.tensor_scale": (),
    "scale": ("N",),
    "wscale": ("N", "K"),  # QLinear's weight scales [N, K/g] (per channel: [N, 1])
    "wtensor_scale": (),
    "kweight": ("N", "K"),  # QLinear's kernel-ready weights (e4m3 / int8 [N, K]) and row scales
    "kscale": ("N",),
    "down": ("K", None),
    "up": (None, "N"),
    "smooth": ("K",),
    "rot_signs": ("K",),
}

#: Non-Linear parameters: (regex on the full path, logical axes after the optional layers axis).
OTHER_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"blocks\.modulation", (None, None, "embed")),
    (r"head\.modulation", (None, None, "embed")),
    (r"blocks\.(self_attn|cross_attn)\.norm_(q|k)\.scale", ("norm",)),
    (r"blocks\.norm3\.(scale|bias)", (None,)),
)

#: Unknown leaves with at most this many elements per layer are replicated instead of raising.
SMALL_LEAF = 1 << 16

_LINEAR_RE = [(re.compile(rf"^(?:{pat})\.(?P<leaf>.+)$"), axes) for pat, axes in LINEAR_AXES]
_OTHER_RE = [(re.compile(rf"^(?:{pat})$"), axes) for pat, axes in OTHER_AXES]


def path_str(path: Sequence[Any]) -> str:
    """Dotted name of a pytree key path (a trailing nnx ``Variable.value`` key is dropped)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return ".".join(parts)


def param_logical_axes(path: str, shape: Sequence[int]) -> Logical:
    """Logical axis names of the parameter leaf at dotted ``path`` with ``shape`` (one name or None per dim).

    Raises ValueError for an unknown leaf with more than `SMALL_LEAF` elements per layer (unknown small leaves,
    e.g. per-bin tables, are replicated).
    """
    shape = tuple(shape)
    lead: tuple = ("layers",) if path.startswith("blocks.") else ()
    rest = shape[len(lead) :]
    axes: tuple | None = None
    for rx, (k_ax, n_ax) in _LINEAR_RE:
        m = rx.match(path)
        if m and m.group("leaf") in LINEAR_LEAF_AXES:
            kn = {"K": k_ax, "N": n_ax, None: None}
            axes = tuple(kn[a] for a in LINEAR_LEAF_AXES[m.group("leaf")])
            break
    if axes is None:
        for rx, ax in _OTHER_RE:
            if rx.match(path):
                axes = ax
                break
    if axes is None:
        if math.prod(rest) <= SMALL_LEAF:
            return (None,) * len(shape)
        raise ValueError(
            f"no sharding rule for parameter {path!r} with shape {shape} ({math.prod(rest)} elements "
            f"per layer > {SMALL_LEAF}); add it to wanjax.parallel.rules.LINEAR_LEAF_AXES or OTHER_AXES"
        )
    if len(rest) < len(axes):
        raise ValueError(
            f"parameter {path!r}: rule expects at least {len(lead) + len(axes)} dims {lead + axes}, got shape {shape}"
        )
    return lead + axes + (None,) * (len(rest) - len(axes))


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None
) -> P:
    """PartitionSpec for an array of ``shape`` whose dims have the ``logical`` names.

    Each dim takes the longest prefix of its rule's mesh axes (size > 1, not used by an earlier dim) whose size
    product divides the dim, so the result is always valid for ``mesh``.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        cands = [a for a in rules[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
        while cands and dim % math.prod(mesh.shape[a] for a in cands):
            cands.pop()
        used.update(cands)
        out.append(None if not cands else cands[0] if len(cands) == 1 else tuple(cands))
    return P(*out)


def _map_params(fn, params):
    return jax.tree_util.tree_map_with_path(lambda p, leaf: fn(path_str(p), leaf), params)


def param_specs(params, mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None):
    """Tree (same structure as ``params``; arrays or ShapeDtypeStructs) of PartitionSpecs."""
    return _map_params(lambda p, a: logical_to_spec(param_logical_axes(p, a.shape), a.shape, mesh, rules), params)


def param_shardings(abstract_params, mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None):
    """Tree of `NamedSharding` for ``abstract_params`` (e.g. ``nnx.state(nnx.eval_shape(...))``): use it as
    ``out_shardings`` to create or load the weights directly sharded."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), param_specs(abstract_params, mesh, rules), is_leaf=lambda x: isinstance(x, P)
    )


def shard_params(params, mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None):
    """``params`` placed on ``mesh`` with `param_shardings`."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def activation_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None
) -> P:
    """PartitionSpec of an activation, e.g. ``("batch", "length", None)`` for tokens [B, S, D]."""
    return logical_to_spec(logical, shape, mesh, rules)


def bytes_per_device(params, mesh, rules: Mapping[str, Sequence[str]] | None = None) -> int:
    """Per-device parameter footprint (bytes) of ``params`` (arrays or ShapeDtypeStructs) on ``mesh`` (a `Mesh` or
    a `jax.sharding.AbstractMesh`: only the axis sizes are used, so no devices are needed)."""
    total = 0
    for spec, leaf in zip(
        jax.tree.leaves(param_specs(params, mesh, rules), is_leaf=lambda x: isinstance(x, P)), jax.tree.leaves(params)
    ):
        shard = []
        for dim, entry in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            shard.append(dim // math.prod(mesh.shape[a] for a in axes))
        total += math.prod(shard) * jax.numpy.dtype(leaf.dtype).itemsize
    return total
