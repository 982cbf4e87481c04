"""Writers of the VAE and UMT5 checkpoints in the official Wan2.2 layout (the inverses of the loaders).

* `vae_state_dict(vae)` / `save_vae_pth(vae, path)`: ``Wan2.1_VAE.pth`` keys (``encoder.conv1.weight``, ...) and
  PyTorch shapes, from `wanjax.io.vae_loader.vae_key_table`; read back by `wanjax.io.vae_loader.load_vae`.
* `vae_config_from_official_state(sd)` (re-exported from `wanjax.io.vae_loader`): the `VAEConfig` implied by the
  tensor shapes of such a file.
* `t5_state_dict(encoder)` / `save_t5_pth(encoder, path)`: ``models_t5_umt5-xxl-enc-bf16.pth`` keys
  (``token_embedding.weight``, ``blocks.N.attn.q.weight``, ...); read back by `wanjax.io.t5_loader.load_t5_encoder`.

Writing ``.pth`` needs torch (imported lazily); files are written to a temp name and renamed.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from wanjax.io.atomic import atomic_path
from wanjax.io.t5_loader import _LAYER_KEYS, _LAYER_PREFIX, OFFICIAL
from wanjax.io.vae_loader import vae_config_from_official_state, vae_key_table  # noqa: F401 (re-export)

__all__ = ["vae_state_dict", "save_vae_pth", "vae_config_from_official_state", "t5_state_dict", "save_t5_pth"]


def _vae_to_torch(kind: str, a: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "conv3d":  # (kt, kh, kw, i, o) -> (o, i, kt, kh, kw)
        a = np.transpose(a, (4, 3, 0, 1, 2))
    elif kind == "conv2d":  # (kh, kw, i, o) -> (o, i, kh, kw)
        a = np.transpose(a, (3, 2, 0, 1))
    elif kind == "linear1x1":  # (i, o) -> (o, i, 1, 1)
        a = np.transpose(a, (1, 0))[:, :, None, None]
    a = np.ascontiguousarray(a.reshape(torch_shape))
    return a


def vae_state_dict(vae) -> dict[str, np.ndarray]:
    """``{official key: float32 array in PyTorch layout}`` for every parameter of a `WanVAE`."""
    flat = dict(nnx.to_flat_state(nnx.state(vae, nnx.Param)))
    out = {}
    for e in vae_key_table(vae):
        a = np.asarray(jax.device_get(flat[e.path].get_value()), np.float32)
        out[e.official] = _vae_to_torch(e.kind, a, e.torch_shape)
    return out


def _save_pth(sd: Mapping[str, np.ndarray], path: str | os.PathLike, dtype: str) -> str:
    import torch

    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    tensors = {k: torch.from_numpy(np.array(v, np.float32, copy=True)).to(tdt) for k, v in sd.items()}
    path = os.fspath(path)
    with atomic_path(path, fsync=False) as tmp:
        torch.save(tensors, tmp)
    return path


def save_vae_pth(vae, path: str | os.PathLike, dtype: str = "bfloat16") -> str:
    """Write ``vae`` as an official ``Wan2.1_VAE.pth`` state dict (tensors cast to ``dtype``); returns the path."""
    return _save_pth(vae_state_dict(vae), path, dtype)


def t5_state_dict(encoder) -> dict[str, np.ndarray]:
    """``{official key: float32 array}`` of a `UMT5Encoder` (inverse of `params_from_state_dict`)."""
    params = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    g = lambda a: np.asarray(jax.device_get(a), np.float32)  # noqa: E731
    out = {"token_embedding.weight": g(params["embedding"])}
    prefix = _LAYER_PREFIX[OFFICIAL]
    n = encoder.cfg.num_layers
    for path, (okey, _, is_linear) in _LAYER_KEYS.items():
        node = params["blocks"]
        for p in path:
            node = node[p]
        stacked = g(node)
        if stacked.shape[0] != n:
            raise ValueError(f"t5_state_dict: param {path} has leading dim {stacked.shape[0]}, expected {n} layers")
        for i in range(n):
            a = stacked[i]
            out[prefix.format(i=i) + okey] = np.ascontiguousarray(a.T if is_linear else a)
    out["norm.weight"] = g(params["norm"]["scale"])
    return out


def save_t5_pth(encoder, path: str | os.PathLike, dtype: str = "bfloat16") -> str:
    """Write ``encoder`` as an official ``models_t5_umt5-xxl-enc-bf16.pth`` state dict; returns the path."""
    return _save_pth(t5_state_dict(encoder), path, dtype)
