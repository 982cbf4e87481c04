"""`load_dit`: build a `WanDiT` from a published checkpoint (official, diffusers, ComfyUI) or a wanjax orbax cache.

Accepted ``path`` forms:

* an official expert dir (``high_noise_model/``: ``config.json`` + ``diffusion_pytorch_model-*.safetensors`` +
  ``diffusion_pytorch_model.safetensors.index.json``);
* a diffusers transformer dir (``transformer/`` = high-noise, ``transformer_2/`` = low-noise);
* a ``*.safetensors.index.json`` file;
* a single ``.safetensors`` file with official, diffusers or ComfyUI (``model.diffusion_model.``) keys; the config
  then comes from a sibling ``config.json`` or is inferred from the tensor shapes (head_dim 128 assumed);
* a directory written by `wanjax.io.orbax_cache.convert`.

Loading streams tensor by tensor into preallocated, already-converted host buffers (Linear transposes, patch-conv
reshape and block stacking done once, while reading), then moves them to the device one leaf at a time, freeing
each host buffer as it goes: peak host memory is about the converted expert plus one source tensor.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.config import WanConfig, config_from_json
from wanjax.io import keymap
from wanjax.io.errors import CheckpointError
from wanjax.io.safetensors_stream import iter_chunks, read_index, scan
from wanjax.io.validate import validate

ORBAX_MARKER = "wanjax_dit.json"
#: Large F32/F16 tensors are read in row blocks of about this size (bounds the transient host memory).
CHUNK_BYTES = 16 << 20
#: The memory-mapped file is reopened after this many bytes were read (bounds resident mapped pages).
REOPEN_BYTES = 16 << 20
_INFER_HEAD_DIM = 128

Flat = dict[tuple[str, ...], Any]


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """A resolved checkpoint location.

    kind: ``"safetensors"`` or ``"orbax"``. files: shard paths (safetensors). index/index_path: the weight map
    when an index json is used. config_path: the ``config.json`` to read, if any.
    """

    path: str
    kind: str
    files: tuple[str, ...] = ()
    index: dict[str, str] | None = None
    index_path: str | None = None
    config_path: str | None = None


def _sibling_config(d: str) -> str | None:
    p = os.path.join(d, "config.json")
    return p if os.path.isfile(p) else None


def _index_source(path: str) -> CheckpointSource:
    index = read_index(path)
    files = tuple(dict.fromkeys(index.values()))   # unique, in first-use order
    return CheckpointSource(path, "safetensors", files, index, path, _sibling_config(os.path.dirname(path) or "."))


def resolve(path: str | os.PathLike) -> CheckpointSource:
    """Work out what ``path`` is (see the module docstring); `CheckpointError` / ``FileNotFoundError`` if unusable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ORBAX_MARKER)):
            return CheckpointSource(path, "orbax")
        indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files, pass one of them explicitly: "
                                  f"{[os.path.basename(i) for i in indexes]}")
        if indexes:
            return _index_source(indexes[0])
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if len(files) == 1:
            return CheckpointSource(path, "safetensors", (files[0],), config_path=_sibling_config(path))
        hints = [d for d in ("high_noise_model", "low_noise_model", "transformer", "transformer_2")
                 if os.path.isdir(os.path.join(path, d))]
        hint = f" (it has expert sub-directories: pass one of {hints})" if hints else ""
        if files:
            raise CheckpointError(f"{path}: {len(files)} .safetensors files but no *.safetensors.index.json to "
                                  f"tell how they fit together: {[os.path.basename(f) for f in files[:8]]}")
        raise CheckpointError(f"{path}: no *.safetensors.index.json, *.safetensors or {ORBAX_MARKER} found{hint}")
    if path.endswith(".json"):
        return _index_source(path)
    if path.endswith(".safetensors"):
        return CheckpointSource(path, "safetensors", (path,), config_path=_sibling_config(os.path.dirname(path) or "."))
    raise CheckpointError(f"{path}: expected a directory, a *.safetensors.index.json or a .safetensors file")


def infer_config(shapes: dict[str, tuple[int, ...]], source: str = "<checkpoint>") -> WanConfig:
    """Infer a `WanConfig` from official-key tensor shapes (num_heads = dim / 128, text_len 512, eps 1e-6)."""
    need = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "blocks.0.ffn.0.weight",
            "head.head.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(f"{source}: cannot infer the model config from shapes: key(s) {missing} missing "
                              "(add a config.json next to the file or pass config=)")
    pe = shapes["patch_embedding.weight"]
    dim, in_dim = pe[0], pe[1]
    patch = tuple(pe[2:])
    if dim % _INFER_HEAD_DIM:
        raise CheckpointError(f"{source}: cannot infer num_heads: dim {dim} is not a multiple of head_dim "
                              f"{_INFER_HEAD_DIM} (pass config= or add a config.json)")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    try:
        return WanConfig(dim=dim, ffn_dim=shapes["blocks.0.ffn.0.weight"][0], num_heads=dim // _INFER_HEAD_DIM,
                         num_layers=layers, in_dim=in_dim, out_dim=shapes["head.head.weight"][0] // math.prod(patch),
                         text_dim=shapes["text_embedding.0.weight"][1], freq_dim=shapes["time_embedding.0.weight"][1],
                         patch_size=patch)
    except ValueError as e:
        raise CheckpointError(f"{source}: inferred config is invalid: {e}") from None


def abstract_model(cfg: WanConfig, dtype=jnp.bfloat16):
    """`WanDiT` with abstract (shape-only) parameters; nothing is allocated."""
    from wanjax.model.dit import WanDiT
    return nnx.eval_shape(lambda: WanDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))


