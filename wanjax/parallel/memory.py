"""Per-device memory of the DiT weights under the sharding rules, for float and W4A4-quantized experts.

Shapes only (``jax.ShapeDtypeStruct``): nothing is allocated, so the full-size model can be planned on a laptop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from wanjax.config import WanConfig
from wanjax.parallel.rules import bytes_per_device, path_str


def abstract_dit_params(cfg: WanConfig, dtype=jnp.bfloat16):
    """Shape/dtype tree of one expert's parameters (`WanDiT` with ``param_dtype=dtype``)."""
    from wanjax.model.dit import WanDiT

    return nnx.state(nnx.eval_shape(lambda: WanDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))))


def w4a4_abstract(params, rank: int = 32, lowrank_dtype=jnp.bfloat16):
    """The shape tree of ``params`` with every block Linear quantized as the W4A4 artifact stores it: packed int4
    ``qweight`` [L, N, K/2] uint8 + per-channel ``scale`` [L, N] fp32, low-rank ``down`` [L, K, r] / ``up`` [L, r, N],
    ``smooth`` [L, K] fp32, ``bias`` kept. Embeddings, time projection and head stay as they are."""
    sd = jax.ShapeDtypeStruct
    flat = {path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    out: dict = {}
    for name, a in flat.items():
        parts = name.split(".")
        if name.startswith("blocks.") and parts[-1] == "kernel":
            L, k, n = a.shape
            base = ".".join(parts[:-1])
            out[base + ".qweight"] = sd((L, n, k // 2), jnp.uint8)
            out[base + ".scale"] = sd((L, n), jnp.float32)
            out[base + ".down"] = sd((L, k, rank), lowrank_dtype)
            out[base + ".up"] = sd((L, rank, n), lowrank_dtype)
            out[base + ".smooth"] = sd((L, k), jnp.float32)
        else:
            out[name] = a
    tree: dict = {}
    for name, a in out.items():                      # nested dicts so paths stay "a.b.c"
        node = tree
        *head, last = name.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = a
    return tree


def total_bytes(params) -> int:
    """Bytes of all leaves of ``params``."""
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))


def weights_per_device(cfg: WanConfig, mesh: Mesh, *, quantized: bool = False, rank: int = 32,
                       dtype=jnp.bfloat16) -> int:
    """Bytes of one expert's weights on the most loaded device of ``mesh``."""
    p = abstract_dit_params(cfg, dtype)
    if quantized:
        p = w4a4_abstract(p, rank)
    return bytes_per_device(p, mesh)
