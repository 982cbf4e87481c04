"""`load_dit`: build a `WanDiT` from a published checkpoint (official, diffusers, ComfyUI) or a wanjax orbax cache.

Accepted ``path`` forms:

* an official expert dir (``high_noise_model/``: ``config.json`` + ``diffusion_pytorch_model-*.safetensors`` +
  ``diffusion_pytorch_model.safetensors.index.json``);
* a diffusers transformer dir (``transformer/`` = high-noise, ``transformer_2/`` = low-noise);
* a ``*.safetensors.index.json`` file;
* a single ``.safetensors`` file with official, diffusers or ComfyUI (``model.diffusion_model.``) keys; the config
  then comes from a sibling ``config.json`` or is inferred from the tensor shapes (head_dim 128 assumed);
* a directory written by `wanjax.io.orbax_cache.convert`.

Safetensors are streamed tensor by tensor into already-converted host buffers and moved to the device one leaf at
a time (`wanjax.io.dit_params`): peak host memory is about the converted expert plus one source tensor.

Layering: this module only dispatches. `wanjax.io.dit_source` works out what ``path`` is; `wanjax.io.dit_params`
turns safetensors into the parameter tree and builds the model; `wanjax.io.orbax_cache` restores a cache. Both the
loader and the cache build on those two modules and never on each other's internals; the loader imports the cache
(and orbax) only when ``path`` is one. The names of those modules that callers used to import from here are
re-exported (``__all__``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from wanjax.config import WanConfig
from wanjax.io.dit_params import (
    abstract_model,
    build_model,
    disk_where,
    flatten_tree,
    infer_config,
    nonfinite_problems,
    raise_if_nonfinite,
    read_safetensors_params,
    stream_safetensors,
    target_tree,
    unflatten_tree,
)
from wanjax.io.dit_source import ORBAX_MARKER, OTHER_CHECKPOINT_EXTS, CheckpointSource, resolve

__all__ = [
    "load_dit",
    "CheckpointSource",
    "resolve",
    "ORBAX_MARKER",
    "OTHER_CHECKPOINT_EXTS",
    "infer_config",
    "abstract_model",
    "target_tree",
    "unflatten_tree",
    "flatten_tree",
    "read_safetensors_params",
    "stream_safetensors",
    "nonfinite_problems",
    "raise_if_nonfinite",
    "disk_where",
    "build_model",
]


def load_dit(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    config: WanConfig | None = None,
    ignore_unknown: bool = False,
    sharding: jax.sharding.Sharding | None = None,
    check_finite: bool = True,
    verify: bool | None = None,
):
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

        return load_cached(src.path, dtype, config=config, sharding=sharding, check_finite=check_finite, verify=verify)
    cfg, params, chosen = stream_safetensors(src, dtype, config=config, ignore_unknown=ignore_unknown)
    model = build_model(cfg, dtype, params, sharding)
    if check_finite:
        raise_if_nonfinite(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, src.path, disk_where(chosen))
    return model
