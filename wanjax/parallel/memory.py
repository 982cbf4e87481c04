"""Per-device memory of the DiT weights under the sharding rules, for float and W4A4-quantized experts.

Shapes only (``jax.ShapeDtypeStruct``) and abstract meshes: nothing is allocated and no devices are needed, so the
full-size model can be planned on a laptop::

    python -m wanjax.parallel.memory --mesh 2,1,4,1 --mesh 1,1,8,1      # (data, fsdp, context, tensor)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

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
    for name, a in out.items():  # nested dicts so paths stay "a.b.c"
        node = tree
        *head, last = name.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = a
    return tree


def total_bytes(params) -> int:
    """Bytes of all leaves of ``params``."""
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))


def weights_per_device(cfg: WanConfig, mesh, *, quantized: bool = False, rank: int = 32, dtype=jnp.bfloat16) -> int:
    """Bytes of one expert's weights per device of ``mesh`` (a `Mesh` or `abstract_mesh`)."""
    p = abstract_dit_params(cfg, dtype)
    if quantized:
        p = w4a4_abstract(p, rank)
    return bytes_per_device(p, mesh)


def abstract_mesh(data: int = 1, fsdp: int = 1, context: int = 1, tensor: int = 1) -> AbstractMesh:
    """A device-less mesh with the wanjax axes, for planning."""
    from wanjax.parallel.mesh import AXES

    return AbstractMesh((data, fsdp, context, tensor), AXES)


def main(argv=None) -> None:
    """Print both experts' weight bytes per device (bf16 and W4A4) for each ``--mesh data,fsdp,context,tensor``."""
    import argparse

    from wanjax.config import I2V_A14B

    ap = argparse.ArgumentParser(prog="python -m wanjax.parallel.memory", description=main.__doc__)
    ap.add_argument("--mesh", action="append", default=None, help="data,fsdp,context,tensor (repeatable)")
    ap.add_argument("--rank", type=int, default=32, help="low-rank branch rank of the W4A4 layout")
    args = ap.parse_args(argv)
    meshes = args.mesh or ["1,1,1,1", "2,1,4,1", "1,1,8,1", "2,1,8,1", "2,1,16,1"]
    bf16 = abstract_dit_params(I2V_A14B)
    w4 = w4a4_abstract(bf16, args.rank)
    print(f"one expert: {total_bytes(bf16) / 1e9:.2f} GB bf16, {total_bytes(w4) / 1e9:.2f} GB W4A4 (rank {args.rank})")
    print("mesh (data,fsdp,context,tensor) | both experts bf16 GB/device | both experts W4A4 GB/device")
    for m in meshes:
        sizes = tuple(int(v) for v in m.split(","))
        if len(sizes) != 4:
            raise SystemExit(f"--mesh {m!r}: expected 4 sizes data,fsdp,context,tensor")
        mesh = abstract_mesh(*sizes)
        print(f"{sizes} | {2 * bytes_per_device(bf16, mesh) / 1e9:.2f} | {2 * bytes_per_device(w4, mesh) / 1e9:.2f}")


if __name__ == "__main__":
    main()
