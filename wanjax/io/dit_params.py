"""The DiT parameter tree and its conversion from safetensors: shared by `wanjax.io.dit_loader` and
`wanjax.io.orbax_cache`.

* `target_tree`: the flat ``{path: ShapeDtypeStruct}`` a loaded `WanDiT` has (checked against `wanjax.io.keymap`);
* `read_safetensors_params` / `stream_safetensors`: validate a resolved safetensors checkpoint
  (`wanjax.io.dit_source.resolve`), then stream it tensor by tensor into preallocated, already-converted host
  buffers (Linear transposes, patch-conv reshape and block stacking done once, while reading): peak host memory is
  about the converted expert plus one source chunk;
* `nonfinite_problems` / `raise_if_nonfinite`: name every tensor holding a NaN/Inf;
* `build_model`: assemble the `WanDiT`, moving the host buffers to the device one leaf at a time and freeing each.
"""

from __future__ import annotations

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
from wanjax.io.dit_source import CheckpointSource
from wanjax.io.errors import CheckpointError
from wanjax.io.finite import nonfinite_leaves
from wanjax.io.safetensors_stream import iter_chunks, scan
from wanjax.io.validate import validate

#: Large F32/F16 tensors are read in row blocks of about this size (bounds the transient host memory).
CHUNK_BYTES = 16 << 20
#: The memory-mapped file is reopened after this many bytes were read (bounds resident mapped pages).
REOPEN_BYTES = 16 << 20
_INFER_HEAD_DIM = 128
#: rows of the source per task of :func:`copy_transposed`
TRANSPOSE_BLOCK_ROWS = 256
_POOL: list = []

Flat = dict[tuple[str, ...], Any]


def infer_config(shapes: dict[str, tuple[int, ...]], source: str = "<checkpoint>") -> WanConfig:
    """Infer a `WanConfig` from official-key tensor shapes (num_heads = dim / 128, text_len 512, eps 1e-6)."""
    need = (
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
        "blocks.0.ffn.0.weight",
        "head.head.weight",
    )
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(
            f"{source}: cannot infer the model config from shapes: key(s) {missing} missing "
            "(add a config.json next to the file or pass config=)"
        )
    pe = shapes["patch_embedding.weight"]
    dim, in_dim = pe[0], pe[1]
    patch = tuple(pe[2:])
    if dim % _INFER_HEAD_DIM:
        raise CheckpointError(
            f"{source}: cannot infer num_heads: dim {dim} is not a multiple of head_dim "
            f"{_INFER_HEAD_DIM} (pass config= or add a config.json)"
        )
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    try:
        return WanConfig(
            dim=dim,
            ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
            num_heads=dim // _INFER_HEAD_DIM,
            num_layers=layers,
            in_dim=in_dim,
            out_dim=shapes["head.head.weight"][0] // math.prod(patch),
            text_dim=shapes["text_embedding.0.weight"][1],
            freq_dim=shapes["time_embedding.0.weight"][1],
            patch_size=patch,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: inferred config is invalid: {e}") from None


def abstract_model(cfg: WanConfig, dtype=jnp.bfloat16):
    """`WanDiT` with abstract (shape-only) parameters; nothing is allocated."""
    from wanjax.model.dit import WanDiT

    return nnx.eval_shape(lambda: WanDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))


def target_tree(cfg: WanConfig, dtype=jnp.bfloat16) -> Flat:
    """Flat ``{path: ShapeDtypeStruct}`` of the model's parameters (the loader's target), checked against keymap."""
    params = nnx.to_pure_dict(nnx.state(abstract_model(cfg, dtype), nnx.Param))
    flat = {tuple(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = keymap.wanjax_shapes(cfg)
    if set(want) != set(flat) or any(tuple(flat[p].shape) != want[p] for p in want):
        diff = sorted(set(want) ^ set(flat)) or [p for p in want if tuple(flat[p].shape) != want[p]]
        raise RuntimeError(
            f"wanjax.io.keymap and WanDiT disagree on the parameter tree at {diff[:5]}: update "
            "keymap.official_to_wanjax to the model"
        )
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


def _transpose_pool():
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="wanjax-load"))
    return _POOL[0]