def target_tree(cfg: WanConfig, dtype=jnp.bfloat16) -> Flat:
    """Flat ``{path: ShapeDtypeStruct}`` of the model's parameters (the loader's target), checked against keymap."""
    params = nnx.to_pure_dict(nnx.state(abstract_model(cfg, dtype), nnx.Param))
    flat = {tuple(str(getattr(k, "key", k)) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = keymap.wanjax_shapes(cfg)
    if set(want) != set(flat) or any(tuple(flat[p].shape) != want[p] for p in want):
        diff = sorted(set(want) ^ set(flat)) or [p for p in want if tuple(flat[p].shape) != want[p]]
        raise RuntimeError(f"wanjax.io.keymap and WanDiT disagree on the parameter tree at {diff[:5]}: update "
                           "keymap.official_to_wanjax to the model")
    return flat


def unflatten_tree(flat: Flat) -> dict:
    """``{("a", "b"): x}`` -> ``{"a": {"b": x}}``."""
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def flatten_tree(tree: dict, prefix: tuple[str, ...] = ()) -> Flat:
    """Inverse of `unflatten_tree` (leaves are anything that is not a dict)."""
    out: Flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_tree(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def read_safetensors_params(src: CheckpointSource, dtype=jnp.bfloat16, *, config: WanConfig | None = None,
                            ignore_unknown: bool = False) -> tuple[WanConfig, Flat]:
    """Validate then stream a safetensors checkpoint into converted host arrays.

    Returns ``(config, {path: np.ndarray})`` in the wanjax layout, each leaf in the model's dtype for ``dtype``
    (the fp32 policy of `WanDiT` for modulation, norms, time embedding and head).
    """
    infos = scan(list(src.files), src.index, src.index_path)
    layout, comfy = keymap.detect_layout([t.key for t in infos], src.path)
    if config is None:
        if src.config_path:
            config = config_from_json(src.config_path)
        else:
            shapes = {}
            for t in infos:
                name = keymap.to_official(t.key, layout, comfy)
                if name is not None:
                    shapes[name] = t.shape
            config = infer_config(shapes, src.path)
    chosen = validate(infos, keymap.official_shapes(config), layout=layout, comfy=comfy, source=src.path,
                      ignore_unknown=ignore_unknown)
    target = target_tree(config, dtype)
    bufs = {p: np.empty(s.shape, s.dtype) for p, s in target.items()}
    filled = {p: 0 for p in target}
    names = {(t.file, t.key): n for n, t in chosen.items()}
    for info, start, arr in iter_chunks(list(chosen.values()), CHUNK_BYTES, REOPEN_BYTES,
                                        can_split=lambda i: names[(i.file, i.key)] != "patch_embedding.weight"):
        t = keymap.official_to_wanjax(names[(info.file, info.key)])
        slot = bufs[t.path] if t.layer is None else bufs[t.path][t.layer]
        stop = start + arr.shape[0]
        # cast (e.g. fp32 -> bf16, round to nearest even) + layout change in one pass, into the final buffer
        if t.kind == "linear":         # torch rows are output features: columns of the [in, out] kernel
            slot[:, start:stop] = arr.T
        elif t.kind == "patch":
            slot[...] = keymap.convert_tensor(t.kind, arr)
        else:
            slot[start:stop] = arr
        if stop == info.shape[0] or not info.shape:
            filled[t.path] += 1
        del arr
    for p, n in filled.items():   # validation guarantees this; keep the invariant explicit
        want = config.num_layers if p[0] == "blocks" else 1
        if n != want:
            raise RuntimeError(f"internal: parameter {'/'.join(p)} filled {n} times, expected {want}")
    return config, bufs


def build_model(cfg: WanConfig, dtype, params: Flat, sharding: jax.sharding.Sharding | None = None):
    """Assemble a `WanDiT` from flat host/device arrays, moving and freeing them one leaf at a time.

    ``sharding``: where every parameter goes (default: the default device), e.g. ``NamedSharding(mesh, P())`` to
    load straight into a replicated layout without staging the whole expert on one device first.
    """
    model = abstract_model(cfg, dtype)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise RuntimeError("WanDiT has non-parameter state; wanjax.io.dit_loader.build_model must be taught to "
                           "create it")
    arrays: Flat = {}
    for p in list(params):
        arrays[p] = jax.device_put(params.pop(p), sharding).block_until_ready()   # host buffer freed once copied
    nnx.replace_by_pure_dict(state, unflatten_tree(arrays))
    return nnx.merge(graphdef, state, rest)


def load_dit(path: str | os.PathLike, dtype=jnp.bfloat16, *, config: WanConfig | None = None,
             ignore_unknown: bool = False, sharding: jax.sharding.Sharding | None = None):
    """Load one Wan2.2 DiT expert as a `wanjax.model.dit.WanDiT`.

    Args:
      path: official expert dir, diffusers transformer dir, ``*.safetensors.index.json``, single ``.safetensors``
        file (official / diffusers / ComfyUI keys) or an orbax cache dir from `wanjax.io.orbax_cache.convert`.
      dtype: compute dtype and storage dtype of the large weights (modulation, norms, time embedding and head
        stay fp32).
      config: override the config read from ``config.json`` / inferred from shapes.
      ignore_unknown: skip tensors that are not parameters of the model instead of raising.
      sharding: placement of every parameter (default: the default device), e.g. replicated over a mesh.

    Raises `wanjax.io.errors.CheckpointError` for unusable checkpoints (message names file, key, expected, got).
    """
    dtype = jnp.dtype(dtype)
    src = resolve(path)
    if src.kind == "orbax":
        from wanjax.io.orbax_cache import load_cached
        return load_cached(src.path, dtype, config=config, sharding=sharding)
    cfg, params = read_safetensors_params(src, dtype, config=config, ignore_unknown=ignore_unknown)
    return build_model(cfg, dtype, params, sharding)
