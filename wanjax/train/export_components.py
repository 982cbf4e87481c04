"""Writers of the VAE and UMT5 checkpoints in the official Wan2.2 layout (the inverses of the loaders).

* `vae_state_dict(vae)` / `save_vae_pth(vae, path)`: ``Wan2.1_VAE.pth`` keys (``encoder.conv1.weight``, ...) and
  PyTorch shapes, from `wanjax.io.vae_loader.vae_key_table`; read back by `wanjax.io.vae_loader.load_vae`.
* `vae_config_from_official_state(sd)`: the `VAEConfig` implied by the tensor shapes of such a file (base width,
  z, levels, residual blocks, temporal down-sampling), needed for VAEs other than the published one.
* `t5_state_dict(encoder)` / `save_t5_pth(encoder, path)`: ``models_t5_umt5-xxl-enc-bf16.pth`` keys
  (``token_embedding.weight``, ``blocks.N.attn.q.weight``, ...); read back by `wanjax.io.t5_loader.load_t5_encoder`.

Writing ``.pth`` needs torch (imported lazily); files are written to a temp name and renamed.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from wanjax.io.t5_loader import _LAYER_KEYS, _LAYER_PREFIX, OFFICIAL
from wanjax.io.vae_loader import vae_key_table
from wanjax.model.vae import VAEConfig

__all__ = ["vae_state_dict", "save_vae_pth", "vae_config_from_official_state", "t5_state_dict", "save_t5_pth"]


def _vae_to_torch(kind: str, a: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "conv3d":        # (kt, kh, kw, i, o) -> (o, i, kt, kh, kw)
        a = np.transpose(a, (4, 3, 0, 1, 2))
    elif kind == "conv2d":      # (kh, kw, i, o) -> (o, i, kh, kw)
        a = np.transpose(a, (3, 2, 0, 1))
    elif kind == "linear1x1":   # (i, o) -> (o, i, 1, 1)
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_vae_pth(vae, path: str | os.PathLike, dtype: str = "bfloat16") -> str:
    """Write ``vae`` as an official ``Wan2.1_VAE.pth`` state dict (tensors cast to ``dtype``); returns the path."""
    return _save_pth(vae_state_dict(vae), path, dtype)


def vae_config_from_official_state(sd: Mapping[str, Any], **overrides) -> VAEConfig:
    """The `VAEConfig` implied by the shapes of an official-layout (``Wan2.1_VAE.pth``) state dict.

    Reads the base width from ``encoder.conv1``, z from ``conv2`` (post-quant conv), and walks
    ``encoder.downsamples.N`` (residual blocks carry ``residual.2.weight``; resamples ``resample.1.weight``, plus
    ``time_conv.weight`` when they also halve time) for the level widths, residual blocks per level and temporal
    down-sampling. Latent mean/std are not stored in the file: they keep the Wan2.1 values unless overridden.
    """
    def shape(k):
        if k not in sd:
            raise KeyError(f"official VAE state dict: missing key {k!r} (needed to infer the config)")
        return tuple(sd[k].shape)

    base = shape("encoder.conv1.weight")[0]
    z = shape("conv2.weight")[0]
    idx = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.downsamples\.(\d+)\.", k)] if m})
    if not idx:
        raise KeyError("official VAE state dict: no 'encoder.downsamples.N' keys")
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i in idx:
        p = f"encoder.downsamples.{i}."
        if p + "residual.2.weight" in sd:
            levels[-1].append(shape(p + "residual.2.weight")[0])
        elif p + "resample.1.weight" in sd:
            temporal.append(p + "time_conv.weight" in sd)
            levels.append([])
        else:
            raise KeyError(f"official VAE state dict: {p[:-1]!r} is neither a residual block nor a resample")
    nres = {len(lv) for lv in levels}
    if len(nres) != 1:
        raise ValueError(f"official VAE state dict: levels have different numbers of residual blocks {nres}")
    mult = []
    for lv in levels:
        if lv[-1] % base:
            raise ValueError(f"official VAE state dict: level width {lv[-1]} is not a multiple of base {base}")
        mult.append(lv[-1] // base)
    kw: dict[str, Any] = dict(base_dim=base, z_dim=z, dim_mult=tuple(mult), num_res_blocks=nres.pop(),
                              temporal_downsample=tuple(temporal))
    kw.update(overrides)
    return VAEConfig(**kw)


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