def copy_transposed(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src.T`` for 2-D arrays, in blocks of :data:`TRANSPOSE_BLOCK_ROWS` source rows on a thread pool.

    Same dtype of 2 bytes (bf16 / fp16, the checkpoints' usual case): the blocks are copied as uint16 views, which
    numpy copies without the GIL, so the blocks run in parallel and each block's writes stay within a few pages (a
    whole-matrix strided copy of ``ml_dtypes.bfloat16`` runs at about 0.6-1 GB/s on one core, the bulk of a
    checkpoint load). Other dtypes (a cast, e.g. fp32 -> bf16) take numpy's assignment. Bit-exact either way."""
    if dst.shape != src.shape[::-1]:
        raise ValueError(f"copy_transposed: destination {dst.shape} is not the transpose of {src.shape}")
    rows = src.shape[0]
    if src.dtype != dst.dtype or src.dtype.itemsize != 2 or rows <= TRANSPOSE_BLOCK_ROWS:
        dst[...] = src.T
        return
    d, s = dst.view(np.uint16), src.view(np.uint16)

    def block(i: int) -> None:
        d[:, i : i + TRANSPOSE_BLOCK_ROWS] = s[i : i + TRANSPOSE_BLOCK_ROWS].T

    for _ in _transpose_pool().map(block, range(0, rows, TRANSPOSE_BLOCK_ROWS)):
        pass


def read_safetensors_params(
    src: CheckpointSource, dtype=jnp.bfloat16, *, config: WanConfig | None = None, ignore_unknown: bool = False
) -> tuple[WanConfig, Flat]:
    """Validate then stream a safetensors checkpoint into converted host arrays.

    Returns ``(config, {path: np.ndarray})`` in the wanjax layout, each leaf in the model's dtype for ``dtype``
    (the fp32 policy of `WanDiT` for modulation, norms, time embedding and head).
    """
    cfg, bufs, _ = stream_safetensors(src, dtype, config=config, ignore_unknown=ignore_unknown)
    return cfg, bufs


def stream_safetensors(
    src: CheckpointSource, dtype=jnp.bfloat16, *, config: WanConfig | None = None, ignore_unknown: bool = False
) -> tuple[WanConfig, Flat, dict]:
    """`read_safetensors_params` plus ``{official key: TensorInfo}`` of the tensors read (file and on-disk key, for
    `disk_where`): ``(config, {path: np.ndarray}, chosen)``."""
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
    chosen = validate(
        infos,
        keymap.official_shapes(config),
        layout=layout,
        comfy=comfy,
        source=src.path,
        ignore_unknown=ignore_unknown,
    )
    target = target_tree(config, dtype)
    bufs = {p: np.empty(s.shape, s.dtype) for p, s in target.items()}
    filled = {p: 0 for p in target}
    names = {(t.file, t.key): n for n, t in chosen.items()}
    for info, start, arr in iter_chunks(
        list(chosen.values()),
        CHUNK_BYTES,
        REOPEN_BYTES,
        can_split=lambda i: names[(i.file, i.key)] != "patch_embedding.weight",
    ):
        t = keymap.official_to_wanjax(names[(info.file, info.key)])
        slot = bufs[t.path] if t.layer is None else bufs[t.path][t.layer]
        stop = start + arr.shape[0]
        # cast (e.g. fp32 -> bf16, round to nearest even) + layout change in one pass, into the final buffer
        if t.kind == "linear":  # torch rows are output features: columns of the [in, out] kernel
            copy_transposed(slot[:, start:stop], arr)
        elif t.kind == "patch":
            slot[...] = keymap.convert_tensor(t.kind, arr)
        else:
            slot[start:stop] = arr
        if stop == info.shape[0] or not info.shape:
            filled[t.path] += 1
        del arr
    for p, n in filled.items():  # validation guarantees this; keep the invariant explicit
        want = config.num_layers if p[0] == "blocks" else 1
        if n != want:
            raise RuntimeError(f"internal: parameter {'/'.join(p)} filled {n} times, expected {want}")
    return config, bufs, chosen


def nonfinite_problems(params, cfg: WanConfig, where=None) -> list[str]:
    """One line per official tensor of ``params`` (wanjax pure dict or flat ``{path: array}``, host or device)
    that holds a NaN or an Inf; ``[]`` when all are finite.

    The common case costs one jitted reduction over the whole tree and one small transfer
    (`wanjax.io.finite.nonfinite_leaves`); only a bad leaf is looked at again, per layer, to name the tensors.
    ``where(official_key) -> str``: the prefix of a line (the file and on-disk key); default the official key.
    """
    tree = unflatten_tree(params) if params and isinstance(next(iter(params)), tuple) else params
    bad = nonfinite_leaves(tree)
    if not bad:
        return []
    by_path: dict[keymap.Path, list[tuple[int | None, str]]] = {}
    for key in keymap.official_shapes(cfg):
        t = keymap.official_to_wanjax(key)
        by_path.setdefault(t.path, []).append((t.layer, key))
    flat = flatten_tree(tree)
    out = []
    for sp in bad:
        path = tuple(sp.split("/"))
        leaf = flat[path]
        axes = tuple(range(1, leaf.ndim))
        stacked = path[0] == "blocks"
        nan = np.asarray(jax.device_get(jnp.isnan(leaf).any(axis=axes if stacked else None))).reshape(-1)
        inf = np.asarray(jax.device_get(jnp.isinf(leaf).any(axis=axes if stacked else None))).reshape(-1)
        for layer, key in by_path.get(path, [(None, "/".join(path))]):
            i = layer if stacked and layer is not None else 0
            if nan[i] or inf[i]:
                kinds = " and ".join(k for k, f in (("NaN", nan[i]), ("Inf", inf[i])) if f)
                name = where(key) if where else repr(key)
                out.append(f"{name}: holds {kinds} (loaded as {jnp.dtype(leaf.dtype).name})")
    return out


def raise_if_nonfinite(params, cfg: WanConfig, source: str, where=None) -> None:
    """`CheckpointError` naming ``source`` and every tensor with a NaN/Inf (see `nonfinite_problems`)."""
    problems = nonfinite_problems(params, cfg, where)
    if problems:
        raise CheckpointError(
            f"{source}: {len(problems)} tensor(s) hold non-finite values (NaN/Inf); the "
            "checkpoint is corrupt or was saved from a diverged model:\n  " + "\n  ".join(problems),
            problems,
        )


def disk_where(chosen: dict):
    """A ``where`` for `nonfinite_problems` that names the file and on-disk key of each official key in ``chosen``
    (the third value of `stream_safetensors`)."""

    def where(key: str) -> str:
        t = chosen.get(key)
        if t is None:
            return repr(key)
        return f"{t.file}: key {t.key!r}" + ("" if t.key == key else f" (official {key!r})")

    return where


def build_model(cfg: WanConfig, dtype, params: Flat, sharding: jax.sharding.Sharding | None = None):
    """Assemble a `WanDiT` from flat host/device arrays, moving and freeing them one leaf at a time.

    ``sharding``: where every parameter goes (default: the default device), e.g. ``NamedSharding(mesh, P())`` to
    load straight into a replicated layout without staging the whole expert on one device first.
    """
    model = abstract_model(cfg, dtype)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise RuntimeError(
            "WanDiT has non-parameter state; wanjax.io.dit_params.build_model must be taught to create it"
        )
    arrays: Flat = {}
    for p in list(params):
        arrays[p] = jax.device_put(params.pop(p), sharding).block_until_ready()  # host buffer freed once copied
    nnx.replace_by_pure_dict(state, unflatten_tree(arrays))
    return nnx.merge(graphdef, state, rest)
