"""Shared helpers for the checkpoint I/O tests (no tests here): tiny random diffusers models and checkpoint writers."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from wanjax.config import WanConfig, diffusers_config_dict, diffusers_model_kwargs, official_config_dict
from wanjax.io.keymap import COMFY_PREFIX, diffusers_to_official


def official_cfg_json(cfg: WanConfig) -> dict:
    """The official config.json fields, plus text_dim (the real file omits it: it is always 4096 there)."""
    return {**official_config_dict(cfg), "text_dim": cfg.text_dim}


def tiny_cfg(dim=32, heads=2, layers=2, ffn=48, text_dim=24, freq=16, text_len=8) -> WanConfig:
    return WanConfig(
        dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, text_dim=text_dim, freq_dim=freq, text_len=text_len
    )


def diffusers_model(cfg: WanConfig, seed: int = 0):
    """A `WanTransformer3DModel` of ``cfg`` with every parameter randomised (nothing trivially 0 or 1)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(**diffusers_model_kwargs(cfg)).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("scale_shift_table"):
                p.copy_(0.5 * r)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:  # Linear / Conv weights: keep activations O(1)
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(r / np.sqrt(fan_in))
    return m


def state_dict(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items() if not k.startswith("rope.")}


def write_checkpoint(
    sd: dict[str, torch.Tensor],
    path: str,
    *,
    layout: str = "diffusers",
    comfy: bool = False,
    dtype: torch.dtype | None = None,
    shards: int = 1,
    config: WanConfig | None = None,
) -> str:
    """Write ``sd`` (diffusers keys) as safetensors in ``layout`` and return what to pass to `load_dit`.

    ``shards == 1`` and ``path`` ending in .safetensors: one file. Otherwise ``path`` is a directory that gets
    ``shards`` files + an index json (official/diffusers naming); ``config`` adds a matching config.json.
    """
    out = {}
    for k, v in sd.items():
        name = diffusers_to_official(k) if layout == "official" else k
        if comfy:
            name = COMFY_PREFIX + name
        out[name] = v.to(dtype) if dtype is not None else v
    if path.endswith(".safetensors"):
        save_file(out, path)
        return path
    os.makedirs(path, exist_ok=True)
    keys = list(out)
    chunks = [keys[i::shards] for i in range(shards)]
    stem = "diffusion_pytorch_model"
    weight_map = {}
    for i, ks in enumerate(chunks):
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: out[k] for k in ks}, os.path.join(path, fname))
        weight_map.update({k: fname for k in ks})
    with open(os.path.join(path, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    if config is not None:
        cfgd = official_cfg_json(config) if layout == "official" else diffusers_config_dict(config)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfgd, f)
    return path
