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
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.config import WanConfig, config_from_json
from wanjax.io import keymap
from wanjax.io.errors import CheckpointError
from wanjax.io.finite import nonfinite_leaves
from wanjax.io.safetensors_stream import iter_chunks, read_header, read_index, scan
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


#: Extensions of other checkpoint formats that an expert dir should not hold next to its safetensors (ignored with a
#: warning naming them).
OTHER_CHECKPOINT_EXTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")


def _holds_dit_weights(path: str) -> bool:
    """Whether the safetensors file ``path`` holds any Wan DiT parameter (header only); False if unreadable."""
    try:
        return any(keymap.is_dit_key(k) for k in read_header(path))
    except CheckpointError:
        return False


def _resolve_dir(path: str) -> CheckpointSource:
    marker = os.path.join(path, ORBAX_MARKER)
    indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    names = lambda ps: [os.path.basename(p) for p in ps]   # noqa: E731
    if os.path.isfile(marker):
        if indexes or files:
            raise CheckpointError(
                f"{path}: ambiguous: holds both a converted wanjax cache ({ORBAX_MARKER}, params/) and safetensors "
                f"checkpoint file(s) {names(indexes + files)[:8]}; move one of them out of the directory (pass "
                "the *.safetensors.index.json or .safetensors file itself to load the safetensors)")
        return CheckpointSource(path, "orbax")
    others = sorted(f for f in os.listdir(path) if f.lower().endswith(OTHER_CHECKPOINT_EXTS)
                    and os.path.isfile(os.path.join(path, f)))
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: ambiguous: several index files, pass one of them explicitly: "
                              f"{names(indexes)}")
    if indexes:
        src = _index_source(indexes[0])
        used = {os.path.realpath(f) for f in src.files}
        stray = [f for f in files if os.path.realpath(f) not in used]
        second = [f for f in stray if _holds_dit_weights(f)]
        if second:
            raise CheckpointError(
                f"{path}: ambiguous: two checkpoints: the index {os.path.basename(indexes[0])} (shards "
                f"{names(src.files)[:4]}{' ...' if len(src.files) > 4 else ''}) and {names(second)}, which the "
                "index does not list but which hold Wan DiT weights; pass the index json or the .safetensors file "
                "itself, or remove the one you do not want", [f"{f}: not in {indexes[0]}" for f in second])
        for f in stray + [os.path.join(path, o) for o in others]:
            warnings.warn(f"{path}: ignoring {os.path.basename(f)}: not part of the checkpoint "
                          f"{os.path.basename(indexes[0])}", stacklevel=3)
        return src
    if len(files) == 1:
        for o in others:
            warnings.warn(f"{path}: ignoring {o}: not part of the checkpoint {os.path.basename(files[0])}",
                          stacklevel=3)
        return CheckpointSource(path, "safetensors", (files[0],), config_path=_sibling_config(path))
    hints = [d for d in ("high_noise_model", "low_noise_model", "transformer", "transformer_2")
             if os.path.isdir(os.path.join(path, d))]
    hint = f" (it has expert sub-directories: pass one of {hints})" if hints else ""
    if files:
        raise CheckpointError(f"{path}: {len(files)} .safetensors files but no *.safetensors.index.json to "
                              f"tell how they fit together: {names(files)[:8]}")
    if others and not hints:
        raise CheckpointError(f"{path}: no *.safetensors.index.json, *.safetensors or {ORBAX_MARKER} found, only "
                              f"{others[:8]} (formats wanjax does not load: convert them to safetensors)")
    raise CheckpointError(f"{path}: no *.safetensors.index.json, *.safetensors or {ORBAX_MARKER} found{hint}")


def resolve(path: str | os.PathLike) -> CheckpointSource:
    """Work out what ``path`` is (see the module docstring); `CheckpointError` / ``FileNotFoundError`` if unusable.

    A directory must hold exactly one checkpoint: a converted cache together with safetensors files, two index
    files, or an index plus a ``.safetensors`` file it does not list that holds DiT weights (a second checkpoint)
    are refused naming both; other files the index does not list, and files of other checkpoint formats
    (``.bin``, ``.pth``, ``.gguf`` ...), are ignored with a warning naming them.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if os.path.isdir(path):
        return _resolve_dir(path)
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
    cfg, bufs, _ = _read_safetensors(src, dtype, config=config, ignore_unknown=ignore_unknown)
    return cfg, bufs


def _read_safetensors(src: CheckpointSource, dtype=jnp.bfloat16, *, config: WanConfig | None = None,
                      ignore_unknown: bool = False) -> tuple[WanConfig, Flat, dict]:
    """`read_safetensors_params` plus ``{official key: TensorInfo}`` of the tensors read (file and on-disk key)."""
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
        raise CheckpointError(f"{source}: {len(problems)} tensor(s) hold non-finite values (NaN/Inf); the "
                              "checkpoint is corrupt or was saved from a diverged model:\n  " + "\n  ".join(problems),
                              problems)


def _disk_where(chosen: dict):
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
        raise RuntimeError("WanDiT has non-parameter state; wanjax.io.dit_loader.build_model must be taught to "
                           "create it")
    arrays: Flat = {}
    for p in list(params):
        arrays[p] = jax.device_put(params.pop(p), sharding).block_until_ready()   # host buffer freed once copied
    nnx.replace_by_pure_dict(state, unflatten_tree(arrays))
    return nnx.merge(graphdef, state, rest)


def load_dit(path: str | os.PathLike, dtype=jnp.bfloat16, *, config: WanConfig | None = None,
             ignore_unknown: bool = False, sharding: jax.sharding.Sharding | None = None, check_finite: bool = True,
             verify: bool | None = None):
    """Load one Wan2.2 DiT expert as a `wanjax.model.dit.WanDiT`.

    Args:
      path: official expert dir, diffusers transformer dir, ``*.safetensors.index.json``, single ``.safetensors``
        file (official / diffusers / ComfyUI keys) or an orbax cache dir from `wanjax.io.orbax_cache.convert`.
      dtype: compute dtype and storage dtype of the large weights (modulation, norms, time embedding and head
        stay fp32).
      config: override the config read from ``config.json`` / inferred from shapes.
      ignore_unknown: skip tensors that are not parameters of the model instead of raising.
      sharding: placement of every parameter (default: the default device), e.g. replicated over a mesh.
      check_finite: refuse parameters holding NaN/Inf (one jitted reduction over the loaded tree).
      verify: for a cache, check the sha256 of its files against its metadata before restoring (default: on,
        unless ``WANJAX_VERIFY_CACHE=0``).

    Raises `wanjax.io.errors.CheckpointError` for unusable checkpoints (message names file, key, expected, got).
    """
    dtype = jnp.dtype(dtype)
    src = resolve(path)
    if src.kind == "orbax":
        from wanjax.io.orbax_cache import load_cached
        return load_cached(src.path, dtype, config=config, sharding=sharding, check_finite=check_finite,
                           verify=verify)
    cfg, params, chosen = _read_safetensors(src, dtype, config=config, ignore_unknown=ignore_unknown)
    model = build_model(cfg, dtype, params, sharding)
    if check_finite:
        raise_if_nonfinite(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, src.path, _disk_where(chosen))
    return model
